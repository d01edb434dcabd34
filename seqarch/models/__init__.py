"""Models built from mixers: the residual Block and the SeqLM language model."""

from seqarch.models.block import Block, BlockState
from seqarch.models.lm import LMState, SeqLM

__all__ = ["Block", "BlockState", "LMState", "SeqLM"]
