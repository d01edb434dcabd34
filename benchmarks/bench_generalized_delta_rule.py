"""generalized_delta_rule forward: the compiled C++ kernel and the chunked DPLR form vs the sequential
reference vs flash-linear-attention's naive `dplr_recurrence`, time, peak memory and achieved GFLOP/s.

Forms: "compiled" (`generalized_delta_rule(backend="compiled")`, the C++ CPU kernel; skipped with a note
when it cannot build here), "chunked" (`generalized_delta_rule(backend="chunked")`), "sequential"
(`generalized_delta_rule_ref`, the token loop), "fla_naive" (fla-core's
ops/generalized_delta_rule/dplr/naive.py `dplr_recurrence`, loaded by path; skipped with a note when
fla-core is not installed: `pip install --no-deps -r requirements-reference.txt`).

Legend: B batch (1), H heads (12), T length, K = V head size (64). Inputs are RWKV-7-shaped:
a = -kappa, b = kappa * a_in with kappa unit-norm, gk = -exp(-0.5) sigmoid(N(0, 1)).

    python benchmarks/bench_generalized_delta_rule.py                      # T = 1024, 2048, 4096
    python benchmarks/bench_generalized_delta_rule.py --lengths 4096 --repeats 1

Timing: in this process, the forms (and a torch.mm of 2048^3, the machine's matmul rate in the same
run) are run interleaved (A B C D, D C B A, ...) and the median is kept, so a slow spell of a shared
machine hits every form alike; ratios are within one T. Peak memory: each (form, T) runs once in a
fresh subprocess and reports its peak resident memory above the resident memory it had before the
call (inputs included in the baseline). GFLOP/s of the chunked form counts the multiply-adds of its
matrix products, triangular solve and pairwise sub-chunk scores (`chunked_flops`); of the compiled
kernel, the recurrence's 5 multiply-adds per state element and token (`recurrence_flops`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from seqarch.bench.memory import peak_rss_growth_bytes
from seqarch.ops.generalized_delta_rule import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SUBCHUNK_SIZE,
    generalized_delta_rule,
    generalized_delta_rule_ref,
    resolve_backend,
)

HEADS, HEAD_SIZE = 12, 64
MATMUL_SIZE = 2048


def load_fla_naive():
    """fla-core's dplr naive.py as a module, or None when fla-core is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "ops", "generalized_delta_rule", "dplr", "naive.py")
    module_spec = importlib.util.spec_from_file_location("fla_dplr_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_inputs(length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, length, HEADS, HEAD_SIZE)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    kappa = F.normalize(torch.randn(shape, generator=generator), dim=-1)
    a, b = -kappa, kappa * torch.rand(shape, generator=generator)
    gk = -math.exp(-0.5) * torch.sigmoid(torch.randn(shape, generator=generator))
    return q, k, v, a, b, gk


def run_form(form: str, inputs, naive=None) -> None:
    with torch.no_grad():
        if form in ("compiled", "chunked"):
            generalized_delta_rule(*inputs, backend=form)
        elif form == "sequential":
            generalized_delta_rule_ref(*inputs)
        elif form == "fla_naive":  # (B, H, T, K) layout
            naive.dplr_recurrence(*(t.transpose(1, 2) for t in inputs), output_final_state=False)
        else:
            raise ValueError(form)


def chunked_flops(length: int, chunk: int = DEFAULT_CHUNK_SIZE, sub: int = DEFAULT_SUBCHUNK_SIZE,
                  heads: int = HEADS, key: int = HEAD_SIZE, value: int = HEAD_SIZE) -> float:
    """Floating-point operations of the chunked forward (2 per multiply-add), per the module docstring of
    seqarch/ops/generalized_delta_rule.py; elementwise exps and rescalings not counted."""
    chunks = math.ceil(length / chunk)
    subs = chunk // sub
    pairs_diagonal = subs * sub * (sub + 1) / 2  # pairwise scores inside sub-chunks, per chunk
    pairs_earlier = sub * sub * subs * (subs - 1) / 2  # scores against earlier sub-chunks
    per_chunk = (
        4 * 2 * key * (pairs_diagonal + pairs_earlier)  # the four score matrices (q|a) x (k|b)
        + 2 * chunk * chunk * value  # A_ak V
        + chunk**3  # (I - A_ab)^-1, a unit-lower-triangular solve with C right-hand sides
        + 2 * chunk * chunk * (value + key)  # U = T A_ak V, W_t = T (a exp(G))
        + 2 * key * chunk * value  # K~^T V
        + 2 * 2 * chunk * key * value  # the state passing: reads W_t S, update B~^T SA
        + 2 * chunk * key * value + 2 * 2 * chunk * chunk * value  # output: q~ S, A_qk V, A_qb SA
    )
    return heads * chunks * per_chunk


def recurrence_flops(length: int, heads: int = HEADS, key: int = HEAD_SIZE, value: int = HEAD_SIZE) -> float:
    """Floating-point operations of the recurrence's forward (2 per multiply-add): per state element and
    token, the read a^T S, the update e S + b sa + k v (3) and the output q^T S."""
    return 2 * 5 * heads * length * key * value


def measure_peak_memory(form: str, length: int) -> int:
    inputs = make_inputs(length)
    naive = load_fla_naive() if form == "fla_naive" else None
    return peak_rss_growth_bytes(run_form, form, inputs, naive)


def peak_memory_in_subprocess(form: str, length: int, threads: int) -> int:
    command = [sys.executable, __file__, "--memory-case", form, str(length), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def benchmark(args, naive, with_compiled: bool) -> list[dict]:
    forms = (["compiled"] if with_compiled else []) + ["chunked", "sequential"] + (["fla_naive"] if naive else [])
    left, right = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    rows = []
    for length in args.lengths:
        inputs = make_inputs(length)
        jobs = {form: (lambda form=form, inputs=inputs: run_form(form, inputs, naive)) for form in forms}
        jobs["mm"] = lambda: torch.mm(left, right)
        jobs["chunked"]()  # warm-up; the token loops need none
        if with_compiled:
            jobs["compiled"]()
        jobs["mm"]()
        times = {name: [] for name in jobs}
        for repeat in range(args.repeats):
            for name in list(jobs) if repeat % 2 == 0 else reversed(list(jobs)):
                start = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        mm_gflops = 2 * MATMUL_SIZE**3 / medians["mm"] / 1e9
        for form in forms:
            peak = peak_memory_in_subprocess(form, length, args.threads)
            counted = {"chunked": chunked_flops, "compiled": recurrence_flops}.get(form)
            gflops = counted(length) / medians[form] / 1e9 if counted else None
            rows.append({"length": length, "form": form, "seconds": medians[form], "peak_mb": peak / 2**20,
                         "vs_sequential": medians["sequential"] / medians[form],
                         "vs_fla_naive": medians["fla_naive"] / medians[form] if naive is not None else None,
                         "gflops": gflops, "mm_gflops": mm_gflops})
            print_row(rows[-1])
    return rows


def print_header() -> None:
    print(f"| {'T':>5} | {'form':<10} | {'median ms':>10} | {'peak MB':>8} | {'seq / form':>10} | {'fla / form':>10} "
          f"| {'GFLOP/s':>8} | {'mm GFLOP/s':>10} |")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")


def print_row(row: dict) -> None:
    fla = f"{row['vs_fla_naive']:.1f}x" if row["vs_fla_naive"] is not None else "-"
    gflops = f"{row['gflops']:.1f}" if row["gflops"] is not None else "-"
    print(f"| {row['length']:>5} | {row['form']:<10} | {row['seconds'] * 1e3:>10.1f} | {row['peak_mb']:>8.1f} "
          f"| {row['vs_sequential']:>9.1f}x | {fla:>10} | {gflops:>8} | {row['mm_gflops']:>10.1f} |", flush=True)


def print_memory_scaling(rows: list[dict]) -> None:
    """Peak memory per token at each T: flat when memory is linear in T."""
    print("\npeak memory per token (KB): flat = linear in T")
    for form in dict.fromkeys(row["form"] for row in rows):
        cells = [f"T={row['length']}: {row['peak_mb'] * 1024 / row['length']:.1f}"
                 for row in rows if row["form"] == form]
        print(f"  {form:<10} " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-case", nargs=2, metavar=("FORM", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case:
        form, length = args.memory_case
        print(measure_peak_memory(form, int(length)))
        return
    naive = load_fla_naive()
    if naive is None:
        print("fla_naive skipped: fla-core is not installed (pip install --no-deps -r requirements-reference.txt)")
    print(f"generalized_delta_rule forward, B=1, H={HEADS}, K=V={HEAD_SIZE}, float32, {args.threads} thread(s), "
          f"chunk {DEFAULT_CHUNK_SIZE} / sub-chunk {DEFAULT_SUBCHUNK_SIZE}, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved runs\n")
    try:
        with_compiled = resolve_backend("compiled", "cpu") == "compiled"
    except RuntimeError as error:
        print(f"compiled skipped: {error}")
        with_compiled = False
    print_header()
    rows = benchmark(args, naive, with_compiled)
    print_memory_scaling(rows)


if __name__ == "__main__":
    main()
