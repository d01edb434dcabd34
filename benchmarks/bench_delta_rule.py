"""The gated delta rule, forward: the compiled C++ kernel and the chunked WY/UT path vs the sequential
reference vs flash-linear-attention's `naive_recurrent_gated_delta_rule`, and the chunked path's matmul rate.

Legend: B batch (1), H heads (12), T length, K = V head dims (64), C chunk length (64).

    python benchmarks/bench_delta_rule.py                       # T = 1024, 2048, 4096; 3 interleaved repeats
    python benchmarks/bench_delta_rule.py --lengths 4096 --threads 1

The compiled form is skipped, and said so, when the kernel cannot be built here (no C++ compiler).

Timing (seqarch.bench.timing): in this process, the forms and a torch.mm of two 2048 x 2048 matrices
are run interleaved (A B C D, D C B A, ...) and the median is kept, so a slow spell of a shared machine
hits every form alike; speed-ups are ratios within one T. fla's naive function is loaded from its file
(importing `fla` pulls triton); it is skipped, and said so, when fla-core is not installed (see
FLA_INSTALL). Peak memory: each (form, T) runs once in a fresh subprocess and reports its peak resident
memory above the resident memory it had before the call (inputs included in the baseline). The matmul
rate of the chunked path is the count of its matrix-product FLOPs (`chunked_flops`) over its median
time, next to the torch.mm's rate in the same rounds.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from seqarch.bench.timing import Benchmark, run_benchmark, with_mode
from seqarch.ops.delta_rule import DEFAULT_CHUNK_SIZE, KERNEL, gated_delta_rule, gated_delta_rule_ref

HEADS, HEAD_DIM = 12, 64
MATMUL_SIZE = 2048
FLA_INSTALL = ("MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation "
               "-r requirements-reference.txt")


@functools.cache
def load_fla_naive():
    """fla's ops/gated_delta_rule/naive.py loaded by path, or None when fla-core is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "gated_delta_rule" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_gated_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_inputs(length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, length, HEADS, HEAD_DIM)
    q = F.normalize(torch.randn(shape, generator=generator), dim=-1)
    k = F.normalize(torch.randn(shape, generator=generator), dim=-1)
    v = torch.randn(shape, generator=generator)
    beta = torch.sigmoid(torch.randn(1, length, HEADS, generator=generator))
    g = F.logsigmoid(torch.randn(1, length, HEADS, generator=generator) + 3.0)  # decays mostly in (0.9, 1)
    return q, k, v, g, beta


def forms(fla, with_compiled: bool = True) -> dict:
    result = {}
    if with_compiled:
        result["compiled"] = lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, backend="compiled")
    result |= {
        "chunked": lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, backend="chunked"),
        "sequential": gated_delta_rule_ref,
    }
    if fla is not None:  # fla's naive function takes beta before g
        result["fla_naive"] = lambda q, k, v, g, beta: fla.naive_recurrent_gated_delta_rule(q, k, v, beta, g)
    return result


def chunked_flops(length: int, heads: int = HEADS, dk: int = HEAD_DIM, dv: int = HEAD_DIM,
                  chunk: int = DEFAULT_CHUNK_SIZE) -> int:
    """FLOPs of the chunked path's matrix products: per chunk and head, K K^T and Q K^T (2 C^2 K each),
    the inverse applied to [V | K] (2 C^2 (V + K)), A U and A W (2 C^2 (V + K)), K^T U and K^T W
    (2 C K (V + K)), the chunk-to-chunk product (2 K^2 V) and the read-out of the entering state (2 C K V).
    The elementwise work (decays, masks) and the small block inverse are not counted."""
    chunks = -(-length // chunk)
    per_chunk = (4 * chunk**2 * dk + 4 * chunk**2 * (dv + dk) + 2 * chunk * dk * (dv + dk) + 2 * dk**2 * dv
                 + 2 * chunk * dk * dv)
    return heads * chunks * per_chunk


def setup(form: str, length: int, mode: str = "forward"):
    """One forward of `form` under no_grad on inputs made here; "mm" is torch.mm of two 2048 x 2048 matrices,
    the machine's matmul rate in the same rounds."""
    if form == "mm":
        left, right = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        return with_mode(lambda: torch.mm(left, right), [], mode)
    function = forms(load_fla_naive())[form]
    inputs = make_inputs(length)
    return with_mode(lambda: function(*inputs), [], mode)


def runnable(form: str, length: int, mode: str) -> bool:
    if form == "compiled":
        return KERNEL.usable()[0]
    return form != "fla_naive" or load_fla_naive() is not None


BENCHMARK = Benchmark(target="benchmarks.bench_delta_rule:BENCHMARK",
                      impls=("compiled", "chunked", "sequential", "fla_naive", "mm"), setup=setup,
                      modes=("forward",), runnable=runnable, prepare=KERNEL.usable, timing_only=("mm",),
                      alternate=True)


def benchmark(args) -> None:
    if load_fla_naive() is None:
        print(f"fla-core is not installed: fla's naive function is skipped ({FLA_INSTALL})")
    usable, reason = KERNEL.usable()
    if not usable:
        print(f"the compiled kernel is unavailable here: {reason}")
    reference = "compiled" if usable else "chunked"
    print(f"threads {torch.get_num_threads()}, B=1, H={HEADS}, K=V={HEAD_DIM}, C={DEFAULT_CHUNK_SIZE}, "
          f"{args.repeats} interleaved repeats, medians\n")
    header, header_chunked = f"{reference} is x faster", "chunked is x faster"
    print(f"| {'T':>5} | {'form':<10} | {'median s':>9} | {'peak MB':>8} | {header:>20} | {header_chunked:>19} |")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 22}|{'-' * 21}|")
    medians = {}

    def print_rows(rows: list[dict]) -> None:
        medians.update({(r["L"], r["impl"]): r["seconds"] for r in rows})
        for r in rows:
            if r["impl"] == "mm":
                continue
            length, seconds = r["L"], r["seconds"]
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
            ratio = seconds / medians[(length, reference)]
            ratio_chunked = seconds / medians[(length, "chunked")]
            print(f"| {length:>5} | {r['impl']:<10} | {seconds:>9.3f} | {peak:>8} | {ratio:>19.1f}x | "
                  f"{ratio_chunked:>18.1f}x |", flush=True)

    run_benchmark(BENCHMARK, args.lengths, args.repeats, threads=args.threads, on_rows=print_rows)
    print("\nmatmul rate (GFLOP/s): the chunked path's matrix products vs torch.mm 2048^3, same run")
    for length in args.lengths:
        chunked_rate = chunked_flops(length) / medians[(length, "chunked")] / 1e9
        mm_rate = 2 * MATMUL_SIZE**3 / medians[(length, "mm")] / 1e9
        print(f"  T={length}: chunked {chunked_rate:.1f} ({chunked_flops(length) / 1e9:.2f} GFLOP), "
              f"torch.mm {mm_rate:.1f}: {100 * chunked_rate / mm_rate:.0f}% of the matmul rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    benchmark(args)


if __name__ == "__main__":
    main()
