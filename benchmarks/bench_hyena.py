"""Hyena speed and memory on CPU: fftconv, mixer forward vs attention, decoding, distillation error.

    PYTHONPATH=$PWD python benchmarks/bench_hyena.py --quick     # < 1 min, d_model 128, L <= 4096
    PYTHONPATH=$PWD python benchmarks/bench_hyena.py             # d_model 768, L = 256 ... 16384

Tables (Markdown on stdout):
1. fftconv forward vs L (D channels, batch 1): median time, tokens/s.
2. hyena vs attention forward at the same width vs L, timed interleaved (A B A B ...), medians,
   the ratio, and the crossover length where Hyena becomes faster; peak RSS of one forward, each
   case in its own subprocess.
3. decode latency per token after a prefill of T tokens: exact (history) vs distilled (modal).
4. distillation error (median / max relative L2 over channels) vs d_state.

Timings on a shared machine are noisy: read ratios measured in the same run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from seqarch import build_mixer
from seqarch.bench.memory import peak_rss_growth_bytes
from seqarch.ops.fftconv import fftconv


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each fn, timed A B A B ... so that slow phases of the machine hit all."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mib(name: str, d_model: int, length: int, max_len: int) -> float:
    """Peak resident memory (MiB) one forward adds, measured in a fresh subprocess."""
    case = json.dumps({"name": name, "d_model": d_model, "length": length, "max_len": max_len})
    command = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--memory-case", case]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_case(case: dict) -> None:
    """Print the growth of peak RSS (MiB) over one forward; imports and set-up do not count."""
    overrides = {"max_len": case["max_len"]} if case["name"] == "hyena" else {}
    mixer = build_mixer(case["name"], d_model=case["d_model"], **overrides)
    x = torch.randn(1, case["length"], case["d_model"])
    with torch.no_grad():
        print(peak_rss_growth_bytes(mixer, x) / 2**20)


def table_fftconv(d_model: int, lengths, repeats: int) -> None:
    print(f"\n### fftconv forward, {d_model} channels, batch 1\n")
    print("| L | median ms | ktokens/s |")
    print("|---|---|---|")
    for length in lengths:
        u, k = torch.randn(1, d_model, length), torch.randn(d_model, length)
        seconds = median_time(lambda u=u, k=k: fftconv(u, k), repeats)
        print(f"| {length} | {seconds * 1e3:.2f} | {length / seconds / 1e3:.1f} |")


def table_forward(d_model: int, lengths, repeats: int, memory: bool) -> None:
    print(f"\n### forward, d_model {d_model}, batch 1: hyena vs attention (interleaved medians)\n")
    print("| L | hyena ms | attention ms | attention / hyena | hyena peak MiB | attention peak MiB |")
    print("|---|---|---|---|---|---|")
    max_len = max(lengths)
    hyena = build_mixer("hyena", d_model=d_model, max_len=max_len)
    attention = build_mixer("attention", d_model=d_model)
    crossover = None
    for length in lengths:
        x = torch.randn(1, length, d_model)
        with torch.no_grad():
            medians = interleaved({"hyena": lambda x=x: hyena(x), "attention": lambda x=x: attention(x)}, repeats)
        ratio = medians["attention"] / medians["hyena"]
        if ratio > 1 and crossover is None:
            crossover = length
        mem = ([f"{peak_rss_mib(name, d_model, length, max_len):.0f}" for name in ("hyena", "attention")]
               if memory else ["-", "-"])
        print(f"| {length} | {medians['hyena'] * 1e3:.1f} | {medians['attention'] * 1e3:.1f} | {ratio:.2f} | "
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
            medians = interleaved({name: lambda m=mixer, s=states[name]: decode(m, s, tokens)
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
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        memory_case(json.loads(args.memory_case))
        return
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
