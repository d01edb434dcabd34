"""Mamba-3 on CPU: the compiled and chunked scans against the sequential reference, the compiled
scan's peak memory over sequence lengths, and the mamba3 layer (its default path: compiled on CPU)
against the mamba2 layer of the same width in training.

    python -m benchmarks.bench_mamba3            # L = 4096; memory at 1024, 2048, 4096
    python -m benchmarks.bench_mamba3 --quick    # L = 1024; memory at 256, 512, 1024

Sizes: d_model 768 with mamba-ssm's Mamba-3 defaults (expand 2, head_dim 64 -> 24 heads, d_state 128,
rope_fraction 0.5 -> 32 angles, chunk 64), batch 1, float32. The scan's inputs are what the layer
feeds it (its own in_proj of a random input). Timings are interleaved rounds in one process, reported
as medians, so load on a shared machine hits both sides alike; memory is the growth of the peak
resident set in a child process per case (seqarch.bench.timing).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import bench_mamba2
from seqarch import build_mixer
from seqarch.bench.timing import Benchmark, interleaved_medians, run_benchmark, with_mode
from seqarch.ops.mamba3 import mamba3_scan

D_MODEL = 768
MODES = ("forward", "forward+backward")


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


def scan_setup(impl: str, length: int, mode: str):
    """impl "compiled" | "chunked" | "sequential": one scan call on the layer's own inputs at L."""
    arguments = scan_inputs(length)
    run = scan_forward if mode == "forward" else scan_forward_backward
    return lambda: run(arguments, impl)


def layer_setup(impl: str, length: int, mode: str, d_model: int = D_MODEL):
    """impl "mamba2" (seqarch defaults) | "mamba3" (mamba-ssm's head_dim 64)."""
    if impl == "mamba3":
        torch.manual_seed(0)
        mixer = build_mixer("mamba3", d_model=d_model, head_dim=64)
        x = torch.randn(1, length, d_model).requires_grad_(mode != "forward")
        return with_mode(lambda: mixer(x), [x, *mixer.parameters()], mode)
    return bench_mamba2.setup(impl, length, mode, d_model)


SCAN = Benchmark(target="benchmarks.bench_mamba3:SCAN", impls=("compiled",), setup=scan_setup, modes=MODES,
                 force_mmap=True)
LAYERS = Benchmark(target="benchmarks.bench_mamba3:LAYERS", impls=("mamba2", "mamba3"), setup=layer_setup,
                   modes=MODES, force_mmap=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="L = 1024 (memory at 256, 512, 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    length = 1024 if args.quick else 4096
    memory_lengths = [length // 4, length // 2, length]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, batch 1, d_model {D_MODEL}, float32, "
          f"median of {args.repeats} interleaved rounds")

    speed = interleaved_medians({backend: scan_setup(backend, length, "forward")
                                 for backend in ("compiled", "chunked", "sequential")}, args.repeats)
    print(f"\n## Scan forward at L = {length}\n")
    print("| path | ms (median) | speed vs sequential |\n|---|---:|---:|")
    for backend, seconds in speed.items():
        print(f"| {backend} | {1e3 * seconds:.0f} | {speed['sequential'] / seconds:.1f}x |")

    memory_rows = run_benchmark(SCAN, memory_lengths, 1, threads=threads)
    peaks = {(r["mode"], r["L"]): r["peak_bytes"] / 2**20 for r in memory_rows}
    print("\n## Compiled scan peak memory (MiB; linear in L doubles with L)\n")
    print("| mode | " + " | ".join(f"L = {n}" for n in memory_lengths) + " | ratio per doubling |")
    print("|---|" + "---:|" * (len(memory_lengths) + 1))
    for mode in MODES:
        values = [peaks[(mode, n)] for n in memory_lengths]
        ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(values, values[1:], strict=False))
        print(f"| {mode} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {ratios} |")

    rows = run_benchmark(LAYERS, [length], args.repeats, threads=threads)
    print(f"\n## Layers at L = {length} (mamba2: seqarch defaults d_state 64, head dim 32; mamba3: mamba-ssm's)\n")
    baseline = {r["mode"]: r["seconds"] for r in rows if r["impl"] == "mamba2"}
    print("| mode | mixer | ms (median) | tokens/s | peak MiB | speed vs mamba2 |\n|---|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["mode"], r["impl"])):
        print(f"| {r['mode']} | {r['impl']} | {1e3 * r['seconds']:.0f} | {r['L'] / r['seconds']:,.0f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {baseline[r['mode']] / r['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
