"""Mamba-3 on CPU: the chunked scan against its sequential reference, the scan's peak memory over
sequence lengths, and the mamba3 layer against the mamba2 layer of the same width in training.

    PYTHONPATH=$PWD python benchmarks/bench_mamba3.py            # L = 4096; memory at 1024, 2048, 4096
    PYTHONPATH=$PWD python benchmarks/bench_mamba3.py --quick    # L = 1024; memory at 256, 512, 1024

Sizes: d_model 768 with mamba-ssm's Mamba-3 defaults (expand 2, head_dim 64 -> 24 heads, d_state 128,
rope_fraction 0.5 -> 32 angles, chunk 64), batch 1, float32. The scan's inputs are what the layer
feeds it (its own in_proj of a random input). Timings are interleaved rounds in one process, reported
as medians, so load on a shared machine hits both sides alike; memory is the growth of the peak
resident set in a child process (the harness of benchmarks/bench_mamba2.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch

from benchmarks.bench_mamba2 import force_mmap_for_large_allocations, measure, peak_memory_mib
from seqarch import build_mixer
from seqarch.ops.mamba3 import mamba3_scan

D_MODEL = 768


def scan_inputs(length: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    mixer = build_mixer("mamba3", d_model=D_MODEL, head_dim=64)
    with torch.no_grad():
        arguments, _ = mixer._scan_inputs(torch.randn(1, length, D_MODEL))
    return arguments


def scan_forward(arguments: dict, backend: str) -> None:
    with torch.no_grad():
        mamba3_scan(**arguments, backend=backend)


def scan_forward_backward(arguments: dict, backend: str) -> None:
    leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in arguments.items()}
    mamba3_scan(**leaves, backend=backend)[0].sum().backward()


def scan_speed(length: int, repeats: int) -> dict:
    """Median seconds of the chunked and the sequential forward, interleaved."""
    arguments = scan_inputs(length)
    times = {"chunked": [], "sequential": []}
    scan_forward(arguments, "chunked")  # warm-up
    for _ in range(repeats):
        for backend in times:
            start = time.perf_counter()
            scan_forward(arguments, backend)
            times[backend].append(time.perf_counter() - start)
    return {backend: statistics.median(samples) for backend, samples in times.items()}


def scan_memory(lengths) -> dict:
    """{(mode, L): peak MiB} of the chunked scan, in this (child) process."""
    force_mmap_for_large_allocations()
    peaks = {}
    for length in lengths:
        arguments = scan_inputs(length)
        peaks[("forward", length)] = peak_memory_mib(scan_forward, arguments, "chunked")
        peaks[("forward+backward", length)] = peak_memory_mib(scan_forward_backward, arguments, "chunked")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="L = 1024 (memory at 256, 512, 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    length = 1024 if args.quick else 4096
    memory_lengths = [length // 4, length // 2, length]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, d_model {D_MODEL}, float32, "
          f"median of {args.repeats} interleaved rounds")

    speed = scan_speed(length, args.repeats)
    print(f"\n## Scan forward at L = {length}\n")
    print("| path | ms (median) | speed vs sequential |\n|---|---:|---:|")
    for backend, seconds in speed.items():
        print(f"| {backend} | {1e3 * seconds:.0f} | {speed['sequential'] / seconds:.1f}x |")

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peaks = pool.apply(scan_memory, (memory_lengths,))
    print("\n## Chunked scan peak memory (MiB; linear in L doubles with L)\n")
    print("| mode | " + " | ".join(f"L = {n}" for n in memory_lengths) + " | ratio per doubling |")
    print("|---|" + "---:|" * (len(memory_lengths) + 1))
    for mode in ("forward", "forward+backward"):
        values = [peaks[(mode, n)] for n in memory_lengths]
        ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(values, values[1:], strict=False))
        print(f"| {mode} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {ratios} |")

    specs = {"mamba2": {"name": "mamba2"}, "mamba3": {"name": "mamba3", "overrides": {"head_dim": 64}}}
    rows = measure(specs, [length], args.repeats, D_MODEL)
    print(f"\n## Layers at L = {length} (mamba2: seqarch defaults d_state 64, head dim 32; mamba3: mamba-ssm's)\n")
    baseline = {r["mode"]: r["seconds"] for r in rows if r["mixer"] == "mamba2"}
    print("| mode | mixer | ms (median) | tokens/s | peak MiB | speed vs mamba2 |\n|---|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["mode"], r["mixer"])):
        print(f"| {r['mode']} | {r['mixer']} | {1e3 * r['seconds']:.0f} | {r['L'] / r['seconds']:,.0f} | "
              f"{r['peak_mib']:.0f} | {baseline[r['mode']] / r['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
