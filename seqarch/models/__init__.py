"""Models built from mixers: the residual Block (and `build_block`), the SeqLM language model, LoRA adapters."""

from seqarch.models.block import Block, BlockState, build_block
from seqarch.models.lm import LMState, SeqLM

__all__ = ["Block", "BlockState", "LMState", "SeqLM", "build_block"]
