"""Typed, frozen mixer configs: build one from keyword overrides with clear errors.

Every mixer owns a frozen dataclass config. `make_config(cls, **overrides)` is the one
place where user input (Python kwargs, YAML, `key=value` on the command line) becomes such a
config, so every unknown key and every ill-typed value fails the same way: a `ValueError`
naming the key and what is valid.

Renamed keys stay accepted for one release: a config class lists them as
`_renamed: ClassVar[dict[str, str]] = {"scan": "backend"}` (old key -> new key), and, where old
values changed name too, `_renamed_values: ClassVar[dict[str, dict]] = {"backend": {"chunkwise":
"chunked"}}`. `make_config` maps them and emits a DeprecationWarning naming the new spelling.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_MISSING_HINT = object()


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in get_args(hint))
    if origin is tuple:
        args = get_args(hint)
        inner = _describe(args[0]) if args else "Any"
        return f"tuple[{inner}, ...]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return (ok, value) where value is converted to `hint` when that loses nothing."""
    origin = get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin is Literal:
        return value in get_args(hint), value
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False, value
        args = get_args(hint)
        item_hint = args[0] if args else Any
        converted = []
        for item in value:
            ok, item = _coerce(item, item_hint)
            if not ok:
                return False, value
            converted.append(item)
        return True, tuple(converted)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def make_config(config_cls: type, owner: str = "", **overrides: Any):
    """Build `config_cls(**overrides)`, raising ValueError on unknown or ill-typed keys.

    `owner` names the thing being configured in the message (e.g. "mixer 'mamba'"). A config class may
    define `invalid_value_hint(key, value) -> str`, a pointer added to the message for a value outside
    a field's choices (e.g. attention's positional="sinusoidal": "add them at the embedding").
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = get_type_hints(config_cls)
    owner = owner or config_cls.__name__
    overrides = _apply_renames(config_cls, owner, overrides)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key {unknown[0]!r} for {owner}; valid keys: {', '.join(sorted(fields))}"
        )
    converted = {}
    for key, value in overrides.items():
        hint = hints.get(key, _MISSING_HINT)
        if hint is _MISSING_HINT:
            converted[key] = value
            continue
        ok, value_converted = _coerce(value, hint)
        if not ok:
            hint_for = getattr(config_cls, "invalid_value_hint", None)  # a config's pointer for a known mistake
            note = hint_for(key, value) if hint_for is not None else ""
            raise ValueError(
                f"config key {key!r} for {owner} must be {_describe(hint)}, got {value!r}"
                f" ({type(value).__name__})" + (f"; {note}" if note else "")
            )
        converted[key] = value_converted
    return config_cls(**converted)


_PACKAGE = str(Path(__file__).resolve().parent)


def outside_stacklevel() -> int:
    """The `warnings.warn` stacklevel of the first caller outside seqarch (so the warning names the
    user's line, whatever path led here: build_mixer, SeqLM, a recipe, a config's __post_init__; the
    `__init__` that dataclasses generate has no file, "<string>", and counts as inside)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == "<string>"
                                 or str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE)):
        frame, level = frame.f_back, level + 1
    return level


def moved_names(old_module: str, moves: dict[str, str]):
    """A module-level `__getattr__` for `old_module` whose names in `moves` (name -> new module) now
    live elsewhere: each access returns the new object with a DeprecationWarning naming the new path."""

    def __getattr__(name: str):
        if name not in moves:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(f"{old_module}.{name} moved to {moves[name]}.{name}; the old path is deprecated and will be "
                      "removed in the next release", DeprecationWarning, stacklevel=outside_stacklevel())
        return getattr(importlib.import_module(moves[name]), name)

    return __getattr__


def _apply_renames(config_cls: type, owner: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with deprecated keys and values of `config_cls` replaced by their new names."""
    renamed = getattr(config_cls, "_renamed", {})
    renamed_values = getattr(config_cls, "_renamed_values", {})
    result = dict(overrides)
    for old, new in renamed.items():
        if old not in result:
            continue
        if new in result:
            raise ValueError(f"config keys {old!r} and {new!r} for {owner} name the same thing; give only {new!r}")
        warnings.warn(f"config key {old!r} for {owner} is deprecated and will be removed in the next release; "
                      f"use {new!r}", DeprecationWarning, stacklevel=outside_stacklevel())
        result[new] = result.pop(old)
    for key, values in renamed_values.items():
        value = result.get(key)
        if isinstance(value, str) and value in values:
            warnings.warn(f"{key}={value!r} for {owner} is deprecated and will be removed in the next release; "
                          f"use {key}={values[value]!r}", DeprecationWarning, stacklevel=outside_stacklevel())
            result[key] = values[value]
    return result


def config_fields(config_cls: type) -> dict[str, str]:
    """Map each init field of `config_cls` to a readable type description."""
    hints = get_type_hints(config_cls)
    return {f.name: _describe(hints[f.name]) for f in dataclasses.fields(config_cls) if f.init}


__all__ = ["make_config", "config_fields", "outside_stacklevel"]
