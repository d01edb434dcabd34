"""The import direction of the shared plumbing (issue #17 part 4), and the old paths of what moved.

Low modules (the usage error and the override parser, run folders and checkpoints, the registry, the
model code) import nothing from train/, evals/, bench/ or the CLI; evals/ does not import train/;
there is one `key=value` parser. The old import paths keep working for one release with a
DeprecationWarning naming the new one.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "seqarch"
HIGH = ("seqarch.train", "seqarch.evals", "seqarch.bench", "seqarch.cli")
LOW_MODULES = ("overrides.py", "runs.py", "configs.py", "registry.py", "positional.py", "models/block.py",
               "models/lora.py", "models/mlp.py", "models/lm.py")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def reaches(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names if any(name == p or name.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("relative", LOW_MODULES)
def test_low_modules_import_no_higher_layer(relative):
    assert reaches(imported_modules(PACKAGE / relative), HIGH) == [], f"seqarch/{relative} imports a higher layer"


def test_the_usage_error_module_imports_nothing_of_seqarch_and_the_registry_no_model_code():
    assert reaches(imported_modules(PACKAGE / "overrides.py"), ("seqarch",)) == []
    assert reaches(imported_modules(PACKAGE / "registry.py"), ("seqarch.models",)) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "evals").glob("*.py")), ids=lambda path: path.name)
def test_evals_do_not_import_train(path):
    assert reaches(imported_modules(path), ("seqarch.train",)) == []


def test_importing_evals_bench_and_the_low_modules_loads_no_training_code():
    code = ("import sys, seqarch.evals, seqarch.bench, seqarch.runs, seqarch.overrides, seqarch.models.lora; "
            "print(sorted(m for m in sys.modules if m.startswith('seqarch.train')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_one_key_value_parser():
    """Only seqarch/overrides.py turns `key=value` strings into values; every command goes through it."""
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if "from_dotlist" in path.read_text())
    assert users == ["overrides.py"]


MOVED = [
    ("seqarch.train.config", "parse_overrides", "seqarch.overrides"),
    ("seqarch.train.runs", "RunStopped", "seqarch.runs"),
    ("seqarch.train.runs", "claim_run_dir", "seqarch.runs"),
    ("seqarch.train.runs", "read_checkpoint", "seqarch.runs"),
    ("seqarch.train.runs", "load_checkpoint_file", "seqarch.runs"),
    ("seqarch.train.runs", "resolve_checkpoint", "seqarch.runs"),
    ("seqarch.train.runs", "finite_or_null", "seqarch.runs"),
    ("seqarch.train.runs", "strict_json", "seqarch.runs"),
    ("seqarch.train.runs", "write_json", "seqarch.runs"),
    ("seqarch.train.extend", "model_from_checkpoint", "seqarch.runs"),
    ("seqarch.train.lora", "LoRALinear", "seqarch.models.lora"),
    ("seqarch.train.lora", "apply_lora", "seqarch.models.lora"),
    ("seqarch.train.lora", "merge_lora", "seqarch.models.lora"),
    ("seqarch.train.lora", "ATTENTION_PROJECTIONS", "seqarch.models.lora"),
    ("seqarch.registry", "build_block", "seqarch.models.block"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{old}.{name}" for old, name, _ in MOVED])
def test_old_paths_warn_and_give_the_moved_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        moved = getattr(module, name)
    assert moved is getattr(importlib.import_module(new), name)


def test_from_import_of_an_old_path_warns_and_unknown_names_still_fail():
    with pytest.warns(DeprecationWarning, match="seqarch.runs.read_checkpoint"):
        from seqarch.train.runs import read_checkpoint
    from seqarch.runs import read_checkpoint as new

    assert read_checkpoint is new
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = importlib.import_module("seqarch.train.runs").nothing


def test_config_error_is_one_class_on_every_path():
    from seqarch.overrides import ConfigError
    from seqarch.train import ConfigError as from_train
    from seqarch.train.config import ConfigError as from_config

    assert ConfigError is from_train is from_config and issubclass(ConfigError, ValueError)


def test_eval_config_checks_its_fields_and_the_old_dict_api_warns():
    from seqarch.evals.command import EvalConfig, parse_eval_config, parse_eval_options
    from seqarch.overrides import ConfigError

    config = parse_eval_config(["ckpt=runs/x", "task=passkey", "lengths=[64,128]", "depths=[0,1]"])
    assert config == EvalConfig(ckpt="runs/x", task="passkey", lengths=(64, 128), depths=(0.0, 1.0))
    with pytest.raises(ConfigError, match="task must be one of ppl, passkey, got 'nope'"):
        EvalConfig(ckpt="x", task="nope")
    with pytest.raises(ConfigError, match="unknown key 'length' for eval; valid keys: ckpt, task, lengths"):
        parse_eval_config(["ckpt=x", "task=ppl", "length=[8]"])
    with pytest.warns(DeprecationWarning, match="use parse_eval_config"):
        options = parse_eval_options(["ckpt=runs/x", "task=passkey", "lengths=[64,128]", "depths=[0,1]"])
    assert options == config.to_dict() and options["lengths"] == [64, 128] and options["depths"] == [0.0, 1.0]


def test_train_takes_a_run_config(capsys):
    """The typed entry point: `train(RunConfig)`; `fit(args)` resolves the arguments and calls it."""
    from seqarch.train import load_recipe, resolve, train
    from seqarch.train.fit import fit

    config = resolve(load_recipe("s4d"), {"print_config": True, "model.d_model": 32})
    assert train(config) is None
    printed = capsys.readouterr().out
    assert printed == config.to_yaml()
    assert fit(["recipe=s4d", "print_config=true", "model.d_model=32"]) is None
    assert capsys.readouterr().out == printed
