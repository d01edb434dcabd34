"""The quality side of the benchmark: MQAR accuracy of each mixer vs model width and sequence length.

Legend: d model width (d_model), L sequence length, P key-value pairs per example, V vocabulary.

Multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving Recall in
Efficient Language Models", section 3 and figure 2): each mixer is trained from scratch on MQAR in
a two-layer SeqLM, once per (d, L) cell, through `seqarch.train.fit` (the same Lightning loop as
`seqarch fit`, no second training loop), and the final validation accuracy is recorded. As in
Zoology the number of pairs grows with the length, P = L / tokens_per_pair (24 -> 3, 48 -> 6 by
default). Every mixer gets the same block (the `base` recipe: mixer + SwiGLU MLP), the same data,
optimizer, learning rate and step budget; Zoology also sweeps the learning rate per mixer and keeps
the best, which this CPU budget does not allow, so a low number can mean "needs another lr or more
steps" as well as "cannot recall". The default is sized for one CPU thread: a small vocabulary, few
pairs, a high constant learning rate and no weight decay, so that 600 steps can form recall.

    rows = run_quality_sweep(QualitySettings(mixers=("rwkv6", "mamba")))
    [{"mixer": "rwkv6", "d_model": 32, "seq_len": 24, "num_kv_pairs": 3, "accuracy": 0.95, ...}, ...]

Grids: "cross" (the default) trains every width at the shortest length and every length at the
widest width, 2 + 2 - 1 = 3 cells per mixer for 2 widths and 2 lengths; "full" trains every
(width, length) pair. `GRIDS` names bounded presets for `seqarch bench quality=true quality_grid=...`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from seqarch.registry import list_mixers


@dataclass(frozen=True)
class QualitySettings:
    mixers: tuple[str, ...] = ()  # registry names; empty: every registered mixer
    widths: tuple[int, ...] = (32, 64)  # d_model values (Zoology sweeps 64..512 on GPUs)
    seq_lens: tuple[int, ...] = (24, 48)  # sequence lengths L
    grid: Literal["cross", "full"] = "cross"  # cross: widths at min L + lengths at max d; full: every pair
    tokens_per_pair: int = 8  # P = L / tokens_per_pair, pairs grow with L as in Zoology (24 -> 3, 48 -> 6)
    vocab_size: int = 32  # keys from [1, V/2), values from [V/2, V); Zoology uses 8192 on GPUs
    n_layers: int = 2  # Zoology's depth for MQAR
    steps: int = 600  # optimizer steps per cell (bounds the default sweep to ~20 min on one shared CPU thread)
    batch_size: int = 32  # examples per step
    lr: float = 1e-2  # one peak lr for every mixer (Zoology sweeps 1e-4..1e-2 and keeps the best)
    warmup_steps: int = 10  # linear warmup, then the lr is held (min_lr_ratio 1): short runs learn sooner
    min_lr_ratio: float = 1.0  # final lr / peak lr of the cosine decay; 1: constant after warmup
    weight_decay: float = 0.0  # AdamW decay; 0: small MQAR models learn sooner without it
    grad_clip: float = 0.0  # max gradient norm; 0: off
    num_train: int = 20000  # fixed training set, as Zoology trains on a fixed set
    num_val: int = 256  # validation examples; all of them are scored at the end
    threads: int = 1  # torch threads per run (1: the machine is usually shared)
    seed: int = 0  # seeds weights, data and data order
    budget_s: float = 0.0  # wall time for the whole sweep (0: none); later cells are recorded "skipped"
    out: str = "quality_results"  # run folders go to <out>/runs/, quality.json to <out>/

    def __post_init__(self):
        registered = list_mixers()
        unknown = [name for name in self.mixers if name not in registered]
        if unknown:
            raise ValueError(f"quality: unknown mixer {unknown[0]!r}; registered mixers: {', '.join(registered)}")
        if not self.widths or not self.seq_lens or min(self.widths) < 1:
            raise ValueError(f"quality: widths and seq_lens must be non-empty positive integers, got "
                             f"{list(self.widths)}, {list(self.seq_lens)}")
        if self.grid not in ("cross", "full"):
            raise ValueError(f"quality: grid={self.grid!r}; valid: cross, full")
        if self.tokens_per_pair < 4:
            raise ValueError(f"quality: tokens_per_pair must be >= 4 (MQAR needs L >= 4 P), got {self.tokens_per_pair}")
        too_short = [length for length in self.seq_lens if length < self.tokens_per_pair]
        if too_short:
            raise ValueError(f"quality: seq_len {too_short[0]} holds no pair at tokens_per_pair="
                             f"{self.tokens_per_pair}; use lengths >= {self.tokens_per_pair}")
        most_pairs = max(self.seq_lens) // self.tokens_per_pair
        if self.vocab_size < 2 * most_pairs + 2:
            raise ValueError(f"quality: vocab_size {self.vocab_size} has too few keys for {most_pairs} pairs; "
                             f"need vocab_size >= {2 * most_pairs + 2}")
        for name in ("n_layers", "steps", "batch_size", "num_train", "num_val", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"quality: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.budget_s < 0:
            raise ValueError(f"quality: need lr > 0 and budget_s >= 0, got {self.lr}, {self.budget_s}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"quality: need warmup_steps, weight_decay and grad_clip >= 0, got "
                             f"{self.warmup_steps}, {self.weight_decay}, {self.grad_clip}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"quality: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def mixer_names(self) -> list[str]:
        return list(self.mixers) if self.mixers else list_mixers()

    def cells(self) -> list[tuple[int, int]]:
        """(d_model, seq_len) pairs to train, width sweep first."""
        if self.grid == "full":
            return [(width, length) for length in sorted(self.seq_lens) for width in sorted(self.widths)]
        shortest, widest = min(self.seq_lens), max(self.widths)
        cells = [(width, shortest) for width in sorted(self.widths)]
        return cells + [(widest, length) for length in sorted(self.seq_lens) if length != shortest]

    def num_kv_pairs(self, seq_len: int) -> int:
        return seq_len // self.tokens_per_pair


# Presets for `seqarch bench quality=true quality_grid=<name>`; other grids: benchmarks/run_quality_sweep.py.
GRIDS: dict[str, dict[str, Any]] = {
    "quick": {"widths": (32,), "seq_lens": (24,), "steps": 60, "num_train": 2000, "num_val": 64},  # smoke: ~2 min
    "default": {"budget_s": 1800.0},  # 3 cells x 7 mixers, ~20 min on one thread of the shared 2-core CPU; cut at 30
    "full": {"grid": "full", "widths": (32, 64, 128), "seq_lens": (24, 48, 96), "steps": 1000},  # 9 cells x 7 mixers
    "large": {"grid": "full", "widths": (64, 128, 256), "seq_lens": (64, 128, 256, 512), "tokens_per_pair": 16,
              "vocab_size": 256, "steps": 2000, "lr": 3e-3},  # Zoology's pair scaling, for a bigger machine
}


def fit_args(settings: QualitySettings, mixer: str, d_model: int, seq_len: int, run_dir: Path) -> list[str]:
    """The `seqarch fit` arguments of one cell."""
    return ["recipe=base", f"model.mixer={mixer}", f"model.d_model={d_model}", f"model.n_layers={settings.n_layers}",
            "data=mqar", f"data.seq_len={seq_len}", f"data.num_kv_pairs={settings.num_kv_pairs(seq_len)}",
            f"data.vocab_size={settings.vocab_size}", f"data.batch_size={settings.batch_size}",
            f"data.num_train={settings.num_train}", f"data.num_val={settings.num_val}",
            f"optim.lr={settings.lr}", f"optim.warmup_steps={settings.warmup_steps}",
            f"optim.min_lr_ratio={settings.min_lr_ratio}", f"optim.weight_decay={settings.weight_decay}",
            f"optim.grad_clip={settings.grad_clip}",
            f"trainer.max_steps={settings.steps}", f"trainer.val_every={settings.steps}",
            f"trainer.val_batches={-(-settings.num_val // settings.batch_size)}",
            f"trainer.num_threads={settings.threads}", "trainer.progress=false",
            f"seed={settings.seed}", f"run_dir={run_dir}"]


def _cell_row(settings: QualitySettings, mixer: str, d_model: int, seq_len: int) -> dict[str, Any]:
    return {"mixer": mixer, "d_model": d_model, "seq_len": seq_len, "num_kv_pairs": settings.num_kv_pairs(seq_len),
            "accuracy": None, "chance": None, "parameters": None, "steps": settings.steps, "lr": settings.lr,
            "train_seconds": None, "status": "skipped", "error": ""}


def run_cell(settings: QualitySettings, mixer: str, d_model: int, seq_len: int) -> dict[str, Any]:
    """Train one (mixer, width, length) cell; a failure is recorded in the row, not raised."""
    from seqarch.train.fit import fit

    row = _cell_row(settings, mixer, d_model, seq_len)
    run_dir = Path(settings.out) / "runs" / f"{mixer}-d{d_model}-L{seq_len}"
    if run_dir.exists():
        raise ValueError(f"quality: run folder {run_dir} exists; give a fresh out= folder")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints a summary per run
            summary = fit(fit_args(settings, mixer, d_model, seq_len, run_dir))
    except Exception as error:  # a mixer that cannot run at this width is a result, not a crash of the sweep
        return {**row, "status": "error", "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return {**row, "accuracy": summary["val_accuracy"], "chance": summary["baseline"],
            "parameters": summary["parameters"], "train_seconds": summary["train_seconds"], "status": "ok"}


def run_quality_sweep(settings: QualitySettings, progress=print) -> list[dict[str, Any]]:
    """Train every mixer at every cell of `settings`, mixers inner (a budget cut then drops the last,
    longest cells for every mixer alike); writes and returns the rows of <out>/quality.json."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for d_model, seq_len in settings.cells():
        for mixer in settings.mixer_names:
            if settings.budget_s and time.perf_counter() - started > settings.budget_s:
                rows.append(_cell_row(settings, mixer, d_model, seq_len))
                continue
            row = run_cell(settings, mixer, d_model, seq_len)
            rows.append(row)
            accuracy = "—" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
            progress(f"quality {mixer:<10} d={d_model:<4} L={seq_len:<5} P={row['num_kv_pairs']:<3} "
                     f"accuracy {accuracy}  {row['status']} {row['error']}".rstrip())
    write_quality(rows, out / "quality.json")
    return rows


def write_quality(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")


def quality_settings(preset: str, **overrides: Any) -> QualitySettings:
    """The settings of a named preset (see GRIDS) with `overrides` on top."""
    if preset not in GRIDS:
        raise ValueError(f"quality grid {preset!r}; valid: {', '.join(GRIDS)}")
    values = {**GRIDS[preset], **overrides}
    return dataclasses.replace(QualitySettings(), **values)


__all__ = ["GRIDS", "QualitySettings", "fit_args", "quality_settings", "run_cell", "run_quality_sweep",
           "write_quality"]
