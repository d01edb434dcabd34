"""One harness for the per-op benchmark scripts (benchmarks/bench_*.py): interleaved timing and a
peak-memory probe in a fresh process.

A script registers what it compares as a `Benchmark`: its implementations and a
`setup(impl, L, mode, **options)` returning a zero-argument call that runs one forward (or forward +
backward). `run_benchmark` times every implementation at one (mode, L) interleaved (A B C A B C ...,
after one warm-up each), keeps the median, and measures each case's peak memory in its own child
process (`python -m seqarch.bench.timing --child module:attribute ...`, which rebuilds the call from
the registration and the same JSON options), so a case's peak is its own and the timing process
never carries another case's heap.

Peak memory is the growth of the child's peak resident set over the call (`seqarch.bench.memory`);
with `force_mmap` the child first makes glibc serve large allocations by mmap, so that freed tensors
leave the resident set at once and later peaks are not hidden by a heap that never shrinks (that
setting slows allocation, so it never applies to timings).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from seqarch.bench.memory import peak_rss_growth_bytes
from seqarch.bench.runner import _child_environment

Call = Callable[[], Any]
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def interleaved_samples(calls: Mapping[str, Call], repeats: int, warmup: int = 1,
                        alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of each call, run in turn A B C A B C ... `repeats` times after `warmup` runs of each,
    so a slow spell of a shared machine hits every call alike. With `alternate`, every second round
    runs backwards (A B C C B A ...), so no call always runs right after the same other one."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    for repeat in range(repeats):
        for name, call in order[::-1] if alternate and repeat % 2 else order:
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return samples


def interleaved_medians(calls: Mapping[str, Call], repeats: int, warmup: int = 1,
                        alternate: bool = False) -> dict[str, float]:
    """Median seconds per call of `interleaved_samples`."""
    samples = interleaved_samples(calls, repeats, warmup, alternate)
    return {name: statistics.median(times) for name, times in samples.items()}


def force_mmap_for_large_allocations() -> None:
    """Without this, glibc keeps freed large blocks in its heap and peak RSS misses later peaks."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 16)


def with_mode(forward: Callable[[], torch.Tensor], leaves, mode: str) -> Call:
    """A call running `forward` under no_grad (mode "fwd" / "forward"), or forward then the backward
    of the output's sum with the leaves' gradients cleared first (any other mode)."""
    leaves = list(leaves)

    def run():
        if mode in ("fwd", "forward"):
            with torch.no_grad():
                forward()
            return
        for leaf in leaves:
            leaf.grad = None
        forward().sum().backward()

    return run


@dataclass(frozen=True)
class Benchmark:
    """What one script compares: `setup(impl, L, mode, **options)` -> a zero-argument call (made before timing, so
    inputs and modules are built outside it); `runnable(impl, L, mode)` leaves out cases too slow or too
    large (limits set on a script's command line: time `dataclasses.replace(benchmark, runnable=...)`; the
    memory child never asks). `target` is "module:attribute" of this registration, for the memory child
    to import. `timing_only` implementations are timed in the same rounds but get no memory child (e.g. a
    torch.mm whose rate is the machine's yardstick); `alternate` reverses every second round."""

    target: str
    impls: Sequence[str]
    setup: Callable[..., Call]
    modes: Sequence[str] = ("fwd", "fwd+bwd")
    runnable: Callable[[str, int, str], bool] = field(default=lambda impl, length, mode: True)
    force_mmap: bool = False  # in the memory child; see the module docstring
    prepare: Callable[[], None] = field(default=lambda: None)  # e.g. build a compiled kernel before measuring
    timing_only: Sequence[str] = ()
    alternate: bool = False


def peak_memory_bytes(benchmark: Benchmark, impl: str, length: int, mode: str, threads: int | None = None,
                      options: Mapping[str, Any] | None = None) -> int | None:
    """Peak resident growth of one call of `impl` at (L, mode), measured in a fresh process; None if the
    child fails (its last stderr line is printed)."""
    command = [sys.executable, "-m", "seqarch.bench.timing", "--child", benchmark.target, impl, str(length), mode,
               "--options", json.dumps(dict(options or {}))]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=_child_environment())
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        print(f"peak memory of {impl} L={length} {mode} failed: {lines[-1] if lines else done.returncode}",
              file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_benchmark(benchmark: Benchmark, lengths: Sequence[int], repeats: int, *, modes: Sequence[str] | None = None,
                  impls: Sequence[str] | None = None, memory: bool = True, threads: int | None = None,
                  options: Mapping[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None,
                  on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Rows {mode, L, impl, seconds (median), samples, peak_bytes (None without memory or for `timing_only`)}:
    for each mode and length, the runnable implementations timed interleaved, then each one's peak memory. `options`
    (JSON-serialisable) go to every `setup` call, here and in the memory child. `on_rows` gets each (mode, L)'s
    rows as soon as they are measured (a script prints its table as it goes)."""
    options = dict(options or {})
    benchmark.prepare()
    rows = []
    for mode in modes or benchmark.modes:
        for length in lengths:
            present = [impl for impl in impls or benchmark.impls if benchmark.runnable(impl, length, mode)]
            calls = {impl: benchmark.setup(impl, length, mode, **options) for impl in present}
            samples = interleaved_samples(calls, repeats, alternate=benchmark.alternate)
            del calls
            for impl in present:
                measured = memory and impl not in benchmark.timing_only
                peak = peak_memory_bytes(benchmark, impl, length, mode, threads, options) if measured else None
                rows.append({"mode": mode, "L": length, "impl": impl, "seconds": statistics.median(samples[impl]),
                             "samples": samples[impl], "peak_bytes": peak})
            if on_rows is not None:
                on_rows(rows[len(rows) - len(present):])
            if progress is not None:
                progress(f"done {mode} L={length}")
    return rows


def _child(target: str, impl: str, length: int, mode: str, options: dict[str, Any]) -> None:
    module_name, attribute = target.split(":")
    benchmark: Benchmark = getattr(importlib.import_module(module_name), attribute)
    if benchmark.force_mmap:
        force_mmap_for_large_allocations()
    benchmark.prepare()  # a kernel's own pages are not the call's memory
    call = benchmark.setup(impl, length, mode, **options)
    print(json.dumps({"peak_bytes": peak_rss_growth_bytes(call)}))


def main() -> None:
    parser = argparse.ArgumentParser(description="peak-memory child of seqarch.bench.timing (internal)")
    parser.add_argument("--child", nargs=4, metavar=("TARGET", "IMPL", "L", "MODE"), required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--options", default="{}", help="JSON keyword arguments of setup")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target, impl, length, mode = args.child
    _child(target, impl, int(length), mode, json.loads(args.options))


if __name__ == "__main__":
    main()
