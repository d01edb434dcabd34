"""Run configuration: recipes (YAML), `key=value` overrides, typed validation.

    config = load_config(["recipe=mamba", "model.d_model=256", "data=mqar", "trainer.max_steps=500"])

A recipe is a YAML file with the sections `model`, `data`, `optim`, `trainer` (and `seed`); it may
start from another with `extends: <name or path>` (every built-in recipe extends `base`). `recipe=`
takes a built-in name (seqarch/recipes/<name>.yaml) or a path to a YAML file. Overrides are parsed
by `seqarch.overrides.parse_overrides` (OmegaConf's dot-list grammar: `256` is an int, `true` a bool,
`[a,b]` a list; bad input raises `seqarch.overrides.ConfigError`) and applied in order, except that
`data=<source>` is applied first: it replaces the data section by that source's defaults, so
`data=mqar data.num_kv_pairs=4` and `data.num_kv_pairs=4 data=mqar` mean the same.

Validation happens here, once, with one ValueError naming the key and what is valid: the optim,
trainer and data sections are frozen dataclasses checked by `seqarch.configs.make_config`; the
model section is SeqLM's keyword arguments, checked by building the model (`check_model`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf

from seqarch.configs import make_config, moved_names
from seqarch.data.sources import DATA_SOURCES, data_config
from seqarch.overrides import ConfigError  # its home; importable from here as before
from seqarch.registry import list_mixers

RUN_KEYS = ("recipe", "ckpt", "init_from", "seed", "out_dir", "run_dir", "print_config")
SECTIONS = ("model", "data", "optim", "trainer", "lora")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate, reached after warmup
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices only (see train/module.py)
    beta1: float = 0.9
    beta2: float = 0.95  # 0.95 rather than 0.999: steadier with short runs and large lr
    eps: float = 1e-8
    warmup_steps: int = 50  # linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio at trainer.max_steps
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off

    def __post_init__(self):
        for key in ("lr", "weight_decay", "beta1", "beta2", "eps", "min_lr_ratio", "grad_clip"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"optim.{key} must be a finite number, got {getattr(self, key)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError("optim: need lr > 0, weight_decay >= 0, grad_clip >= 0, warmup_steps >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("beta1", "beta2"):  # AdamW's moment decays: 1 or more never forgets (or grows)
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.eps <= 0:  # AdamW divides by sqrt(v) + eps
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 500  # optimizer steps in total (a resumed run continues to this count)
    val_every: int = 100  # steps between validations (and a final one at max_steps)
    val_batches: int = 20  # validation batches per validation: bounds its cost
    log_every: int = 10  # steps between rows of metrics.csv
    precision: Literal["32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    accelerator: str = "cpu"  # Lightning accelerator: cpu, gpu, auto
    devices: int = 1  # processes (DDP) or devices per node; under torchrun / srun: the processes per node
    num_nodes: int = 1  # machines; under torchrun / srun it must match the launch (Lightning checks)
    strategy: str = "auto"  # Lightning strategy: auto, ddp, fsdp, ...
    num_threads: int = 0  # torch intra-op threads per process; 0: all cores split across processes
    progress: bool = True  # the progress bar (off in tests and logs)

    def __post_init__(self):
        if self.max_steps < 1 or self.val_every < 1 or self.val_batches < 1 or self.log_every < 1:
            raise ValueError("trainer: max_steps, val_every, val_batches and log_every must be >= 1")
        if self.devices < 1 or self.num_nodes < 1 or self.num_threads < 0:
            raise ValueError("trainer: need devices >= 1, num_nodes >= 1 and num_threads >= 0")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0  # LoRA rank on the attention projections (seqarch/models/lora.py); 0: no adapters
    alpha: float = 16.0  # the update is scaled by alpha / rank
    train_embeddings_and_norms: bool = True  # LongLoRA: embeddings and norms stay trainable beside the adapters

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0:
            raise ValueError(f"lora: need rank >= 0 and alpha > 0, got rank={self.rank}, alpha={self.alpha}")


@dataclass(frozen=True)
class RunConfig:
    """The resolved, validated configuration of one run."""

    recipe: str
    seed: int
    out_dir: str  # runs go to <out_dir>/<recipe>/<timestamp>/
    run_dir: str | None  # an explicit run folder instead; it must not exist
    ckpt: str | None  # resume from this checkpoint (or run folder)
    print_config: bool
    model: dict
    data: dict  # {"source": name, **that source's config}
    optim: OptimConfig
    trainer: TrainerConfig
    lora: LoRAConfig = LoRAConfig()
    init_from: str | None = None  # start from these weights (a new run, step 0), as recipe=extend does

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "seed": self.seed, "out_dir": self.out_dir, "run_dir": self.run_dir,
                "ckpt": self.ckpt, "print_config": self.print_config, "model": dict(self.model),
                "data": dict(self.data), "optim": dataclasses.asdict(self.optim),
                "trainer": dataclasses.asdict(self.trainer), "lora": dataclasses.asdict(self.lora),
                "init_from": self.init_from}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def recipes_dir() -> Path:
    return Path(str(resources.files("seqarch") / "recipes"))


# Built-in recipes that are not an architecture: the base they share, and `extend`, which fine-tunes a
# checkpoint at a longer length (it needs ckpt=, see seqarch/train/extend.py).
_NOT_ARCHITECTURES = ("base", "extend")


def list_recipes() -> list[str]:
    """Built-in architecture recipe names (the base and `extend` excluded)."""
    return sorted(path.stem for path in recipes_dir().glob("*.yaml") if path.stem not in _NOT_ARCHITECTURES)


def _recipe_path(recipe: str) -> Path:
    path = recipes_dir() / f"{recipe}.yaml"
    if path.is_file():
        return path
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe).expanduser()
        if path.is_file():
            return path
        raise ConfigError(f"recipe file {recipe!r} does not exist; built-in recipes: {', '.join(list_recipes())}")
    raise ConfigError(f"unknown recipe {recipe!r}; valid: {', '.join(list_recipes())}, or a path to a YAML file")


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe with its `extends` chain merged in (the file's own keys win)."""
    if path in seen:
        raise ConfigError(f"recipe {path} extends itself through {' -> '.join(map(str, seen))}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(content, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(content).__name__}")
    parent = content.pop("extends", None)
    if parent is None:
        return content
    base = _load_yaml(_recipe_path(str(parent)) if "/" not in str(parent) else path.parent / parent, (*seen, path))
    return OmegaConf.to_container(OmegaConf.merge(base, content))


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for index, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parents[:index + 1])} is {child!r}, not a section")
        node = child
    node[leaf] = value


