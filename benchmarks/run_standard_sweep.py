"""The standard scaling sweep: every registered mixer x L x {train, prefill, decode}, bounded in time.

    python benchmarks/run_standard_sweep.py            # L = 256 .. 16384, <= 15 min of cases
    python benchmarks/run_standard_sweep.py --quick    # L = 256, 1024: about a minute on a quiet 2-core CPU
    python benchmarks/run_standard_sweep.py --name my-run --note "quiet machine" --sweep-minutes 30
    python benchmarks/run_standard_sweep.py --overwrite  # replace the committed results/standard

Writes benchmarks/results/<name>/ (default name: "standard", or "quick"): report.md with its PNG
plots, results.json, results.csv, and machine.json (CPU model, cores, load, torch and Python
versions, date, and a calibration of the memory probe), so a number never appears without the
machine it was measured on. Every case runs in its own subprocess with a wall-time budget; the
sweep as a whole stops starting cases after --sweep-minutes (the rest are reported as skipped).
Same width and depth for every mixer (d_model 256, 2 layers); --match-params matches parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seqarch.bench import run_bench
from seqarch.bench.machine import machine_info
from seqarch.bench.runner import run_case
from seqarch.bench.settings import BenchSettings

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_BYTES = 256 * 2**20


def standard_settings(args: argparse.Namespace, out: Path) -> BenchSettings:
    lengths = (256, 1024) if args.quick else (256, 512, 1024, 2048, 4096, 8192, 16384)
    return BenchSettings(
        seq_lens=lengths, d_model=256, n_layers=2, batch_size=1, vocab_size=256, match_params=args.match_params,
        warmup=1, repeats=2 if args.quick else 5, decode_tokens=8, rounds=1, budget_s=args.case_budget,
        sweep_budget_s=60 * args.sweep_minutes, out=str(out), note=args.note,
    )


def calibrate_memory_probe() -> dict:
    """Measure a known 256 MiB allocation with the same probe the cases use."""
    result = run_case({"mode": "probe", "alloc_bytes": PROBE_BYTES, "threads": 1}, budget_s=300)
    if result["status"] != "ok":
        return {"status": result["status"], "error": result.get("error")}
    measured = result["peak_bytes"] - result["baseline_bytes"]
    return {"status": "ok", "allocated_bytes": PROBE_BYTES, "measured_bytes": measured,
            "relative_error": (measured - PROBE_BYTES) / PROBE_BYTES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two lengths, two timed runs per case")
    parser.add_argument("--name", default=None, help="folder under benchmarks/results (default: standard / quick)")
    parser.add_argument("--note", default="", help="printed at the top of the report, e.g. 'machine shared'")
    parser.add_argument("--sweep-minutes", type=float, default=15.0, help="wall-time bound for all cases")
    parser.add_argument("--case-budget", type=float, default=120.0, help="wall seconds per case, start-up included")
    parser.add_argument("--match-params", action="store_true", help="match parameter counts instead of width")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in the folder")
    args = parser.parse_args()
    out = RESULTS / (args.name or ("quick" if args.quick else "standard"))
    if (out / "results.json").exists() and not args.overwrite:
        parser.error(f"{out} already holds a sweep's results; pass --overwrite to replace them, or --name NEW")
    out.mkdir(parents=True, exist_ok=True)
    machine = {**machine_info(), "memory_probe": calibrate_memory_probe()}
    (out / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")
    report = run_bench(standard_settings(args, out))
    print(f"wrote {report} and machine.json beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
