"""The `seqarch` command line: `seqarch list`."""

from __future__ import annotations

import sys

from seqarch.configs import config_fields
from seqarch.registry import get_entry, list_mixers


def _list() -> int:
    print("mixers:")
    for name in list_mixers():
        entry = get_entry(name)
        fields = ", ".join(f"{key}: {kind}" for key, kind in config_fields(entry.config_cls).items())
        print(f"  {name:<10} {entry.mixer_cls.__name__:<12} {fields}")
    return 0


COMMANDS = {"list": _list}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = argv[0] if argv else "nothing"
        print(f"seqarch: unknown command {given!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]]()


if __name__ == "__main__":
    sys.exit(main())
