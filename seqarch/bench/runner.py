"""Run benchmark cases, each in a fresh subprocess under a wall-time budget, and sweep a grid.

The parent never measures anything itself: it starts `python -m seqarch.bench.case <json>`,
waits at most `budget_s` (import, model build and all runs included), kills the child when the
budget is spent and records the case as "over_budget". Once a mixer is over budget in a mode,
its longer lengths in that mode are recorded as "skipped" instead of being run, so a slow
mixer cannot stall the sweep; with `sweep_budget_s` the cases left when it is spent are
"skipped" too, so the whole sweep is bounded.

Order: lengths ascending, then modes, then mixers, so the mixers compared at one length run next
to each other (A B A B); with `rounds` > 1 the whole grid is repeated and the timed samples of
each case are pooled before taking the median.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import seqarch
from seqarch.bench.accounting import count_parameters, match_width
from seqarch.bench.case import RESULT_PREFIX
from seqarch.bench.settings import BenchSettings

# Columns of results.csv, in order; docs/benchmarks.md explains each.
COLUMNS = (
    "mixer", "mode", "seq_len", "status", "tokens_per_s", "time_s", "latency_ms", "peak_bytes", "baseline_bytes",
    "case_bytes", "state_bytes", "state_bytes_measured", "params", "params_non_embedding", "d_model", "n_layers",
    "batch_size", "dtype", "device", "threads", "samples", "wall_s", "memory_kind", "error",
)


def _child_environment() -> dict[str, str]:
    """The parent's environment with this seqarch checkout first on the path, so the child imports
    the same code as the parent (not another installed copy)."""
    env = dict(os.environ)
    root = str(Path(seqarch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_case(spec: dict[str, Any], budget_s: float) -> dict[str, Any]:
    """Run one case in a fresh process. Returns the child's measurements with `status` "ok", or
    `status` "over_budget" (killed after `budget_s` seconds) or "error" (with the last stderr line)."""
    command = [sys.executable, "-m", "seqarch.bench.case", json.dumps(spec)]
    start = time.perf_counter()
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=budget_s,
                                  env=_child_environment())
    except subprocess.TimeoutExpired:
        return {"status": "over_budget", "wall_s": time.perf_counter() - start,
                "error": f"killed after the {budget_s:g} s budget"}
    wall = time.perf_counter() - start
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if finished.returncode != 0 or not lines:
        stderr = [line for line in finished.stderr.splitlines() if line.strip()]
        message = stderr[-1] if stderr else f"exit code {finished.returncode}, no result"
        return {"status": "error", "wall_s": wall, "error": message}
    return {"status": "ok", "wall_s": wall, **json.loads(lines[-1][len(RESULT_PREFIX):])}


def plan_widths(settings: BenchSettings) -> dict[str, int]:
    """The width of each mixer's model: `d_model` for all (fair by default), or with `match_params`
    the width whose parameter count is closest to the reference mixer's at `d_model`."""
    names = settings.mixer_names
    if not settings.match_params:
        return {name: settings.d_model for name in names}
    if settings.reference not in seqarch.list_mixers():
        raise ValueError(f"bench: match_params needs reference={settings.reference!r} to be a registered mixer; "
                         f"registered: {', '.join(seqarch.list_mixers())}")
    target = count_parameters(settings.reference, settings.d_model, settings.n_layers, settings.vocab_size,
                              settings.mlp, settings.mixer_kwargs(settings.reference))
    return {name: match_width(name, target, settings.n_layers, settings.vocab_size, settings.mlp,
                              settings.mixer_kwargs(name)) for name in names}


def case_spec(settings: BenchSettings, mixer: str, mode: str, seq_len: int, d_model: int) -> dict[str, Any]:
    return {
        "mixer": mixer, "mode": mode, "seq_len": seq_len, "d_model": d_model, "n_layers": settings.n_layers,
        "batch_size": settings.batch_size, "vocab_size": settings.vocab_size, "mlp": settings.mlp,
        "dtype": settings.dtype, "device": settings.device, "threads": settings.threads,
        "warmup": settings.warmup, "repeats": settings.repeats, "decode_tokens": settings.decode_tokens,
        "seed": settings.seed, "mixer_kwargs": settings.mixer_kwargs(mixer),
    }


