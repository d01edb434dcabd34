"""The `seqarch` command line: `seqarch <command> key=value ...`.

    seqarch fit recipe=mamba                        train; results in runs/mamba/<timestamp>/
    seqarch fit recipe=s4d data=mqar trainer.max_steps=500 model.d_model=64
    seqarch fit ckpt=runs/mamba/<timestamp> trainer.max_steps=600      resume
    seqarch generate ckpt=runs/mamba/<timestamp> prompt="def " max_new_tokens=200
    seqarch list                                    mixers (and the path each runs here), recipes, data
    seqarch bench mixers=all seq_lens=256..4096     throughput / memory vs length, report with plots
    seqarch memory model=llama-2-13b seq_lens=[4096,131072]   analytic state / KV bytes and FLOPs
    seqarch eval ckpt=runs/mamba/<timestamp> task=ppl|passkey     long-context evals (seqarch/evals)

Every command takes `key=value` arguments only. Bad input (unknown command, recipe, key, data
source or mixer, a wrong type, a missing or corrupt checkpoint, an existing output folder) is
reported as one line on stderr with exit code 2 and no traceback. A run that starts but cannot
finish is one line on stderr too, with its own exit code: 3 when training diverged (a non-finite
loss), 130 when it was interrupted by Ctrl-C; the line says where the last checkpoint is. Adding a
command is one entry in COMMANDS: a function from the argument list to an exit code that raises
ConfigError on bad input. Each is a thin wrapper: it parses the arguments with
`seqarch.overrides.parse_overrides` into a typed config and calls the Python entry point
(`seqarch.train.fit.train(RunConfig)`, `seqarch.evals.run_eval(EvalConfig)`, `seqarch.bench.run_bench`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from seqarch.overrides import ConfigError
from seqarch.runs import RunStopped


def _fit(args: list[str]) -> int:
    from seqarch.train.fit import fit

    fit(args)
    return 0


def _generate(args: list[str]) -> int:
    from seqarch.train.fit import generate

    generate(args)
    return 0


def _bench(args: list[str]) -> int:
    from seqarch.bench import bench_command

    try:
        return bench_command(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _memory(args: list[str]) -> int:
    from seqarch.bench import memory_command

    try:
        return memory_command(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _eval(args: list[str]) -> int:
    from seqarch.evals import eval_command

    eval_command(args)
    return 0


def _list(args: list[str]) -> int:
    from seqarch.configs import config_fields
    from seqarch.data.sources import DATA_SOURCES
    from seqarch.registry import build_mixer, get_entry, list_mixers
    from seqarch.train.config import list_recipes, load_recipe

    if args:
        raise ConfigError(f"list takes no arguments, got {' '.join(args)}")
    print("mixers:")
    for name in list_mixers():
        entry = get_entry(name)
        fields = ", ".join(f"{key}: {kind}" for key, kind in config_fields(entry.config_cls).items())
        print(f"  {name:<14} {entry.mixer_cls.__name__:<12} {fields}")
        print(f"  {'':<14} runs here: {build_mixer(name, device='meta').describe_paths('cpu')}")
    registered = set(list_mixers())
    print("recipes:")
    for name in list_recipes():
        mixer = load_recipe(name)["model"]["mixer"]
        names = [mixer] if isinstance(mixer, str) else mixer
        missing = sorted(set(names) - registered)
        status = f"  (needs {', '.join(missing)}: not registered yet)" if missing else ""
        print(f"  {name:<14} {mixer if isinstance(mixer, str) else ' '.join(mixer)}{status}")
    print("data sources:")
    for name, source in DATA_SOURCES.items():
        print(f"  {name:<14} {source.summary}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "fit": _fit,
    "generate": _generate,
    "list": _list,
    "bench": _bench,
    "memory": _memory,
    "eval": _eval,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = argv[0] if argv else "nothing"
        print(f"seqarch: unknown command {given!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    try:
        return COMMANDS[command](args)
    except ConfigError as error:
        print(f"seqarch {command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a run started (a started run handles Ctrl-C itself)
        print(f"seqarch {command}: interrupted", file=sys.stderr)
        return 130
    except RunStopped as error:
        if str(error):  # empty on the other processes of a distributed run: the first one reports
            print(f"seqarch {command}: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
