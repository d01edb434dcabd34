"""Language-model quality at matched size: every mixer at three parameter counts on the same bytes.

    python -m benchmarks.run_lm_quality --preset quick          # < 10 min on one thread: a smoke run
    python -m benchmarks.run_lm_quality                         # issue 14's item 5 (cost: docs/benchmarks.md)
    python -m benchmarks.run_lm_quality budget_s=6000           # ... 100 minutes of it; rerun to continue
    python -m benchmarks.run_lm_quality mixers=attention,mamba2 seeds=[0,1]

`key=value` arguments set any field of `seqarch.bench.lm_quality.LMQualitySettings` on top of the preset.
Writes benchmarks/results/quality/lm/<name>/ (default name: the preset): runs/<key>.json, one per finished
run (the cache a rerun skips), lm_quality.json (one row per mixer x size), lm_quality.md (the table),
bpb_vs_params.png (the plot), settings.json (every field, the wall time of this invocation) and machine.json.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks.run_quality_sweep import RESULTS as QUALITY_RESULTS
from benchmarks.run_quality_sweep import run_and_record
from seqarch.bench.lm_quality import (
    LM_GRIDS,
    LMQualitySettings,
    corpus_baseline,
    lm_quality_settings,
    run_lm_quality,
    write_lm_quality_report,
)
from seqarch.bench.settings import parse_overrides
from seqarch.configs import make_config

RESULTS = QUALITY_RESULTS / "lm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value fields of LMQualitySettings")
    parser.add_argument("--preset", default="default", choices=list(LM_GRIDS))
    parser.add_argument("--name", default=None, help="results folder name (default: the preset)")
    args = parser.parse_args()

    out = RESULTS / (args.name or args.preset)
    out.mkdir(parents=True, exist_ok=True)
    values = parse_overrides(args.overrides, LMQualitySettings, "run_lm_quality")
    if values.pop("mixer_overrides", None):
        raise ValueError("run_lm_quality: per-mixer config overrides are not supported (the sizes are matched "
                         "on each mixer's default config)")
    base = lm_quality_settings(args.preset, out=str(out))
    settings = make_config(LMQualitySettings, owner="run_lm_quality", **{**dataclasses.asdict(base), **values})

    rows, wall_seconds, header = run_and_record(settings, out, args.preset, "run_lm_quality", run_lm_quality)
    report = write_lm_quality_report(rows, settings, out, header, baseline_bpb=corpus_baseline(settings))
    print(f"lm quality: {len(rows)} rows in {wall_seconds:.0f} s; wrote {report}")


if __name__ == "__main__":
    main()
