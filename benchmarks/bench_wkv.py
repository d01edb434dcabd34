"""wkv6 forms vs sequence length: time, tokens/s, peak memory, speed-up over the sequential reference
and over the eager chunked path.

Forms: "compiled" (the C++ kernel, `wkv6(backend="compiled")`), "chunked" (the eager PyTorch path,
`wkv6(backend="chunked")`), "parallel" (`wkv6_parallel`), "sequential" (`wkv6_ref`, the token loop).

Legend: B batch (1), H heads (12), T length, K head size (64).

    python benchmarks/bench_wkv.py            # L = 256 ... 8192, forward and forward + backward
    python benchmarks/bench_wkv.py --quick    # L = 256, 1024; under a minute
    python benchmarks/bench_wkv.py --lengths 1024 4096 --threads 1 --repeats 3   # issue #4's case

Timing (seqarch.bench.timing): in this process, the forms are run interleaved (A B C, C B A, ...) and
the median is kept, so a slow spell of a shared machine hits every form alike; speed-ups are ratios
within one L. Peak memory: each (form, L, pass) runs once in a fresh subprocess and reports its peak
resident memory above the resident memory it had before the call (inputs included in the baseline).
The sequential reference is a loop over tokens, so it is only run up to `--max-sequential-length`; the
parallel form holds (T, T, K) tensors, so it stops at `--max-parallel-length`.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from seqarch.bench.timing import Benchmark, run_benchmark, with_mode
from seqarch.ops.wkv import KERNEL, wkv6, wkv6_parallel, wkv6_ref

HEADS, HEAD_SIZE = 12, 64
FORMS = {
    "compiled": lambda *inputs, **kwargs: wkv6(*inputs, **kwargs, backend="compiled"),
    "chunked": lambda *inputs, **kwargs: wkv6(*inputs, **kwargs, backend="chunked"),
    "parallel": wkv6_parallel,
    "sequential": wkv6_ref,
}
PASSES = ("forward", "forward+backward")


def make_inputs(length: int, requires_grad: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, HEADS, length, HEAD_SIZE)
    r, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    w = -torch.exp(torch.randn(shape, generator=generator) - 2.0)  # RWKV-like log-decays, mostly in (-1, 0)
    u = torch.randn(HEADS, HEAD_SIZE, generator=generator)
    tensors = [r, k, v, w, u]
    for tensor in tensors:
        tensor.requires_grad_(requires_grad)
    return tensors


def setup(form: str, length: int, pass_name: str):
    """One call of `form` on inputs made here (forward under no_grad, or forward + backward)."""
    inputs = make_inputs(length, pass_name != "forward")
    return with_mode(lambda: FORMS[form](*inputs, scale=1.0)[0], inputs, pass_name)


def _load_kernel_if_usable() -> None:
    KERNEL.usable()  # builds or loads it once; the extension's own pages are not a form's memory


BENCHMARK = Benchmark(target="benchmarks.bench_wkv:BENCHMARK", impls=tuple(FORMS), setup=setup, modes=PASSES,
                      prepare=_load_kernel_if_usable, alternate=True)


def forms_at(length: int, backward: bool, args) -> list[str]:
    forms = ["compiled", "chunked"] if args.compiled else ["chunked"]
    if length <= args.max_parallel_length:
        forms.append("parallel")
    limit = args.max_sequential_length if not backward else args.max_sequential_length // 2
    if length <= limit:
        forms.append("sequential")
    return forms


def benchmark(args) -> list[dict]:
    """Rows {length, pass, form, seconds, tokens_per_s, peak_mb, speedup (vs sequential), vs_chunked}, each
    printed as soon as its (L, pass) is measured."""
    registration = dataclasses.replace(
        BENCHMARK, runnable=lambda form, length, pass_name: form in forms_at(length, pass_name != "forward", args))
    rows = []

    def add(measured: list[dict]) -> None:
        medians = {r["impl"]: r["seconds"] for r in measured}
        for r in measured:
            length, seconds = r["L"], r["seconds"]
            rows.append({"length": length, "pass": r["mode"], "form": r["impl"], "seconds": seconds,
                         "tokens_per_s": length / seconds,
                         "peak_mb": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
                         "speedup": medians["sequential"] / seconds if "sequential" in medians else None,
                         "vs_chunked": medians["chunked"] / seconds})
            print_row(rows[-1])

    for length in args.lengths:  # lengths outside, passes inside, as the table reads
        run_benchmark(registration, [length], args.repeats, modes=args.passes, threads=args.threads, on_rows=add)
    return rows


def print_header() -> None:
    print(f"| {'L':>5} | {'pass':<16} | {'form':<10} | {'median ms':>10} | {'tokens/s':>10} | {'peak MB':>8} "
          f"| {'vs sequential':>13} | {'vs chunked':>10} |")
    print(f"|{'-' * 7}|{'-' * 18}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 15}|{'-' * 12}|")


def print_row(row: dict) -> None:
    speedup = f"{row['speedup']:.1f}x" if row["speedup"] is not None else "-"
    peak = f"{row['peak_mb']:.1f}" if row["peak_mb"] is not None else "-"
    print(f"| {row['length']:>5} | {row['pass']:<16} | {row['form']:<10} | {row['seconds'] * 1e3:>10.1f} "
          f"| {row['tokens_per_s']:>10.0f} | {peak:>8} | {speedup:>13} | {row['vs_chunked']:>9.1f}x |",
          flush=True)


def print_memory_scaling(rows: list[dict]) -> None:
    """Peak memory per token of the linear-memory forms at each L: flat when memory is linear in L."""
    for form in ("compiled", "chunked"):
        if not any(row["form"] == form for row in rows):
            continue
        print(f"\n{form} peak memory per token (KB): flat = linear in L")
        for pass_name in sorted({row["pass"] for row in rows}):
            cells = [f"L={row['length']}: {row['peak_mb'] * 1024 / row['length']:.1f}"
                     for row in rows if row["form"] == form and row["pass"] == pass_name and row["peak_mb"] is not None]
            print(f"  {pass_name:<16} " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="L = 256, 1024, no parallel form, 3 repeats (about a minute on a quiet machine)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-sequential-length", type=int, default=4096)
    parser.add_argument("--max-parallel-length", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.repeats = [256, 1024], 3
        args.max_sequential_length = min(args.max_sequential_length, 1024)
        args.max_parallel_length = 0
    args.compiled, reason = KERNEL.usable()
    if not args.compiled:
        print(f"compiled form skipped: {reason}")
    print(f"wkv6, B=1, H={HEADS}, K=V={HEAD_SIZE}, float32, {args.threads} thread(s), torch {torch.__version__}; "
          f"median of {args.repeats} interleaved runs\n")
    print_header()
    rows = benchmark(args)
    print_memory_scaling(rows)


if __name__ == "__main__":
    main()
