"""Benchmark the selective scan paths and the `mamba` mixer on CPU (batch 1, d_model 768).

Legend: B batch (1), L length, D d_inner (1536), N d_state (16).

Scan implementations, timed interleaved (A B C A B C ...) in one process (seqarch.bench.timing),
median of --repeats:
  compiled    the default CPU path (C++ kernel, seqarch.ops.selective_scan)
  chunked     the eager chunked PyTorch fallback
  sequential  selective_scan_ref, the loop over time steps (the oracle)
  mambapy     mamba.py's parallel scan (PyPI `mambapy`), which materialises (B, L, D, N);
              optional: reported as missing when not installed
Mixers: `mamba` (default scan) against `attention` (12 heads) of the same width.
Peak memory: each case once more in a fresh subprocess, peak RSS above the RSS before the call
(inputs and the compiled kernel loaded before it).

    python benchmarks/bench_mamba.py            # L = 256 ... 8192 (slow cases capped, see CAPS)
    python benchmarks/bench_mamba.py --quick    # L = 1024, < 1 min on a quiet machine
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from einops import rearrange

from seqarch import build_mixer
from seqarch.backends import module_available
from seqarch.bench.timing import Benchmark, run_benchmark, with_mode
from seqarch.ops.selective_scan import KERNEL, selective_scan, selective_scan_ref

D_MODEL, D_INNER, D_STATE = 768, 1536, 16
# Largest L each (implementation, mode) runs at: beyond it a single call takes minutes (the
# sequential loop, whose backward costs ~8x its forward) or more memory than the machine has.
CAPS = {
    ("sequential", "fwd"): 4096,
    ("sequential", "fwd+bwd"): 256,
    ("chunked", "fwd"): 4096,
    ("chunked", "fwd+bwd"): 1024,
    ("mambapy", "fwd"): 8192,
    ("mambapy", "fwd+bwd"): 4096,
}
SCANS = ("compiled", "chunked", "sequential", "mambapy")
MIXERS = ("mamba", "attention")
MODES = ("fwd", "fwd+bwd")


def scan_inputs(length: int, requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "u": torch.randn(1, D_INNER, length, generator=gen),
        "delta": torch.randn(1, D_INNER, length, generator=gen) * 0.5 - 3,
        "A": -torch.arange(1, D_STATE + 1.0).repeat(D_INNER, 1),
        "B": torch.randn(1, D_STATE, length, generator=gen),
        "C": torch.randn(1, D_STATE, length, generator=gen),
        "D": torch.ones(D_INNER),
        "delta_bias": torch.randn(D_INNER, generator=gen) * 0.1,
    }
    return {k: v.requires_grad_(requires_grad) for k, v in tensors.items()}


def mambapy_scan(u, delta, A, B, C, D, delta_bias):
    """mamba.py's `selective_scan`, on our (B, D, L) inputs: everything as (B, L, D, N)."""
    from mambapy.pscan import pscan

    x = rearrange(u, "b d l -> b l d")
    dt = F.softplus(rearrange(delta, "b d l -> b l d") + delta_bias)
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (B, L, D, N)
    inputs = dt.unsqueeze(-1) * rearrange(B, "b n l -> b l 1 n") * x.unsqueeze(-1)  # (B, L, D, N)
    states = pscan(decay, inputs)
    y = (states @ rearrange(C, "b n l -> b l n 1")).squeeze(-1) + D * x
    return rearrange(y, "b l d -> b d l")


def scan_call(name: str, length: int, mode: str):
    """A zero-argument callable running one forward (or forward + backward) of scan `name`."""
    inputs = scan_inputs(length, mode == "fwd+bwd")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D")]
    if name == "mambapy":
        def forward():
            return mambapy_scan(*args, inputs["delta_bias"])
    elif name == "sequential":
        def forward():
            return selective_scan_ref(*args, delta_bias=inputs["delta_bias"], delta_softplus=True)
    else:
        def forward():
            return selective_scan(*args, delta_bias=inputs["delta_bias"], delta_softplus=True, backend=name)
    return with_mode(forward, inputs.values(), mode)


