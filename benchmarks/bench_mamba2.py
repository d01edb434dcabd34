"""Mamba-2 (and Mamba, when registered) against attention of the same width: tokens/s and peak
memory of forward and forward + backward, batch 1, d_model 768, over sequence lengths.

    PYTHONPATH=$PWD python benchmarks/bench_mamba2.py            # L = 256 ... 8192
    PYTHONPATH=$PWD python benchmarks/bench_mamba2.py --quick    # L = 512, 2048: under a minute
    PYTHONPATH=$PWD python benchmarks/bench_mamba2.py --chunks   # mamba2 chunk_size 32 ... 256

Timings are interleaved (every mixer once per round, rounds repeated) and reported as medians,
so load on a shared machine hits all mixers alike; the ratio column compares each mixer with
attention measured in the same rounds. Peak memory is measured in a separate child process: the
growth of its peak resident set during one call (Linux: VmHWM after resetting it through
/proc/self/clear_refs), with large allocations forced to mmap there so that freed tensors leave
the resident set at once (that setting slows allocation, so it never applies to the timings).
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import statistics
import time

import torch

from seqarch import build_mixer, list_mixers
from seqarch.bench.memory import peak_rss_growth_bytes

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def force_mmap_for_large_allocations() -> None:
    """Without this, glibc keeps freed large blocks in its heap and peak RSS misses later peaks."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 16)


def peak_memory_mib(fn, *args) -> float:
    """Growth of the peak resident set while fn(*args) runs, in MiB."""
    return peak_rss_growth_bytes(fn, *args) / 2**20


def forward(mixer, x):
    with torch.no_grad():
        mixer(x)


def forward_backward(mixer, x):
    x = x.detach().requires_grad_(True)
    mixer(x).sum().backward()
    mixer.zero_grad(set_to_none=True)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


MODES = {"forward": forward, "forward+backward": forward_backward}


def build(specs: dict[str, dict], d_model: int) -> dict:
    torch.manual_seed(0)
    return {label: build_mixer(spec["name"], d_model=d_model, **spec.get("overrides", {}))
            for label, spec in specs.items()}


def peak_memory_table(specs: dict[str, dict], lengths, d_model: int) -> dict:
    """{(label, mode, L): peak MiB}, measured in this (child) process with forced mmap."""
    force_mmap_for_large_allocations()
    mixers = build(specs, d_model)
    peaks = {}
    for length in lengths:
        x = torch.randn(1, length, d_model)
        for label, mixer in mixers.items():
            for mode, fn in MODES.items():
                peaks[(label, mode, length)] = peak_memory_mib(fn, mixer, x)
    return peaks


def measure(specs: dict[str, dict], lengths, repeats: int, d_model: int) -> list[dict]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peaks_async = pool.apply_async(peak_memory_table, (specs, lengths, d_model))
        peaks = peaks_async.get()
    mixers = build(specs, d_model)
    rows = []
    for length in lengths:
        x = torch.randn(1, length, d_model)
        times = {(label, mode): [] for label in mixers for mode in MODES}
        for mixer in mixers.values():  # warm-up
            for fn in MODES.values():
                fn(mixer, x)
        for _ in range(repeats):
            for label, mixer in mixers.items():
                for mode, fn in MODES.items():
                    times[(label, mode)].append(timed(fn, mixer, x))
        for (label, mode), samples in times.items():
            rows.append({"mode": mode, "L": length, "mixer": label, "seconds": statistics.median(samples),
                         "peak_mib": peaks[(label, mode, length)]})
    return rows


def print_table(rows: list[dict], reference: str) -> None:
    baseline = {(r["mode"], r["L"]): r["seconds"] for r in rows if r["mixer"] == reference}
    print(f"| mode | L | mixer | ms (median) | tokens/s | peak MiB | speed vs {reference} |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["mode"], r["L"], r["mixer"])):
        ratio = baseline.get((r["mode"], r["L"]))
        ratio_text = f"{ratio / r['seconds']:.2f}x" if ratio else "-"
        print(f"| {r['mode']} | {r['L']} | {r['mixer']} | {1e3 * r['seconds']:.0f} | "
              f"{r['L'] / r['seconds']:,.0f} | {r['peak_mib']:.0f} | {ratio_text} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="L = 512, 2048 and 3 rounds (under a minute)")
    parser.add_argument("--chunks", action="store_true", help="compare mamba2 chunk sizes 32 ... 256")
    parser.add_argument("--lengths", type=int, nargs="*", help="sequence lengths (default 256 ... 8192)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per length")
    parser.add_argument("--d-model", type=int, default=768)
    args = parser.parse_args()
    lengths = args.lengths or ([512, 2048] if args.quick else [256, 512, 1024, 2048, 4096, 8192])
    repeats = args.repeats or (3 if args.quick else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, d_model {args.d_model}, "
          f"float32, median of {repeats} interleaved rounds")
    if args.chunks:
        specs = {f"mamba2 Q={q}": {"name": "mamba2", "overrides": {"chunk_size": q}} for q in (32, 64, 128, 256)}
        print_table(measure(specs, lengths, repeats, args.d_model), "mamba2 Q=64")
        return
    specs = {name: {"name": name} for name in ("attention", "mamba", "mamba2") if name in list_mixers()}
    print_table(measure(specs, lengths, repeats, args.d_model), "attention")


if __name__ == "__main__":
    main()
