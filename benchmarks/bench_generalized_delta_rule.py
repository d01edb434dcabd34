"""generalized_delta_rule forward: the compiled C++ kernel and the chunked DPLR form vs the sequential
reference vs flash-linear-attention's naive `dplr_recurrence`, time, peak memory and achieved GFLOP/s.

Forms: "compiled" (`generalized_delta_rule(backend="compiled")`, the C++ CPU kernel; skipped with a note
when it cannot build here), "chunked" (`generalized_delta_rule(backend="chunked")`), "sequential"
(`generalized_delta_rule_ref`, the token loop), "fla_naive" (fla-core's
ops/generalized_delta_rule/dplr/naive.py `dplr_recurrence`, loaded by path; skipped with a note when
fla-core is not installed: `MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps
--no-build-isolation -r requirements-reference.txt`).

Legend: B batch (1), H heads (12), T length, K = V head size (64). Inputs are RWKV-7-shaped:
a = -kappa, b = kappa * a_in with kappa unit-norm, gk = -exp(-0.5) sigmoid(N(0, 1)).

    python benchmarks/bench_generalized_delta_rule.py                      # T = 1024, 2048, 4096
    python benchmarks/bench_generalized_delta_rule.py --lengths 4096 --repeats 1

Timing (seqarch.bench.timing): in this process, the forms (and a torch.mm of 2048^3, the machine's
matmul rate in the same run) are run interleaved (A B C D, D C B A, ...) and the median is kept, so a
slow spell of a shared machine hits every form alike; ratios are within one T. Peak memory: each (form,
T) runs once in a fresh subprocess and reports its peak resident memory above the resident memory it had
before the call (inputs included in the baseline). GFLOP/s of the chunked form counts the multiply-adds
of its matrix products, triangular solve and pairwise sub-chunk scores (`chunked_flops`); of the
compiled kernel, the recurrence's 5 multiply-adds per state element and token (`recurrence_flops`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from seqarch.bench.timing import Benchmark, run_benchmark, with_mode
from seqarch.ops.generalized_delta_rule import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SUBCHUNK_SIZE,
    generalized_delta_rule,
    generalized_delta_rule_ref,
    resolve_backend,
)

HEADS, HEAD_SIZE = 12, 64
MATMUL_SIZE = 2048
FORMS = ("compiled", "chunked", "sequential", "fla_naive")
FLA_INSTALL = ("MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation "
               "-r requirements-reference.txt")


@functools.cache
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


def run_form(form: str, inputs, naive=None):
    """One forward of `form` (its output; grad mode is the caller's)."""
    if form in ("compiled", "chunked"):
        return generalized_delta_rule(*inputs, backend=form)[0]
    if form == "sequential":
        return generalized_delta_rule_ref(*inputs)[0]
    if form == "fla_naive":  # (B, H, T, K) layout
        return naive.dplr_recurrence(*(t.transpose(1, 2) for t in inputs), output_final_state=False)[0]
    raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")


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


def compiled_usable() -> bool:
    try:
        return resolve_backend("compiled", "cpu") == "compiled"  # builds or loads the kernel
    except RuntimeError:
        return False


def setup(form: str, length: int, mode: str = "forward"):
    """One forward of `form` under no_grad on inputs made here; "mm" is torch.mm of two 2048 x 2048 matrices,
    the machine's matmul rate in the same rounds."""
    if form == "mm":
        left, right = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        return with_mode(lambda: torch.mm(left, right), [], mode)
    inputs, naive = make_inputs(length), load_fla_naive() if form == "fla_naive" else None
    return with_mode(lambda: run_form(form, inputs, naive), [], mode)


def runnable(form: str, length: int, mode: str) -> bool:
    if form == "compiled":
        return compiled_usable()
    return form != "fla_naive" or load_fla_naive() is not None


BENCHMARK = Benchmark(target="benchmarks.bench_generalized_delta_rule:BENCHMARK", impls=(*FORMS, "mm"),
                      setup=setup, modes=("forward",), runnable=runnable, prepare=compiled_usable,
                      timing_only=("mm",), alternate=True)


def benchmark(args, naive) -> list[dict]:
    """Rows per (T, form), each T's printed as soon as it is measured."""
    rows = []

    def add(measured: list[dict]) -> None:
        medians = {r["impl"]: r["seconds"] for r in measured}
        for r in measured:
            length, form, seconds = r["L"], r["impl"], r["seconds"]
            if form == "mm":
                continue
            counted = {"chunked": chunked_flops, "compiled": recurrence_flops}.get(form)
            rows.append({"length": length, "form": form, "seconds": seconds,
                         "peak_mb": None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
                         "vs_sequential": medians["sequential"] / seconds,
                         "vs_fla_naive": medians["fla_naive"] / seconds if naive is not None else None,
                         "gflops": counted(length) / seconds / 1e9 if counted else None,
                         "mm_gflops": 2 * MATMUL_SIZE**3 / medians["mm"] / 1e9})
            print_row(rows[-1])

    run_benchmark(BENCHMARK, args.lengths, args.repeats, threads=args.threads, on_rows=add)
    return rows


def print_header() -> None:
    print(f"| {'T':>5} | {'form':<10} | {'median ms':>10} | {'peak MB':>8} | {'seq / form':>10} | {'fla / form':>10} "
          f"| {'GFLOP/s':>8} | {'mm GFLOP/s':>10} |")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")


def print_row(row: dict) -> None:
    fla = f"{row['vs_fla_naive']:.1f}x" if row["vs_fla_naive"] is not None else "-"
    gflops = f"{row['gflops']:.1f}" if row["gflops"] is not None else "-"
    peak = f"{row['peak_mb']:.1f}" if row["peak_mb"] is not None else "-"
    print(f"| {row['length']:>5} | {row['form']:<10} | {row['seconds'] * 1e3:>10.1f} | {peak:>8} "
          f"| {row['vs_sequential']:>9.1f}x | {fla:>10} | {gflops:>8} | {row['mm_gflops']:>10.1f} |", flush=True)


def print_memory_scaling(rows: list[dict]) -> None:
    """Peak memory per token at each T: flat when memory is linear in T."""
    print("\npeak memory per token (KB): flat = linear in T")
    for form in dict.fromkeys(row["form"] for row in rows):
        cells = [f"T={row['length']}: {row['peak_mb'] * 1024 / row['length']:.1f}"
                 for row in rows if row["form"] == form and row["peak_mb"] is not None]
        print(f"  {form:<10} " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    naive = load_fla_naive()
    if naive is None:
        print(f"fla_naive skipped: fla-core is not installed ({FLA_INSTALL})")
    print(f"generalized_delta_rule forward, B=1, H={HEADS}, K=V={HEAD_SIZE}, float32, {args.threads} thread(s), "
          f"chunk {DEFAULT_CHUNK_SIZE} / sub-chunk {DEFAULT_SUBCHUNK_SIZE}, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved runs\n")
    try:
        resolve_backend("compiled", "cpu")
    except RuntimeError as error:
        print(f"compiled skipped: {error}")
    print_header()
    rows = benchmark(args, naive)
    print_memory_scaling(rows)


if __name__ == "__main__":
    main()