def mixer_call(name: str, length: int, mode: str):
    torch.manual_seed(0)
    kwargs = {"n_heads": 12} if name == "attention" else {}
    mixer = build_mixer(name, d_model=D_MODEL, **kwargs)
    x = torch.randn(1, length, D_MODEL)
    return with_mode(lambda: mixer(x), mixer.parameters(), mode)


def runnable(name: str, length: int, mode: str) -> bool:
    if name == "mambapy" and not module_available("mambapy"):
        return False
    if name == "compiled" and not KERNEL.usable()[0]:
        return False
    return length <= CAPS.get((name, mode), 1 << 30)


def prepare() -> None:
    """Build or load the kernel (and import mamba.py) once, so neither counts in a case's time or memory."""
    KERNEL.usable()
    if module_available("mambapy"):
        import mambapy.pscan  # noqa: F401


SCAN = Benchmark(target="benchmarks.bench_mamba:SCAN", impls=SCANS, setup=scan_call, modes=MODES,
                 runnable=runnable, prepare=prepare)
MIXER = Benchmark(target="benchmarks.bench_mamba:MIXER", impls=MIXERS, setup=mixer_call, modes=MODES,
                  runnable=runnable, prepare=prepare)


def sweep(benchmark: Benchmark, names, lengths, repeats: int, threads: int, measure_memory: bool):
    return run_benchmark(benchmark, lengths, repeats, impls=names, memory=measure_memory, threads=threads,
                         progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))


def print_table(rows, baseline: str) -> None:
    """One line per case (rows of `run_benchmark`); ratios are the baseline's speedup over each implementation
    (time_impl / time_baseline) and the baseline's peak memory as a fraction of the implementation's."""
    print("| mode | L | impl | median s | tokens/s | peak MB | " + f"{baseline} speedup | {baseline} memory / impl |")
    print("|---|---|---|---|---|---|---|---|")
    base = {(r["mode"], r["L"]): r for r in rows if r["impl"] == baseline}
    for r in rows:
        ref = base.get((r["mode"], r["L"]))
        speedup = f"{r['seconds'] / ref['seconds']:.1f}x" if ref else "-"
        memory = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        fraction = (f"{ref['peak_bytes'] / r['peak_bytes']:.2f}" if ref and ref["peak_bytes"] and r["peak_bytes"]
                    else "-")
        print(f"| {r['mode']} | {r['L']} | {r['impl']} | {r['seconds']:.4f} | {r['L'] / r['seconds']:,.0f} | "
              f"{memory} | {speedup} | {fraction} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 1024 only, 3 repeats (< 1 min when quiet)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--skip", nargs="+", default=[], choices=SCANS + MIXERS, help="implementations to leave out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths, repeats = ([1024], 3) if args.quick else (args.lengths, args.repeats)
    usable, reason = KERNEL.usable()  # build or load once before timing anything
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, d_model {D_MODEL}, d_inner {D_INNER}, "
          f"d_state {D_STATE}; medians of {repeats} interleaved runs")
    if not module_available("mambapy"):
        print("mambapy is not installed (pip install mambapy): its parallel scan is left out")
    if not usable:
        print(f"the compiled scan is left out: {reason}")
    print("\n## selective_scan (ratios: the compiled default against each)\n")
    scans = [name for name in SCANS if name not in args.skip]
    mixers = [name for name in MIXERS if name not in args.skip]
    print_table(sweep(SCAN, scans, lengths, repeats, args.threads, not args.no_memory), "compiled")
    print("\n## mixers, d_model 768 (ratios: mamba against each)\n")
    print_table(sweep(MIXER, mixers, lengths, repeats, args.threads, not args.no_memory), "mamba")


if __name__ == "__main__":
    main()