def summarize(spec: dict[str, Any], measured: list[dict[str, Any]]) -> dict[str, Any]:
    """One results row from the rounds of one case: pooled samples, median time, peak memory."""
    row = {column: None for column in COLUMNS}
    row.update({key: spec[key] for key in ("mixer", "mode", "seq_len", "d_model", "n_layers", "batch_size", "dtype",
                                            "device", "threads")})
    row["wall_s"] = sum(result.get("wall_s", 0.0) for result in measured)
    done = [result for result in measured if result["status"] == "ok"]
    if not done:
        last = measured[-1]
        row.update(status=last["status"], error=last.get("error"))
        return row
    samples = [sample for result in done for sample in result["samples_s"]]
    median = statistics.median(samples)
    per_run = done[0]["tokens_per_run"]
    row.update(
        status="ok", samples=len(samples), time_s=median, tokens_per_s=per_run / median,
        peak_bytes=max(result["peak_bytes"] for result in done),
        baseline_bytes=min(result["baseline_bytes"] for result in done),
        memory_kind=done[0]["memory_kind"], state_bytes=done[0]["state_bytes"],
        state_bytes_measured=done[0].get("state_bytes_measured"),
        params=done[0]["params"], params_non_embedding=done[0]["params_non_embedding"],
    )
    row["case_bytes"] = row["peak_bytes"] - row["baseline_bytes"]
    if spec["mode"] == "decode":
        row["latency_ms"] = 1000 * median / spec["decode_tokens"]
    return row


Executor = Callable[[dict[str, Any], float], dict[str, Any]]


def run_sweep(settings: BenchSettings, progress: Callable[[str], None] = print,
              execute: Executor = run_case) -> list[dict[str, Any]]:
    """Every mixer x mode x length of `settings`, one subprocess per case; returns the result rows.
    `execute(spec, budget_s)` runs one case (the default starts the subprocess)."""
    widths = plan_widths(settings)
    grid = [(mixer, mode, seq_len) for seq_len in sorted(set(settings.seq_lens)) for mode in settings.modes
            for mixer in settings.mixer_names]
    measured: dict[tuple, list[dict[str, Any]]] = {key: [] for key in grid}
    over_budget_at: dict[tuple[str, str], int] = {}
    total = len(grid) * settings.rounds
    count = 0
    start = time.perf_counter()
    for _ in range(settings.rounds):
        for mixer, mode, seq_len in grid:
            count += 1
            key = (mixer, mode, seq_len)
            blocked = over_budget_at.get((mixer, mode))
            if blocked is not None and seq_len >= blocked:
                if not measured[key]:
                    measured[key].append({"status": "skipped", "error": f"over budget at L={blocked}"})
                continue
            remaining = settings.sweep_budget_s - (time.perf_counter() - start) if settings.sweep_budget_s else None
            if remaining is not None and remaining <= 0:
                if not measured[key]:
                    measured[key].append({"status": "skipped", "error": "sweep budget spent"})
                continue
            budget = settings.budget_s if remaining is None else min(settings.budget_s, remaining)
            result = execute(case_spec(settings, mixer, mode, seq_len, widths[mixer]), budget)
            measured[key].append(result)
            if result["status"] == "over_budget":
                over_budget_at[(mixer, mode)] = seq_len
            progress(_describe(count, total, key, result))
    return [summarize(case_spec(settings, *key, widths[key[0]]), measured[key]) for key in grid]


def _describe(count: int, total: int, key: tuple, result: dict[str, Any]) -> str:
    mixer, mode, seq_len = key
    head = f"[{count}/{total}] {mixer} {mode} L={seq_len}:"
    if result["status"] != "ok":
        return f"{head} {result['status']} ({result.get('error')})"
    median = statistics.median(result["samples_s"])
    peak = (result["peak_bytes"] - result["baseline_bytes"]) / 2**20
    return (f"{head} {result['tokens_per_run'] / median:,.0f} tok/s, +{peak:,.1f} MiB over baseline "
            f"({result['wall_s']:.1f} s wall)")
