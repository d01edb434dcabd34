"""The quality sweep alone: every registered mixer trained on MQAR at a few widths and lengths.

    python benchmarks/run_quality_sweep.py                  # the default grid, ~20 min on one CPU thread
    python benchmarks/run_quality_sweep.py --quick          # one small cell per mixer, about two minutes
    python benchmarks/run_quality_sweep.py --preset large   # a preset of seqarch.bench.quality.GRIDS
    python benchmarks/run_quality_sweep.py widths=[64,128] seq_lens=[128,512] steps=2000 mixers=attention,mamba

`key=value` arguments set any field of `seqarch.bench.quality.QualitySettings` on top of the preset
(the default preset stops starting cells after 30 minutes: add budget_s=0 for a larger grid).
Writes benchmarks/results/quality/<name>/ (default name: the preset, or "quick"): quality.json
(one row per mixer x width x length), quality.md with the accuracy table and its two plots,
settings.json (every QualitySettings field of the run, wall_seconds added at the end) and
machine.json (CPU, cores, load at the start, torch threads of the sweep, versions, date). The run
folders of every cell (config, metrics, checkpoints) go to a temporary folder unless --keep-runs.
Feed quality.json to the speed report with `seqarch bench quality=<path>`, or run both at once
with `seqarch bench quality=true`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from seqarch.bench.machine import machine_info
from seqarch.bench.quality import GRIDS, QualitySettings, quality_settings, run_quality_sweep, write_quality
from seqarch.bench.report import write_quality_report
from seqarch.bench.settings import parse_overrides
from seqarch.configs import make_config

RESULTS = Path(__file__).resolve().parent / "results" / "quality"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value fields of QualitySettings")
    parser.add_argument("--preset", default="default", choices=list(GRIDS))
    parser.add_argument("--quick", action="store_true", help="the quick preset: one small cell per mixer, 60 steps")
    parser.add_argument("--name", default=None, help="results folder name (default: the preset, or quick)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each cell's run folder beside the results")
    args = parser.parse_args()

    preset = "quick" if args.quick else args.preset
    out = RESULTS / (args.name or preset)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    runs = out if args.keep_runs else Path(tempfile.mkdtemp(prefix="seqarch-quality-"))
    values = parse_overrides(args.overrides, QualitySettings, "run_quality_sweep")
    values.pop("mixer_overrides", None)
    base = quality_settings(preset, out=str(runs))
    settings = make_config(QualitySettings, owner="run_quality_sweep", **{**dataclasses.asdict(base), **values})

    torch.set_num_threads(settings.threads)  # as each cell's fit does, so machine.json records the sweep's threads
    (out / "machine.json").write_text(json.dumps(machine_info(), indent=1) + "\n")
    started = time.perf_counter()
    rows = run_quality_sweep(settings)
    wall_seconds = round(time.perf_counter() - started, 1)
    write_quality(rows, out / "quality.json")
    recorded = {**dataclasses.asdict(settings), "out": str(out.relative_to(RESULTS.parents[2])),
                "wall_seconds": wall_seconds}
    (out / "settings.json").write_text(json.dumps(recorded, indent=1) + "\n")
    report = write_quality_report(rows, out)
    if not args.keep_runs:
        shutil.rmtree(runs)
    print(f"quality sweep: {len(rows)} cells in {wall_seconds:.0f} s; wrote {report}")


if __name__ == "__main__":
    main()
