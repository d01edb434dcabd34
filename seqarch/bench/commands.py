"""`seqarch bench` and `seqarch memory`: the command-line entry points of seqarch.bench.

    seqarch bench mixers=all seq_lens=256..16384 modes=[train,prefill,decode] out=bench_results
    seqarch bench quality=true quality_grid=quick        # also train each mixer on MQAR (the quick preset)
    seqarch memory model=llama-2-13b mixers=attention,s4d seq_lens=[4096,131072]

Both take `key=value` overrides and return an exit code; bad input raises one ValueError (the CLI
turns it into a one-line message and exit code 2). `bench` refuses an `out` folder that already
holds files unless overwrite=true: earlier results are never replaced silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqarch.bench.accounting import PRESETS, ModelShape, account, shape_from
from seqarch.bench.machine import machine_info
from seqarch.bench.quality import quality_settings, run_quality_sweep
from seqarch.bench.report import format_bytes, format_count, load_quality, write_report
from seqarch.bench.runner import Executor, run_case, run_sweep
from seqarch.bench.settings import BenchSettings, parse_bench_settings, parse_overrides
from seqarch.configs import make_config
from seqarch.registry import list_mixers


def bench_shape(settings: BenchSettings, mixer: str, d_model: int) -> ModelShape:
    overrides = tuple((name, tuple(values.items())) for name, values in settings.mixer_overrides.items())
    return ModelShape(d_model, settings.n_layers, settings.vocab_size, settings.dtype, True, settings.mlp, overrides)


def quality_rows(settings: BenchSettings, progress=print) -> list[dict[str, Any]] | None:
    """The MQAR rows of the report: none, a fresh sweep (quality=true, written to <out>/quality/quality.json
    with the run folders beside it) or rows written earlier (quality=<path>)."""
    if not settings.quality:
        return None
    if settings.quality != "true":
        return load_quality(settings.quality)
    sweep = quality_settings(settings.quality_grid, mixers=settings.mixers, out=str(Path(settings.out) / "quality"))
    return run_quality_sweep(sweep, progress)


def run_bench(settings: BenchSettings, progress=print, execute: Executor = run_case) -> Path:
    """Run the sweep of `settings` and write its files; returns the report's path.
    `execute(spec, budget_s)` runs one case (default: a fresh subprocess, see runner.run_case)."""
    quality = quality_rows(settings, progress)
    large_shape = shape_from(settings.extrapolate, {})
    machine = machine_info()
    rows = run_sweep(settings, progress, execute)
    widths = {row["mixer"]: row["d_model"] for row in rows}
    lengths = sorted(set(settings.seq_lens))
    analytic_bench = [entry for mixer in settings.mixer_names
                      for entry in account(mixer, bench_shape(settings, mixer, widths[mixer]), lengths,
                                           settings.batch_size)]
    analytic_large = [entry for mixer in settings.mixer_names
                      for entry in account(mixer, large_shape, list(settings.extrapolate_lens))]
    context = {"machine": machine, "settings": settings.to_dict(), "extrapolate": settings.extrapolate,
               "analytic_bench": analytic_bench, "analytic_large": analytic_large}
    return write_report(rows, Path(settings.out), context, analytic_bench, analytic_large, quality)


def bench_command(overrides: list[str]) -> int:
    """`seqarch bench key=value ...`: measure every mixer x length x mode and write the report."""
    settings = parse_bench_settings(overrides)
    if settings.extrapolate not in PRESETS:
        raise ValueError(f"seqarch bench: extrapolate={settings.extrapolate!r}; valid: {', '.join(PRESETS)}")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"seqarch bench: out={settings.out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not settings.overwrite:
        raise ValueError(f"seqarch bench: out={settings.out} already exists and is not empty; choose a new folder, "
                         "or pass overwrite=true to write into it (its results may be replaced)")
    report = run_bench(settings)
    print(f"seqarch bench: wrote {report} (results.json, results.csv and plots beside it)")
    return 0


@dataclass(frozen=True)
class MemorySettings:
    model: str = ""  # a preset shape (see accounting.PRESETS); its fields can be overridden below
    mixers: tuple[str, ...] = ()  # registry names; empty (or "all"): every registered mixer
    seq_lens: tuple[int, ...] = (4096, 32768, 131072)  # context lengths to account for
    batch_size: int = 1  # sequences held at once
    d_model: int | None = None  # width (None: the preset's, else 256)
    n_layers: int | None = None  # depth (None: the preset's, else 2)
    vocab_size: int | None = None  # vocabulary (None: the preset's, else 256)
    dtype: str | None = None  # parameter / state dtype (None: the preset's, else float32)
    tie_embeddings: bool | None = None  # head shares the embedding (None: the preset's)
    mlp: bool | None = None  # SwiGLU MLP per block (None: the preset's, else on)
    mixer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-mixer config keys

    def __post_init__(self):
        registered = list_mixers()
        unknown = [name for name in self.mixers if name not in registered]
        if unknown:
            raise ValueError(f"seqarch memory: unknown mixer {unknown[0]!r}; "
                             f"registered mixers: {', '.join(registered)}")
        if not self.seq_lens or min(self.seq_lens) < 1 or self.batch_size < 1:
            raise ValueError(f"seqarch memory: seq_lens and batch_size must be positive, got {list(self.seq_lens)}, "
                             f"{self.batch_size}")

    def shape(self) -> ModelShape:
        overrides = {key: getattr(self, key) for key in ("d_model", "n_layers", "vocab_size", "dtype",
                                                          "tie_embeddings", "mlp") if getattr(self, key) is not None}
        base = shape_from(self.model or None, overrides)
        if self.mixer_overrides:
            merged = {name: dict(values) for name, values in base.mixer_overrides}
            for name, values in self.mixer_overrides.items():
                merged[name] = {**merged.get(name, {}), **values}
            base = dataclasses.replace(base, mixer_overrides=tuple((name, tuple(values.items()))
                                                                   for name, values in merged.items()))
        return base


def parse_memory_settings(overrides: list[str]) -> MemorySettings:
    values = parse_overrides(overrides, MemorySettings, "seqarch memory")
    mixer_overrides = values.pop("mixer_overrides", {})
    settings = make_config(MemorySettings, owner="seqarch memory", **values)
    return dataclasses.replace(settings, mixer_overrides=mixer_overrides) if mixer_overrides else settings


def memory_table(settings: MemorySettings) -> list[dict[str, Any]]:
    """Analytic rows (see accounting.account) for every mixer and length of `settings`."""
    shape = settings.shape()
    mixers = list(settings.mixers) or list_mixers()
    return [row for mixer in mixers for row in account(mixer, shape, list(settings.seq_lens), settings.batch_size)]


def memory_command(overrides: list[str]) -> int:
    """`seqarch memory key=value ...`: parameters, state / KV-cache bytes and FLOPs per token, analytically."""
    settings = parse_memory_settings(overrides)
    shape = settings.shape()
    rows = memory_table(settings)
    print(f"model: {settings.model or 'custom'}: d_model={shape.d_model}, n_layers={shape.n_layers}, "
          f"vocab={shape.vocab_size}, dtype={shape.dtype}, batch={settings.batch_size} (analytic, nothing allocated)")
    header = f"{'mixer':<12}{'L':>10}{'params':>10}{'weights':>12}{'state':>14}{'FLOPs/token':>14}"
    print(header)
    for row in rows:
        flops = format_count(row["flops_per_token"]) if row["flops_per_token"] is not None else (
            f">={format_count(row['matmul_flops_per_token'])}")
        print(f"{row['mixer']:<12}{row['seq_len']:>10,}{format_count(row['params']):>10}"
              f"{format_bytes(row['weight_bytes']):>12}{format_bytes(row['state_bytes']):>14}{flops:>14}")
    return 0
