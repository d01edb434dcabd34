"""The gated delta rule, forward: the compiled C++ kernel and the chunked WY/UT path vs the sequential
reference vs flash-linear-attention's `naive_recurrent_gated_delta_rule`, and the chunked path's matmul rate.

Legend: B batch (1), H heads (12), T length, K = V head dims (64), C chunk length (64).

    python benchmarks/bench_delta_rule.py                       # T = 1024, 2048, 4096; 3 interleaved repeats
    python benchmarks/bench_delta_rule.py --lengths 4096 --threads 1

The compiled form is skipped, and said so, when the kernel cannot be built here (no C++ compiler).

Timing: in this process, the forms are run interleaved (A B C A B C ...) and the median is kept, so a
slow spell of a shared machine hits every form alike; speed-ups are ratios within one T. fla's naive
function is loaded from its file (importing `fla` pulls triton); it is skipped, and said so, when
fla-core is not installed (pip install --no-deps -r requirements-reference.txt). Peak memory: each
(form, T) runs once in a fresh subprocess and reports its peak resident memory above the resident
memory it had before the call (seqarch.bench.memory). The matmul rate of the chunked path is the count
of its matrix-product FLOPs (`chunked_flops`) over its median time, next to torch.mm on 2048 x 2048
matrices timed in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqarch.bench.memory import peak_rss_growth_bytes
from seqarch.ops.delta_rule import DEFAULT_CHUNK_SIZE, KERNEL, gated_delta_rule, gated_delta_rule_ref

HEADS, HEAD_DIM = 12, 64


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


def measure_peak_memory(form: str, length: int) -> int:
    fla = load_fla_naive() if form == "fla_naive" else None
    if form == "compiled":
        KERNEL.load()  # the extension's own memory is not the form's
    function = forms(fla)[form]
    inputs = make_inputs(length)
    with torch.no_grad():
        return peak_rss_growth_bytes(function, *inputs)


def peak_memory_in_subprocess(form: str, length: int, threads: int) -> int:
    command = [sys.executable, __file__, "--memory-case", form, str(length), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def matmul_rate(repeats: int) -> float:
    """GFLOP/s of torch.mm on two 2048 x 2048 float32 matrices (median of `repeats`)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def benchmark(args) -> None:
    fla = load_fla_naive()
    if fla is None:
        print("fla-core is not installed: fla's naive function is skipped "
              "(pip install --no-deps -r requirements-reference.txt)")
    usable, reason = KERNEL.usable()
    if not usable:
        print(f"the compiled kernel is unavailable here: {reason}")
    functions = forms(fla, usable)
    reference = "compiled" if usable else "chunked"
    print(f"threads {torch.get_num_threads()}, B=1, H={HEADS}, K=V={HEAD_DIM}, C={DEFAULT_CHUNK_SIZE}, "
          f"{args.repeats} interleaved repeats, medians\n")
    header, header_chunked = f"{reference} is x faster", "chunked is x faster"
    print(f"| {'T':>5} | {'form':<10} | {'median s':>9} | {'peak MB':>8} | {header:>20} | {header_chunked:>19} |")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 22}|{'-' * 21}|")
    rates = []
    with torch.no_grad():
        for length in args.lengths:
            inputs = make_inputs(length)
            names = list(functions)
            times = {name: [] for name in names}
            for name in ("compiled", "chunked"):  # warm-up (and the kernel's build or load)
                if name in functions:
                    functions[name](*inputs)
            mm_times = []
            for repeat in range(args.repeats):
                for name in names if repeat % 2 == 0 else reversed(names):
                    start = time.perf_counter()
                    functions[name](*inputs)
                    times[name].append(time.perf_counter() - start)
                mm_times.append(matmul_rate(1))
            medians = {name: statistics.median(values) for name, values in times.items()}
            for name in names:
                peak = peak_memory_in_subprocess(name, length, args.threads) / 2**20
                ratio = medians[name] / medians[reference]
                ratio_chunked = medians[name] / medians["chunked"]
                print(f"| {length:>5} | {name:<10} | {medians[name]:>9.3f} | {peak:>8.1f} | {ratio:>19.1f}x | "
                      f"{ratio_chunked:>18.1f}x |", flush=True)
            chunked_rate = chunked_flops(length) / medians["chunked"] / 1e9
            rates.append((length, chunked_rate, statistics.median(mm_times)))
    print("\nmatmul rate (GFLOP/s): the chunked path's matrix products vs torch.mm 2048^3, same run")
    for length, chunked_rate, mm_rate in rates:
        print(f"  T={length}: chunked {chunked_rate:.1f} ({chunked_flops(length) / 1e9:.2f} GFLOP), "
              f"torch.mm {mm_rate:.1f}: {100 * chunked_rate / mm_rate:.0f}% of the matmul rate")


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
    benchmark(args)


if __name__ == "__main__":
    main()
