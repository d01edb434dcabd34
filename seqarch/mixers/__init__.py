"""Built-in mixers. Importing this package registers every one of them."""

from seqarch.mixers import attention, hyena, mamba, mamba2, mamba3, retnet, rwkv, s4d  # noqa: F401  (each module registers its mixer)
from seqarch.mixers.base import MixerState, SequenceMixer

__all__ = ["MixerState", "SequenceMixer"]
