"""Registry: mixer name -> (mixer class, config dataclass).

    @register("mamba", MambaConfig)
    class MambaMixer(SequenceMixer): ...

    mixer = build_mixer("mamba", d_model=256, d_state=16)   # kwargs override the config

`seqarch.models.block.build_block` (also `seqarch.build_block`) wraps a built mixer in the residual block.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from seqarch.configs import make_config, moved_names


@dataclass(frozen=True)
class MixerEntry:
    name: str
    mixer_cls: type
    config_cls: type


_REGISTRY: dict[str, MixerEntry] = {}


def register(name: str, config_cls: type):
    """Class decorator registering a SequenceMixer under `name` with its config dataclass.
    Registering a name twice raises."""

    def decorator(mixer_cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"mixer {name!r} is already registered by {_REGISTRY[name].mixer_cls.__name__}")
        _REGISTRY[name] = MixerEntry(name, mixer_cls, config_cls)
        return mixer_cls

    return decorator


def _load_builtin_mixers() -> None:
    # Importing the package runs every built-in module's @register; done lazily so that
    # mixer modules can import this one.
    importlib.import_module("seqarch.mixers")


def list_mixers() -> list[str]:
    """Names of every registered mixer, sorted."""
    _load_builtin_mixers()
    return sorted(_REGISTRY)


def get_entry(name: str) -> MixerEntry:
    _load_builtin_mixers()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_config(name: str, **overrides: Any):
    """The frozen config of mixer `name` with `overrides` applied (validated)."""
    entry = get_entry(name)
    return make_config(entry.config_cls, owner=f"mixer {name!r}", **overrides)


def build_mixer(name: str, device=None, dtype=None, **overrides: Any):
    """Instantiate mixer `name`; keyword arguments override fields of its config."""
    entry = get_entry(name)
    return entry.mixer_cls(build_config(name, **overrides), device=device, dtype=dtype)


# build_block moved beside Block (seqarch.models.block; also `seqarch.build_block`), so this module imports no
# model code (issue #17). The old path warns for one release.
__getattr__ = moved_names(__name__, {"build_block": "seqarch.models.block"})
