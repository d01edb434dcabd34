"""The quality sweep: every registered mixer on MQAR (and state tracking), resumable run by run.

    python -m benchmarks.run_quality_sweep --preset quick         # < 10 min on one thread; one lr, one seed
    python -m benchmarks.run_quality_sweep                        # issue 14's Zoology grid: ~2 single-thread days
    python -m benchmarks.run_quality_sweep budget_s=6000          # ... 100 minutes of it; rerun to continue
    python -m benchmarks.run_quality_sweep --preset state         # parity and Z5 at L 32, evaluated at 32/64/128
    python -m benchmarks.run_quality_sweep mixers=attention,mamba lrs=[1e-3] seeds=[0]

(`python -m` from the checkout's root imports that checkout's seqarch, whichever one is installed.)

`key=value` arguments set any field of `seqarch.bench.quality.QualitySettings` on top of the preset.
Writes benchmarks/results/quality/<name>/ (default name: the preset): runs/<key>.json, one per finished
run (the cache a rerun skips), quality.json (one row per cell x block x mixer), quality.md (the report,
INVALID in its title when attention misses 0.99 on a finished MQAR cell), accuracy.png (MQAR accuracy per
mixer per cell), settings.json (every field, the wall time of this invocation) and machine.json. Feed
quality.json to the speed report with `seqarch bench quality=<path>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqarch.bench.machine import machine_info
from seqarch.bench.quality import GRIDS, QualitySettings, quality_settings, run_quality_sweep, write_quality_report
from seqarch.bench.settings import parse_overrides
from seqarch.configs import make_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality"


def run_and_record(settings: Any, out: Path, preset: str, program: str,
                   run: Callable[[Any], list[dict]]) -> tuple[list[dict], float, list[str]]:
    """`run(settings)` on `settings.threads` threads, with machine.json before and settings.json (every field,
    the preset, the wall time of this invocation) after it in `out`; returns the rows, the wall seconds and
    the report's header lines. Shared by this script and run_lm_quality."""
    torch.set_num_threads(settings.threads)
    (out / "machine.json").write_text(json.dumps(machine_info(), indent=1) + "\n")
    started = time.perf_counter()
    rows = run(settings)
    wall_seconds = round(time.perf_counter() - started, 1)
    recorded = {**dataclasses.asdict(settings), "out": str(out.relative_to(ROOT)), "preset": preset,
                "wall_seconds_this_invocation": wall_seconds}
    (out / "settings.json").write_text(json.dumps(recorded, indent=1) + "\n")
    header = [f"Preset `{preset}`: `python -m benchmarks.{program} --preset {preset}`; this invocation ran "
              f"{wall_seconds:.0f} s on {settings.threads} thread(s) (finished runs are cached in runs/ and skipped "
              "on rerun). Every field: settings.json; machine: machine.json.", ""]
    return rows, wall_seconds, header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value fields of QualitySettings")
    parser.add_argument("--preset", default="zoology", choices=list(GRIDS))
    parser.add_argument("--name", default=None, help="results folder name (default: the preset)")
    args = parser.parse_args()

    out = RESULTS / (args.name or args.preset)
    out.mkdir(parents=True, exist_ok=True)
    values = parse_overrides(args.overrides, QualitySettings, "run_quality_sweep")
    values.pop("mixer_overrides", None)
    base = quality_settings(args.preset, out=str(out))
    settings = make_config(QualitySettings, owner="run_quality_sweep", **{**dataclasses.asdict(base), **values})

    rows, wall_seconds, header = run_and_record(settings, out, args.preset, "run_quality_sweep", run_quality_sweep)
    report = write_quality_report(rows, out, header)
    print(f"quality sweep: {len(rows)} rows in {wall_seconds:.0f} s; wrote {report}")


if __name__ == "__main__":
    main()
