"""Retention forms vs sequence length: tokens/s, peak memory, and speed ratios to the loop reference.

Legend: B batch (1), H heads (12), T length, K = V head dim (64), C chunk length.

    PYTHONPATH=$PWD python benchmarks/bench_retention.py            # full sweep, T = 256 .. 8192
    PYTHONPATH=$PWD python benchmarks/bench_retention.py --quick    # T = 256, 1024, 4096; about 1 min quiet

Forms: `chunkwise` (default path), `parallel` (O(T^2) memory; skipped above --parallel-max),
`recurrent` (the op's loop of `retention_step`) and `reference` (`retention_ref`, the sequential
loop). Timings are interleaved (every form once per round, rounds repeated; seqarch.bench.timing) and
reported as medians, so a slow stretch of a shared machine hits all forms alike; the ratio column is
reference time / form time from the same run. Peak memory is the growth of the process's peak RSS (Linux VmHWM)
over one run (inputs made before the baseline), each (form, T) in a fresh subprocess so that every peak is its own.
A second table times the chunkwise form for several chunk lengths (how the default C was chosen).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from seqarch.bench.timing import Benchmark, run_benchmark, with_mode
from seqarch.ops.retention import retention, retention_ref

HEADS, HEAD_DIM = 12, 64
FORMS = ("chunkwise", "parallel", "recurrent", "reference")
BACKEND = {"chunkwise": "chunked", "parallel": "parallel", "recurrent": "sequential"}  # label -> backend
MODES = ("forward", "fwd+bwd")
CHUNK_SIZES = (16, 32, 64, 128, 256)


def make_inputs(length: int, requires_grad: bool):
    torch.manual_seed(0)
    return [torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=requires_grad) for _ in range(3)]


def setup(form: str, length: int, mode: str, chunk_size: int = 64):
    """One call of `form` (and its backward in mode "fwd+bwd") on inputs made here."""
    inputs = make_inputs(length, mode != "forward")
    q, k, v = inputs
    if form == "reference":
        return with_mode(lambda: retention_ref(q, k, v)[0], inputs, mode)
    return with_mode(lambda: retention(q, k, v, backend=BACKEND[form], chunk_size=chunk_size)[0], inputs, mode)


def chunk_setup(impl: str, length: int, mode: str):
    """impl "C=<chunk length>": the chunkwise form with that chunk."""
    return setup("chunkwise", length, mode, chunk_size=int(impl.removeprefix("C=")))


def prepare() -> None:
    """Run the chunkwise form once at T = 64, so lazily initialised kernels are loaded before measuring."""
    for mode in MODES:
        setup("chunkwise", 64, mode)()


BENCHMARK = Benchmark(target="benchmarks.bench_retention:BENCHMARK", impls=("chunkwise", "reference", "parallel",
                      "recurrent"), setup=setup, modes=MODES, prepare=prepare)
CHUNKS = Benchmark(target="benchmarks.bench_retention:CHUNKS", impls=tuple(f"C={size}" for size in CHUNK_SIZES),
                   setup=chunk_setup, modes=("fwd+bwd",), prepare=prepare)


def forms_for(length: int, train: bool, args) -> list[str]:
    forms = ["chunkwise", "reference"]
    if length <= args.parallel_max:
        forms.append("parallel")
    if length <= args.recurrent_max:
        forms.append("recurrent")
    if train and length > args.reference_train_max:
        forms.remove("reference")
    return forms


def sweep(args) -> None:
    print(f"retention, B=1, H={HEADS}, K=V={HEAD_DIM}, float32, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} interleaved rounds after one warm-up round")
    registration = dataclasses.replace(
        BENCHMARK, runnable=lambda form, length, mode: form in forms_for(length, mode != "forward", args))
    header = (f"{'pass':<8}{'T':>6}  {'form':<10}{'time (ms)':>11}{'tokens/s':>12}"
              f"{'peak MB':>10}{'ref / form':>12}")
    print(header)
    print("-" * len(header))

    def print_rows(rows: list[dict]) -> None:
        medians = {r["impl"]: r["seconds"] for r in rows}
        for r in sorted(rows, key=lambda r: FORMS.index(r["impl"])):
            seconds = r["seconds"]
            memory = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else math.nan
            ratio = medians["reference"] / seconds if "reference" in medians else math.nan
            print(f"{'fwd+bwd' if r['mode'] != 'forward' else 'forward':<8}{r['L']:>6}  {r['impl']:<10}"
                  f"{seconds * 1e3:>11.1f}{r['L'] / seconds:>12.0f}{memory:>10.1f}{ratio:>12.1f}", flush=True)

    run_benchmark(registration, args.lengths, args.repeats, memory=args.memory, threads=torch.get_num_threads(),
                  on_rows=print_rows)


def chunk_sweep(args) -> None:
    length = args.chunk_length
    print(f"\nchunkwise forward+backward at T={length}: time (ms) by chunk length, median of {args.repeats}")
    rows = run_benchmark(CHUNKS, [length], args.repeats, memory=False)
    print("  ".join(f"{r['impl']}: {r['seconds'] * 1e3:.1f}" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="T = 256, 1024, 4096, 3 rounds; parallel form and the reference's backward up to 1024")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--parallel-max", type=int, default=4096, help="longest T for the O(T^2) parallel form")
    parser.add_argument("--recurrent-max", type=int, default=8192, help="longest T for the op's recurrent loop")
    parser.add_argument("--reference-train-max", type=int, default=4096,
                        help="longest T for the reference's backward (autograd keeps every step's state)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths = (256, 1024, 4096)
        args.repeats = args.repeats or 3
        args.recurrent_max = 1024
        args.parallel_max = 1024
        args.reference_train_max = 1024
        args.chunk_length = 1024
    else:
        args.lengths = (256, 512, 1024, 2048, 4096, 8192)
        args.repeats = args.repeats or 5
        args.chunk_length = 4096
    sweep(args)
    chunk_sweep(args)


if __name__ == "__main__":
    main()
