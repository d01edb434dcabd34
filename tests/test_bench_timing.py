"""The one benchmark harness (seqarch.bench.timing): interleaving, medians, modes, and the peak-memory
child rebuilding a registered case from its target and options."""

from __future__ import annotations

import dataclasses

import torch

from seqarch.bench.timing import Benchmark, interleaved_samples, run_benchmark, with_mode


def test_calls_are_interleaved_after_the_warm_up():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    samples = interleaved_samples(calls, repeats=3, warmup=1)
    assert order == ["a", "b", "c"] * 4
    assert {name: len(times) for name, times in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_alternate_rounds_run_backwards_every_second_time():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    interleaved_samples(calls, repeats=3, warmup=1, alternate=True)
    assert order == ["a", "b", "c"] + ["a", "b", "c"] + ["c", "b", "a"] + ["a", "b", "c"]


def test_each_mode_and_length_hands_over_its_rows_as_soon_as_measured():
    groups = []
    rows = run_benchmark(TOY, [4, 16], repeats=1, modes=["fwd", "fwd+bwd"], memory=False, on_rows=groups.append)
    assert [[(r["mode"], r["L"], r["impl"]) for r in group] for group in groups] == [
        [("fwd", 4, "small"), ("fwd", 4, "big")], [("fwd", 16, "small")],
        [("fwd+bwd", 4, "small"), ("fwd+bwd", 4, "big")], [("fwd+bwd", 16, "small")]]
    assert [r for group in groups for r in group] == rows


def test_with_mode_runs_the_backward_only_outside_forward():
    weight = torch.randn(3, requires_grad=True)
    with_mode(lambda: weight * 2, [weight], "fwd")()
    assert weight.grad is None
    with_mode(lambda: weight * 2, [weight], "fwd+bwd")()
    torch.testing.assert_close(weight.grad, torch.full((3,), 2.0))


def _setup(impl: str, length: int, mode: str, width: int = 1):
    def call():
        # length x width MiB held at once, so the child's peak must grow with both.
        held = torch.ones(length * width, 1 << 20, dtype=torch.uint8).add_(1 if impl == "big" else 0)
        return held.max()

    return call


TOY = Benchmark(target="tests.test_bench_timing:TOY", impls=("small", "big"), setup=_setup,
                runnable=lambda impl, length, mode: not (impl == "big" and length > 8), force_mmap=True)


def test_run_benchmark_measures_every_runnable_case_and_its_memory_in_a_child():
    rows = run_benchmark(TOY, [4, 16], repeats=2, modes=["fwd"], options={"width": 2})
    cases = [(r["impl"], r["L"]) for r in rows]
    assert cases == [("small", 4), ("big", 4), ("small", 16)]
    peaks = {(r["impl"], r["L"]): r["peak_bytes"] for r in rows}
    assert all(len(r["samples"]) == 2 and r["seconds"] > 0 for r in rows)
    # 8 MiB held at L = 4, 32 MiB at L = 16 (options reached the child): peaks near those sizes
    assert 6 * 2**20 < peaks[("small", 4)] < 40 * 2**20
    assert peaks[("small", 16)] > 3 * peaks[("small", 4)]


def test_timing_only_implementations_are_timed_in_the_rounds_without_a_memory_child():
    rows = run_benchmark(dataclasses.replace(TOY, timing_only=("big",)), [4], repeats=2, modes=["fwd"])
    peaks = {r["impl"]: r["peak_bytes"] for r in rows}
    assert set(peaks) == {"small", "big"} and all(len(r["samples"]) == 2 for r in rows)
    assert peaks["big"] is None and peaks["small"] > 2 * 2**20