def check_mixers(model: dict) -> None:
    """Every mixer the model names must be registered; the message lists those that are."""
    names = model.get("mixer")
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"model.mixer must be a mixer name or a list of names, got {names!r}")
    registered = list_mixers()
    for name in names:
        if name not in registered:
            raise ConfigError(f"mixer {name!r} is not registered (yet); registered: {', '.join(registered)}")


def check_precision(model: dict, precision: str) -> None:
    """Mixers that compute in complex numbers cannot hold bfloat16 weights (torch has no complex bfloat16)."""
    from seqarch.models.lm import COMPLEX_MIXERS

    names = [model["mixer"]] if isinstance(model["mixer"], str) else model["mixer"]
    complex_names = sorted(set(names) & set(COMPLEX_MIXERS))
    if precision == "bf16-true" and complex_names:
        raise ConfigError(f"trainer.precision=bf16-true cannot run mixer {complex_names[0]!r}: it computes in complex "
                          "numbers and torch has no complex bfloat16; use bf16-mixed (weights stay float32), "
                          "32-true or 64-true")


def resolve(tree: dict, overrides: dict[str, Any]) -> RunConfig:
    """Apply `overrides` to a recipe tree and validate every section."""
    tree = {key: (dict(value) if isinstance(value, dict) else value) for key, value in tree.items()}
    ordered = sorted(overrides.items(), key=lambda item: item[0] not in ("data", "data.source"))
    for key, value in ordered:
        if key in ("data", "data.source"):
            if not isinstance(value, str):
                raise ConfigError(f"{key} must name a data source; valid: {', '.join(DATA_SOURCES)}")
            tree["data"] = {"source": value}
            continue
        root = key.split(".")[0]
        if root not in RUN_KEYS and root not in SECTIONS:
            raise ConfigError(f"unknown key {key!r}; valid top-level keys: {', '.join(RUN_KEYS + SECTIONS)}")
        if root in SECTIONS and key == root:
            raise ConfigError(f"{key}=... cannot replace a whole section; set {key}.<field>=... instead")
        _set(tree, key, value)
    unknown = sorted(set(tree) - set(RUN_KEYS) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid top-level keys: {', '.join(RUN_KEYS + SECTIONS)}")
    try:
        run = make_config(_RunKeys, owner="the run", **{k: tree[k] for k in RUN_KEYS if k in tree})
        data = dict(tree.get("data") or {})
        source = data.pop("source", "stdlib")
        data_values = dataclasses.asdict(data_config(source, **data))
        optim = make_config(OptimConfig, owner="optim", **(tree.get("optim") or {}))
        trainer = make_config(TrainerConfig, owner="trainer", **(tree.get("trainer") or {}))
        lora = make_config(LoRAConfig, owner="lora", **(tree.get("lora") or {}))
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error
    model = dict(tree.get("model") or {})
    check_mixers(model)
    check_precision(model, trainer.precision)
    return RunConfig(recipe=run.recipe, seed=run.seed, out_dir=run.out_dir, run_dir=run.run_dir, ckpt=run.ckpt,
                     print_config=run.print_config, model=model, data={"source": source, **data_values},
                     optim=optim, trainer=trainer, lora=lora, init_from=run.init_from)


@dataclass(frozen=True)
class _RunKeys:
    recipe: str = "custom"
    seed: int = 0
    out_dir: str = "runs"
    run_dir: str | None = None
    ckpt: str | None = None
    init_from: str | None = None
    print_config: bool = False


def load_recipe(recipe: str) -> dict:
    """The merged tree of a recipe (name or path), with `recipe` set to its name."""
    path = _recipe_path(recipe)
    tree = _load_yaml(path)
    tree["recipe"] = path.stem
    return tree


# parse_overrides moved to seqarch.overrides (issue #17): the old path warns for one release.
__getattr__ = moved_names(__name__, {"parse_overrides": "seqarch.overrides"})

__all__ = ["ConfigError", "LoRAConfig", "OptimConfig", "RunConfig", "TrainerConfig", "check_mixers", "check_precision",
           "list_recipes", "load_recipe", "recipes_dir", "resolve"]
