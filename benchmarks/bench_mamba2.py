"""Mamba-2 (and Mamba, when registered) against attention of the same width: tokens/s and peak
memory of forward and forward + backward, batch 1, d_model 768, over sequence lengths.

    python -m benchmarks.bench_mamba2            # L = 256 ... 8192
    python -m benchmarks.bench_mamba2 --quick    # L = 512, 2048: under a minute
    python -m benchmarks.bench_mamba2 --chunks   # mamba2 chunk_size 32 ... 256
    python -m benchmarks.bench_mamba2 --ssd-from main --lengths 4096 16384   # this SSD against main's

Timings are interleaved (every mixer once per round, rounds repeated) and reported as medians,
so load on a shared machine hits all mixers alike; the ratio column compares each mixer with
attention (with --chunks: Q = 64; with --ssd-from: mamba2 on the other SSD) measured in the same
rounds. Peak memory: each case once more in a fresh process (seqarch.bench.timing), the growth of
its peak resident set during one call, with large allocations forced to mmap there so that freed
tensors leave the resident set at once.

`--ssd-from REF` adds "mamba2 ssd@REF": the same mixer with `seqarch/ops/ssd.py` as committed at git
REF (read with `git show`, loaded as its own module) and, where REF has no `seqarch/ops/gated_norm.py`,
the gated norm on its eager path (what the mixer computed there), so the layer's SSD and norm are
measured against the code they replace in one process.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import types
from pathlib import Path

import torch

import seqarch.mixers.mamba2 as mamba2_module
from seqarch import build_mixer, list_mixers
from seqarch.bench.timing import Benchmark, run_benchmark, with_mode
from seqarch.ops.gated_norm import gated_rms_norm

MODES = ("forward", "forward+backward")
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def has_file_at(ref: str, path: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}:{path}"],
                          capture_output=True).returncode == 0


def eager_norm(*args, **kwargs):
    """The gated norm as the mixer computed it before seqarch/ops/gated_norm.py: eager PyTorch."""
    return gated_rms_norm(*args, **kwargs, backend="eager")


@functools.cache
def ssd_at(ref: str):
    """`ssd` of seqarch/ops/ssd.py as committed at git `ref`, loaded as a separate module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:seqarch/ops/ssd.py"], capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"ssd_at_{ref}")
    module.__file__ = str(ROOT / "seqarch" / "ops" / "ssd.py")  # its kernel sources, where it names any
    exec(compile(source, f"{ref}:seqarch/ops/ssd.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module.ssd


def parse(impl: str) -> tuple[str, dict, str | None]:
    """"attention" | "mamba" | "mamba2" | "mamba2 Q=<chunk>" | "mamba2 ssd@<ref>" -> (name, overrides, ref)."""
    name, _, variant = impl.partition(" ")
    if variant.startswith("Q="):
        return name, {"chunk_size": int(variant[2:])}, None
    if variant.startswith("ssd@"):
        return name, {}, variant[4:]
    return name, {}, None


def setup(impl: str, length: int, mode: str, d_model: int = 768):
    name, overrides, ref = parse(impl)
    torch.manual_seed(0)
    mixer = build_mixer(name, d_model=d_model, **overrides)
    x = torch.randn(1, length, d_model).requires_grad_(mode != "forward")
    call = with_mode(lambda: mixer(x), [x, *mixer.parameters()], mode)
    if ref is None:
        return call
    other = ssd_at(ref)
    norm = mamba2_module.gated_rms_norm if has_file_at(ref, "seqarch/ops/gated_norm.py") else eager_norm

    def on_other_ssd():
        current = mamba2_module.ssd, mamba2_module.gated_rms_norm
        mamba2_module.ssd, mamba2_module.gated_rms_norm = other, norm
        try:
            call()
        finally:
            mamba2_module.ssd, mamba2_module.gated_rms_norm = current

    return on_other_ssd


BENCHMARK = Benchmark(target="benchmarks.bench_mamba2:BENCHMARK", impls=("attention", "mamba", "mamba2"),
                      setup=setup, modes=MODES, force_mmap=True)


def print_table(rows: list[dict], reference: str) -> None:
    baseline = {(r["mode"], r["L"]): r["seconds"] for r in rows if r["impl"] == reference}
    print(f"| mode | L | mixer | ms (median) | tokens/s | peak MiB | speed vs {reference} |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["mode"], r["L"], r["impl"])):
        ratio = baseline.get((r["mode"], r["L"]))
        ratio_text = f"{ratio / r['seconds']:.2f}x" if ratio else "-"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"| {r['mode']} | {r['L']} | {r['impl']} | {1e3 * r['seconds']:.0f} | "
              f"{r['L'] / r['seconds']:,.0f} | {peak} | {ratio_text} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="L = 512, 2048 and 3 rounds (under a minute)")
    parser.add_argument("--chunks", action="store_true", help="compare mamba2 chunk sizes 32 ... 256")
    parser.add_argument("--ssd-from", metavar="REF", help="also mamba2 with seqarch/ops/ssd.py as at git REF")
    parser.add_argument("--lengths", type=int, nargs="*", help="sequence lengths (default 256 ... 8192)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per length")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    args = parser.parse_args()
    lengths = args.lengths or ([512, 2048] if args.quick else [256, 512, 1024, 2048, 4096, 8192])
    repeats = args.repeats or (3 if args.quick else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, d_model {args.d_model}, "
          f"float32, median of {repeats} interleaved rounds")
    if args.chunks:
        impls, reference = [f"mamba2 Q={q}" for q in (32, 64, 128, 256)], "mamba2 Q=64"
    elif args.ssd_from:
        impls, reference = ["mamba2", f"mamba2 ssd@{args.ssd_from}"], f"mamba2 ssd@{args.ssd_from}"
    else:
        impls = [name for name in BENCHMARK.impls if name in list_mixers()]
        reference = "attention"
    rows = run_benchmark(BENCHMARK, lengths, repeats, impls=impls, memory=not args.no_memory,
                         threads=torch.get_num_threads(), options={"d_model": args.d_model})
    print_table(rows, reference)


if __name__ == "__main__":
    main()
