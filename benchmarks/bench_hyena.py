"""Hyena speed and memory on CPU: fftconv, mixer forward vs attention, decoding, distillation error.

    PYTHONPATH=$PWD python benchmarks/bench_hyena.py --quick     # < 1 min, d_model 128, L <= 4096
    PYTHONPATH=$PWD python benchmarks/bench_hyena.py             # d_model 768, L = 256 ... 16384

Tables (Markdown on stdout):
1. fftconv forward vs L (D channels, batch 1): median time, tokens/s.
2. hyena vs attention forward at the same width vs L, timed interleaved (A B A B ...), medians,
   the ratio, and the crossover length where Hyena becomes faster; peak RSS of one forward, each
   case in its own subprocess (timing and memory: seqarch.bench.timing).
3. decode latency per token after a prefill of T tokens: exact (history) vs distilled (modal).
4. distillation error (median / max relative L2 over channels) vs d_state.

Timings on a shared machine are noisy: read ratios measured in the same run, not absolute times.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from seqarch import build_mixer
from seqarch.bench.timing import Benchmark, interleaved_medians, run_benchmark, with_mode
from seqarch.ops.fftconv import fftconv


def fftconv_setup(impl: str, length: int, mode: str, d_model: int = 768):
    """impl "fftconv": one `fftconv` of d_model random channels and filters of length L."""
    u, k = torch.randn(1, d_model, length), torch.randn(d_model, length)
    return with_mode(lambda: fftconv(u, k), [], mode)


def forward_setup(name: str, length: int, mode: str, d_model: int = 768, max_len: int = 16384):
    """One forward of mixer `name` ("hyena" with filters of `max_len`, or "attention") at width d_model."""
    overrides = {"max_len": max_len} if name == "hyena" else {}
    mixer = build_mixer(name, d_model=d_model, **overrides)
    x = torch.randn(1, length, d_model)
    return with_mode(lambda: mixer(x), [], mode)


FFTCONV = Benchmark(target="benchmarks.bench_hyena:FFTCONV", impls=("fftconv",), setup=fftconv_setup,
                    modes=("forward",))
FORWARD = Benchmark(target="benchmarks.bench_hyena:FORWARD", impls=("hyena", "attention"), setup=forward_setup,
                    modes=("forward",))


def table_fftconv(d_model: int, lengths, repeats: int) -> None:
    print(f"\n### fftconv forward, {d_model} channels, batch 1\n")
    print("| L | median ms | ktokens/s |")
    print("|---|---|---|")
    for row in run_benchmark(FFTCONV, lengths, repeats, memory=False, options={"d_model": d_model}):
        print(f"| {row['L']} | {row['seconds'] * 1e3:.2f} | {row['L'] / row['seconds'] / 1e3:.1f} |")


def table_forward(d_model: int, lengths, repeats: int, memory: bool) -> None:
    print(f"\n### forward, d_model {d_model}, batch 1: hyena vs attention (interleaved medians)\n")
    print("| L | hyena ms | attention ms | attention / hyena | hyena peak MiB | attention peak MiB |")
    print("|---|---|---|---|---|---|")
    rows = run_benchmark(FORWARD, lengths, repeats, memory=memory, threads=torch.get_num_threads(),
                         options={"d_model": d_model, "max_len": max(lengths)},
                         progress=lambda line: print(line, file=sys.stderr, flush=True))
    cases = {(row["L"], row["impl"]): row for row in rows}
    crossover = None
    for length in lengths:
        hyena, attention = cases[(length, "hyena")], cases[(length, "attention")]
        ratio = attention["seconds"] / hyena["seconds"]
        if ratio > 1 and crossover is None:
            crossover = length
        mem = ["-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}" for row in (hyena, attention)]
        print(f"| {length} | {hyena['seconds'] * 1e3:.1f} | {attention['seconds'] * 1e3:.1f} | {ratio:.2f} | "
              f"{mem[0]} | {mem[1]} |")
    where = f"L = {crossover}" if crossover else f"none up to L = {max(lengths)}"
    print(f"\nCrossover (first L where hyena forward is faster than attention): {where}")


def decode(mixer, state, tokens: torch.Tensor) -> None:
    for t in range(tokens.shape[1]):
        _, state = mixer.step(tokens[:, t], state)


def table_decode(d_model: int, contexts, steps: int, d_state: int) -> None:
    print(f"\n### decode latency per token, d_model {d_model}, batch 1, after a prefill of T tokens\n")
    print("| T | exact ms/token | distilled ms/token | exact / distilled | exact state KiB | distilled state KiB |")
    print("|---|---|---|---|---|---|")
    max_len = max(contexts) + steps + 1
    exact = build_mixer("hyena", d_model=d_model, max_len=max_len)
    distilled = build_mixer("hyena", d_model=d_model, max_len=max_len)
    distilled.load_state_dict(exact.state_dict())
    distilled.distill(d_state=d_state)
    tokens = torch.randn(1, steps, d_model)
    for context in contexts:
        prompt = torch.randn(1, context, d_model)
        with torch.no_grad():
            states = {name: mixer.prefill(prompt, mixer.init_state(1))[1]
                      for name, mixer in (("exact", exact), ("distilled", distilled))}
            medians = interleaved_medians({name: lambda m=mixer, s=states[name]: decode(m, s, tokens)
                                           for name, mixer in (("exact", exact), ("distilled", distilled))}, 3)
        exact_ms, distilled_ms = (medians[name] / steps * 1e3 for name in ("exact", "distilled"))
        print(f"| {context} | {exact_ms:.3f} | {distilled_ms:.3f} | {exact_ms / distilled_ms:.1f} | "
              f"{exact.state_nbytes(1, context) / 1024:.0f} | {distilled.state_nbytes(1, context) / 1024:.1f} |")


def table_distill(d_model: int, max_len: int, d_states) -> None:
    print(f"\n### distillation error, d_model {d_model}, max_len {max_len}, default init (seed 0)\n")
    print("| d_state | median rel. L2 | mean | max | fit seconds |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    base = build_mixer("hyena", d_model=d_model, max_len=max_len)
    for d_state in d_states:
        mixer = build_mixer("hyena", d_model=d_model, max_len=max_len)
        mixer.load_state_dict(base.state_dict())
        start = time.perf_counter()
        error = mixer.distill(d_state=d_state)
        seconds = time.perf_counter() - start
        print(f"| {d_state} | {error.median():.2e} | {error.mean():.2e} | {error.max():.2e} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small width and lengths, < 1 min")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--tables", default="fftconv,forward,decode,distill",
                        help="comma-separated subset of: fftconv, forward, decode, distill")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    tables = set(args.tables.split(","))
    if args.quick:
        width, lengths, contexts, steps, repeats = 128, [256, 1024, 4096], [256, 1024, 4096], 16, 3
        distill_case = (64, 1024, [2, 8, 32])
    else:
        width, lengths, contexts, steps, repeats = 768, [256, 512, 1024, 2048, 4096, 8192, 16384], \
            [256, 1024, 4096, 16384], 32, 5
        distill_case = (256, 2048, [2, 4, 8, 16, 32, 64])
    if "fftconv" in tables:
        table_fftconv(width, lengths, repeats)
    if "forward" in tables:
        table_forward(width, lengths, repeats, memory=not args.no_memory)
    if "decode" in tables:
        table_decode(width, contexts, steps=steps, d_state=16)
    if "distill" in tables:
        table_distill(*distill_case)

if __name__ == "__main__":
    main()
