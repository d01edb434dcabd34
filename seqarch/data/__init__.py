"""Training data with no download: byte-level text corpora and synthetic recall/copy tasks."""

from seqarch.data.sources import DATA_SOURCES, DataBundle, build_data, data_config
from seqarch.data.synthetic import IGNORE

__all__ = ["DATA_SOURCES", "IGNORE", "DataBundle", "build_data", "data_config"]
