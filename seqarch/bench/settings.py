"""What a benchmark sweep measures: `BenchSettings`, parsed from `key=value` overrides.

    seqarch bench mixers=all seq_lens=[256,512,1024] modes=[train,prefill,decode] d_model=256
    seqarch bench mixers=attention,s4d seq_lens=256..16384 attention.n_heads=4 match_params=true

A key that names a registered mixer takes that mixer's config overrides (`s4d.d_state=32`), as
`SeqLM` does. `seq_lens=A..B` is every power-of-two multiple of A up to B. Every bad key or value
raises one ValueError naming what is wrong and what is valid.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from seqarch.bench.quality import GRIDS
from seqarch.configs import make_config
from seqarch.overrides import ConfigError
from seqarch.overrides import parse_overrides as parse_key_values
from seqarch.registry import build_config, get_entry, list_mixers

MODES = ("train", "prefill", "decode")
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BenchSettings:
    mixers: tuple[str, ...] = ()  # registry names; empty (or "all"): every registered mixer
    seq_lens: tuple[int, ...] = (256, 512, 1024, 2048, 4096)  # sequence lengths L (decode: prefix length)
    modes: tuple[str, ...] = MODES  # train = forward + backward, prefill, decode = one token after L
    d_model: int = 256  # the same width for every mixer (fair by default)
    n_layers: int = 2  # the same depth for every mixer
    batch_size: int = 1  # sequences per case
    vocab_size: int = 256  # small, so the embedding and head do not dominate the mixer
    mlp: bool = True  # SwiGLU MLP in every block (mixers that bring their own channel mixer use it)
    match_params: bool = False  # instead of equal width: widen/narrow each mixer to the reference's parameters
    reference: str = "attention"  # mixer that crossovers and parameter matching compare against
    dtype: str = "float32"  # parameter and activation dtype
    device: str = "cpu"  # "cpu" (peak RSS) or "cuda" (torch.cuda.max_memory_allocated)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)  # torch threads in each case
    warmup: int = 1  # untimed runs before timing (first-call allocations, kernel caches)
    repeats: int = 5  # timed runs per case; the median is reported
    decode_tokens: int = 8  # tokens per timed decode run (latency = run time / decode_tokens)
    rounds: int = 1  # passes over the whole grid, interleaved (A B A B); samples are pooled
    budget_s: float = 120.0  # wall time per case subprocess; a slower case is recorded "over_budget"
    sweep_budget_s: float = 0.0  # wall time for the whole sweep (0: none); later cases are recorded "skipped"
    seed: int = 0  # torch seed in every case
    out: str = "bench_results"  # directory for results.json, results.csv, report.md and plots
    overwrite: bool = False  # write into an `out` that already holds files (they may be replaced)
    note: str = ""  # free text printed at the top of the report (e.g. "machine shared with 7 jobs")
    quality: str = ""  # MQAR accuracy section: "" none, "true" run the sweep first, else a quality.json path
    quality_grid: str = "quick"  # with quality=true: a preset of seqarch.bench.quality.GRIDS ("zoology": ~2 days)
    extrapolate: str = "llama-2-13b"  # model shape for the report's analytic section (see accounting.PRESETS)
    extrapolate_lens: tuple[int, ...] = (4096, 32768, 131072)  # lengths for the analytic section
    mixer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-mixer config keys

    def __post_init__(self):
        registered = list_mixers()
        unknown = [name for name in self.mixers if name not in registered]
        if unknown:
            raise ValueError(f"bench: unknown mixer {unknown[0]!r}; registered mixers: {', '.join(registered)}")
        bad_modes = [mode for mode in self.modes if mode not in MODES]
        if bad_modes or not self.modes:
            raise ValueError(f"bench: modes={list(self.modes)}; valid modes: {', '.join(MODES)}")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ValueError(f"bench: seq_lens must be positive integers, got {list(self.seq_lens)}")
        for name in ("d_model", "n_layers", "batch_size", "vocab_size", "threads", "repeats", "decode_tokens",
                     "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"bench: warmup must be >= 0, got {self.warmup}")
        if self.budget_s <= 0 or self.sweep_budget_s < 0:
            raise ValueError(f"bench: need budget_s > 0 and sweep_budget_s >= 0, got {self.budget_s}, "
                             f"{self.sweep_budget_s}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench: dtype={self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise ValueError(f"bench: device={self.device!r}; valid: {', '.join(DEVICES)}")
        if self.quality_grid not in GRIDS:
            raise ValueError(f"bench: quality_grid={self.quality_grid!r}; valid: {', '.join(GRIDS)}")
        for name, overrides in self.mixer_overrides.items():
            build_config(name, **{"d_model": self.d_model, **overrides})  # fails early, naming the key

    @property
    def mixer_names(self) -> list[str]:
        """The mixers to run: as given, or every registered one in registry order."""
        return list(self.mixers) if self.mixers else list_mixers()

    def mixer_kwargs(self, name: str) -> dict[str, Any]:
        """The mixer's config overrides. A mixer with a `max_len` field (Hyena's implicit filters
        exist only below it) gets the longest sequence the sweep runs, prefix plus decoded tokens,
        unless the user set max_len."""
        kwargs = dict(self.mixer_overrides.get(name, {}))
        config_cls = get_entry(name).config_cls
        if "max_len" in {f.name for f in dataclasses.fields(config_cls)} and "max_len" not in kwargs:
            kwargs["max_len"] = max(config_cls.max_len, max(self.seq_lens) + self.decode_tokens)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_names(key: str, value: Any) -> tuple[str, ...]:
    """`all`, `a,b` or `[a, b]` -> a tuple of names (empty for all)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"bench: {key} must be a name, a comma-separated list or [a,b], got {value!r}")
    return () if list(value) == ["all"] else tuple(value)


