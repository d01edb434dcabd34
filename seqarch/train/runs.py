"""Moved: run folders and checkpoints live in `seqarch.runs` (issue #17). This path is accepted for
one release; each name read from it warns (DeprecationWarning) and returns the object from its new home."""

from seqarch.configs import moved_names

_MOVED = ("RunStopped", "claim_run_dir", "finite_or_null", "load_checkpoint_file", "read_checkpoint",
          "resolve_checkpoint", "strict_json", "write_json")
__getattr__ = moved_names(__name__, dict.fromkeys(_MOVED, "seqarch.runs"))
