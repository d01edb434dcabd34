"""seqarch: Transformer, Mamba, RWKV, RetNet, Hyena and S4D sequence mixers behind one interface."""

from seqarch.mixers.base import MixerState, SequenceMixer
from seqarch.models import Block, SeqLM, build_block
from seqarch.registry import build_config, build_mixer, list_mixers, register

__version__ = "0.1.0"

__all__ = [
    "Block",
    "MixerState",
    "SeqLM",
    "SequenceMixer",
    "build_block",
    "build_config",
    "build_mixer",
    "list_mixers",
    "register",
]