def _as_lengths(key: str, value: Any) -> Any:
    """`A..B` -> A, 2A, 4A, ... <= B; anything else is left to the typed config check."""
    if isinstance(value, str) and ".." in value:
        start, _, stop = value.partition("..")
        if not (start.isdigit() and stop.isdigit()) or int(start) < 1 or int(start) > int(stop):
            raise ValueError(f"bench: {key}={value!r}; a range is START..STOP with 1 <= START <= STOP, e.g. 256..16384")
        lengths, length = [], int(start)
        while length <= int(stop):
            lengths.append(length)
            length *= 2
        return lengths
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return value


def parse_overrides(overrides: list[str], config_cls: type, owner: str) -> dict[str, Any]:
    """`["a=1", "b=[2,3]", "s4d.d_state=8"]` -> {"a": 1, "b": [2, 3], "mixer_overrides": {"s4d": {...}}}.
    The `key=value` grammar is `seqarch.overrides.parse_overrides` (the one parser of every command);
    this sorts its keys into fields of `config_cls` and per-mixer config keys."""
    try:
        flat = parse_key_values(list(overrides))
    except ConfigError as error:
        raise ValueError(f"{owner}: {error}") from None
    parsed: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = parsed
        for index, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{owner}: cannot set {dotted!r}: {'.'.join(parents[:index + 1])} is {child!r}, "
                                 "not a section")
            node = child
        node[leaf] = value
    registered = set(list_mixers())
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"mixer_overrides"}
    values: dict[str, Any] = {}
    mixer_overrides: dict[str, dict[str, Any]] = {}
    for key, value in parsed.items():
        if key in registered:
            if not isinstance(value, dict):
                raise ValueError(f"{owner}: {key}=... must set config keys, e.g. {key}.d_state=16; got {value!r}")
            mixer_overrides[key] = value
        elif key in fields:
            values[key] = value
        else:
            raise ValueError(f"{owner}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}, "
                             f"or a mixer name ({', '.join(sorted(registered))}) with its config keys")
    for key in ("mixers", "modes"):
        if key in values:
            values[key] = _as_names(key, values[key])
    for key in ("seq_lens", "extrapolate_lens"):
        if key in values:
            values[key] = _as_lengths(key, values[key])
    if mixer_overrides:
        values["mixer_overrides"] = mixer_overrides
    return values


def parse_bench_settings(overrides: list[str]) -> BenchSettings:
    """The settings of `seqarch bench key=value ...`."""
    values = parse_overrides(overrides, BenchSettings, "seqarch bench")
    if isinstance(values.get("quality"), bool):  # OmegaConf reads quality=true as a bool
        values["quality"] = "true" if values["quality"] else ""
    mixer_overrides = values.pop("mixer_overrides", {})
    settings = make_config(BenchSettings, owner="seqarch bench", **values)
    return dataclasses.replace(settings, mixer_overrides=mixer_overrides) if mixer_overrides else settings
