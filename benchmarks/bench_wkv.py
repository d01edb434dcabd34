"""wkv6 forms vs sequence length: time, tokens/s, peak memory, speed-up over the sequential reference
and over the eager chunked path.

Forms: "compiled" (the C++ kernel, `wkv6(backend="compiled")`), "chunked" (the eager PyTorch path,
`wkv6(backend="chunked")`), "parallel" (`wkv6_parallel`), "sequential" (`wkv6_ref`, the token loop).

Legend: B batch (1), H heads (12), T length, K head size (64).

    python benchmarks/bench_wkv.py            # L = 256 ... 8192, forward and forward + backward
    python benchmarks/bench_wkv.py --quick    # L = 256, 1024; under a minute
    python benchmarks/bench_wkv.py --lengths 1024 4096 --threads 1 --repeats 3   # issue #4's case

Timing: in this process, the forms are run interleaved (A B C A B C ...) and the median is kept, so a
slow spell of a shared machine hits every form alike; speed-ups are ratios within one L. Peak memory:
each (form, L, pass) runs once in a fresh subprocess and reports its peak resident memory above the
resident memory it had before the call (inputs included in the baseline). The sequential reference
is a loop over tokens, so it is only run up to `--max-sequential-length`; the parallel form holds
(T, T, K) tensors, so it stops at `--max-parallel-length`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from seqarch.bench.memory import peak_rss_growth_bytes
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


def run_once(form: str, inputs, backward: bool) -> None:
    out, _ = FORMS[form](*inputs, scale=1.0)
    if backward:
        out.sum().backward()


def measure_peak_memory(form: str, length: int, backward: bool) -> int:
    """Run in a fresh process: bytes of peak RSS above the RSS once the inputs exist.

    The peak is this process's VmHWM, reset just before the call (seqarch.bench.memory).
    """
    inputs = make_inputs(length, backward)
    return peak_rss_growth_bytes(run_once, form, inputs, backward)


def peak_memory_in_subprocess(form: str, length: int, backward: bool, threads: int) -> int:
    command = [sys.executable, __file__, "--memory-case", form, str(length), str(int(backward)),
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def forms_at(length: int, backward: bool, args) -> list[str]:
    forms = ["compiled", "chunked"] if args.compiled else ["chunked"]
    if length <= args.max_parallel_length:
        forms.append("parallel")
    limit = args.max_sequential_length if not backward else args.max_sequential_length // 2
    if length <= limit:
        forms.append("sequential")
    return forms


def benchmark(args) -> list[dict]:
    rows = []
    for length in args.lengths:
        for pass_name in args.passes:
            backward = pass_name != "forward"
            forms = forms_at(length, backward, args)
            inputs = make_inputs(length, backward)
            times = {form: [] for form in forms}
            for form in forms:  # warm-up
                run_once(form, inputs, backward)
            for repeat in range(args.repeats):
                for form in forms if repeat % 2 == 0 else reversed(forms):
                    start = time.perf_counter()
                    run_once(form, inputs, backward)
                    times[form].append(time.perf_counter() - start)
            medians = {form: statistics.median(values) for form, values in times.items()}
            for form in forms:
                peak = peak_memory_in_subprocess(form, length, backward, args.threads)
                rows.append({
                    "length": length, "pass": pass_name, "form": form, "seconds": medians[form],
                    "tokens_per_s": length / medians[form], "peak_mb": peak / 2**20,
                    "speedup": medians["sequential"] / medians[form] if "sequential" in medians else None,
                    "vs_chunked": medians["chunked"] / medians[form],
                })
                print_row(rows[-1])
    return rows


def print_header() -> None:
    print(f"| {'L':>5} | {'pass':<16} | {'form':<10} | {'median ms':>10} | {'tokens/s':>10} | {'peak MB':>8} "
          f"| {'vs sequential':>13} | {'vs chunked':>10} |")
    print(f"|{'-' * 7}|{'-' * 18}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 15}|{'-' * 12}|")


def print_row(row: dict) -> None:
    speedup = f"{row['speedup']:.1f}x" if row["speedup"] is not None else "-"
    print(f"| {row['length']:>5} | {row['pass']:<16} | {row['form']:<10} | {row['seconds'] * 1e3:>10.1f} "
          f"| {row['tokens_per_s']:>10.0f} | {row['peak_mb']:>8.1f} | {speedup:>13} | {row['vs_chunked']:>9.1f}x |",
          flush=True)


def print_memory_scaling(rows: list[dict]) -> None:
    """Peak memory per token of the linear-memory forms at each L: flat when memory is linear in L."""
    for form in ("compiled", "chunked"):
        if not any(row["form"] == form for row in rows):
            continue
        print(f"\n{form} peak memory per token (KB): flat = linear in L")
        for pass_name in sorted({row["pass"] for row in rows}):
            cells = [f"L={row['length']}: {row['peak_mb'] * 1024 / row['length']:.1f}"
                     for row in rows if row["form"] == form and row["pass"] == pass_name]
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
    parser.add_argument("--memory-case", nargs=3, metavar=("FORM", "LENGTH", "BACKWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case:
        form, length, backward = args.memory_case
        print(measure_peak_memory(form, int(length), bool(int(backward))))
        return
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
