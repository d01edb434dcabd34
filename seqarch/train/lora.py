"""Moved: LoRA adapters live in `seqarch.models.lora` (issue #17). This path is accepted for one
release; each name read from it warns (DeprecationWarning) and returns the object from its new home."""

from seqarch.configs import moved_names

_MOVED = ("ATTENTION_PROJECTIONS", "LoRALinear", "apply_lora", "merge_lora")
__getattr__ = moved_names(__name__, dict.fromkeys(_MOVED, "seqarch.models.lora"))
