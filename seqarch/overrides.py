"""Command-line input: the usage-error type and the one `key=value` parser every command uses.

    parse_overrides(["model.d_model=256", "data=mqar", "lengths=[64,128]"])
    # {"model.d_model": 256, "data": "mqar", "lengths": [64, 128]}

Values follow OmegaConf's dot-list grammar (`256` is an int, `true` a bool, `[a,b]` a list).
`ConfigError` is bad user input: the CLI prints its message as one line and exits with code 2.
This module sits below train/, evals/ and bench/ and imports none of them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """Bad user input: the CLI prints the message as one line and exits with code 2."""


def parse_overrides(args: list[str], raw_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """`key=value` strings -> {dotted key: typed value} (OmegaConf's grammar), in order. Values of
    `raw_keys` stay the exact string after the first `=` (OmegaConf would trim whitespace)."""
    parsed: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {arg!r}")
        if key in raw_keys:
            parsed[key] = raw
            continue
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([arg]))
        except OmegaConfBaseException as error:
            raise ConfigError(f"cannot parse {arg!r}: {str(error).splitlines()[0]}") from error
        for part in key.split("."):
            value = value[part]
        parsed[key] = value
    return parsed


__all__ = ["ConfigError", "parse_overrides"]
