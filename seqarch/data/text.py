"""Byte-level text corpora: the installed Python standard library, the user's files, HF datasets.

Legend: L window length (bytes), S stream length (bytes), V = 256 byte values.

A corpus is two uint8 streams (train, validation), each the concatenation of whole documents
separated by a newline, so the split never cuts a document in two. Training reads windows of
L + 1 bytes at non-overlapping offsets (inputs are the first L, targets the last L); validation
reads the same way, in order.

The default corpus needs no download: the `.py` files of the running interpreter's standard
library (test suites and site-packages excluded), assigned to validation when
crc32(relative path) % 100 < val_percent, so the split is the same on every run and machine
with the same Python version.
"""

from __future__ import annotations

import functools
import math
import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import Dataset

BYTE_VOCAB = 256
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class ByteWindows(Dataset):
    """Non-overlapping windows of a uint8 stream (S,): item i is (inputs (L,), targets (L,)) int64,
    targets[t] = inputs[t + 1] in the stream."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (self.stream.numel() - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.stream[start:start + self.seq_len + 1].long()
        return window[:-1], window[1:]


def _join(documents: Iterable[bytes]) -> torch.Tensor:
    data = b"\n".join(documents)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library folder and its `.py` files (sorted), without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [path for path in sorted(root.rglob("*.py"))
             if not _SKIPPED_STDLIB_DIRS & set(path.relative_to(root).parts[:-1])]
    return root, files


def split_by_name(root: Path, files: list[Path], val_percent: float) -> tuple[list[Path], list[Path]]:
    """Deterministic split by file: crc32 of the relative path decides, independent of file order."""
    train, val = [], []
    for path in files:
        bucket = zlib.crc32(path.relative_to(root).as_posix().encode()) % 100
        (val if bucket < val_percent else train).append(path)
    return train, val


@functools.lru_cache(maxsize=2)
def stdlib_corpus(val_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8 streams of the standard library's source files (read once per
    process; the streams are never written to)."""
    root, files = stdlib_files()
    train, val = split_by_name(root, files, val_percent)
    return _join(path.read_bytes() for path in train), _join(path.read_bytes() for path in val)


def text_files_corpus(path: str, val_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) streams of a file or a folder of files (every file below it).

    Several files split by file as the standard library does; a single file splits by bytes (the
    last val_percent % are validation). Raises ValueError when there is nothing to read."""
    location = Path(path).expanduser()
    if not location.exists():
        raise ValueError(f"data.path {path!r} does not exist; give a text file or a folder of text files")
    if location.is_file():
        data = location.read_bytes()
        cut = len(data) - math.ceil(len(data) * val_percent / 100)
        return _join([data[:cut]]), _join([data[cut:]])
    files = sorted(p for p in location.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"data.path {path!r} is a folder with no files in it")
    train, val = split_by_name(location, files, val_percent)
    if not val or not train:  # too few files for the hash split: hold out the last file instead
        train, val = files[:-1] or files, files[-1:]
    return _join(p.read_bytes() for p in train), _join(p.read_bytes() for p in val)


def hf_corpus(dataset: str | None, path: str | None, split: str, text_field: str,
              val_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) streams from a Hugging Face dataset, by hub name or from local data files
    (`path`: a .txt/.json/.jsonl/.csv/.parquet file, loaded with the matching builder). Needs the
    optional `datasets` package; the split is by record, every round(100 / val_percent)-th to validation."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError("data source 'hf' needs the optional package `datasets` "
                         "(pip install 'seqarch[hf]'); or use data=text data.path=<file or folder>") from error
    if (dataset is None) == (path is None):
        raise ValueError("data source 'hf' needs exactly one of data.dataset (a hub name) or data.path (local files)")
    if path is not None:
        suffix = Path(path).suffix.lstrip(".")
        builder = {"txt": "text", "jsonl": "json"}.get(suffix, suffix)
        records = datasets.load_dataset(builder, data_files=path, split=split)
    else:
        records = datasets.load_dataset(dataset, split=split)
    if text_field not in records.column_names:
        raise ValueError(f"data.text_field {text_field!r} is not a column; columns: {', '.join(records.column_names)}")
    every = max(2, round(100 / val_percent))
    texts = [str(text).encode("utf-8") for text in records[text_field]]
    return (_join(t for i, t in enumerate(texts) if i % every), _join(t for i, t in enumerate(texts) if not i % every))


def unigram_bits_per_byte(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy (bits per byte) of `val` under the byte frequencies of `train` (add-one
    smoothing): what a model that ignores context achieves, the bar a sequence model must clear."""
    counts = torch.bincount(train.long(), minlength=BYTE_VOCAB).double() + 1
    log_probs = torch.log2(counts / counts.sum())
    val_counts = torch.bincount(val.long(), minlength=BYTE_VOCAB).double()
    return float(-(val_counts * log_probs).sum() / val_counts.sum())


__all__ = ["BYTE_VOCAB", "ByteWindows", "hf_corpus", "stdlib_corpus", "stdlib_files", "split_by_name",
           "text_files_corpus", "unigram_bits_per_byte"]
