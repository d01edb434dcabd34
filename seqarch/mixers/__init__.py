"""Built-in mixers. Importing this package registers every one of them."""

from seqarch.mixers import (  # noqa: F401  (each module registers its mixer)
    attention,
    deltanet,
    hyena,
    mamba,
    mamba2,
    mamba3,
    retnet,
    rwkv,
    rwkv7,
    s4d,
)
from seqarch.mixers.base import MixerState, SequenceMixer

__all__ = ["MixerState", "SequenceMixer"]
