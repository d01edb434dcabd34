"""The per-op benchmark scripts' registrations on seqarch.bench.timing: each one's target names itself
(the memory child imports it from there), and every implementation it can run here builds and runs one
tiny case in every mode. No timing is asserted."""

from __future__ import annotations

import importlib

import pytest

from benchmarks import (
    bench_delta_rule,
    bench_generalized_delta_rule,
    bench_hyena,
    bench_mamba,
    bench_retention,
    bench_wkv,
)
from seqarch.bench.timing import Benchmark, run_benchmark

# (registration, options of its setup that shrink the case)
REGISTRATIONS = {
    "mamba scans": (bench_mamba.SCAN, {}),
    "mamba mixers": (bench_mamba.MIXER, {}),
    "wkv": (bench_wkv.BENCHMARK, {}),
    "retention": (bench_retention.BENCHMARK, {}),
    "retention chunks": (bench_retention.CHUNKS, {}),
    "hyena fftconv": (bench_hyena.FFTCONV, {"d_model": 16}),
    "hyena forward": (bench_hyena.FORWARD, {"d_model": 32, "max_len": 64}),
    "delta rule": (bench_delta_rule.BENCHMARK, {}),
    "generalized delta rule": (bench_generalized_delta_rule.BENCHMARK, {}),
}
LENGTH = 33  # odd, shorter than one chunk of every chunked form


def resolve(target: str) -> Benchmark:
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


@pytest.mark.parametrize("name", list(REGISTRATIONS))
def test_registration_builds_and_runs_one_tiny_case_of_every_runnable_implementation(name):
    benchmark, options = REGISTRATIONS[name]
    assert resolve(benchmark.target) is benchmark
    assert set(benchmark.timing_only) <= set(benchmark.impls)
    benchmark.prepare()
    ran = []
    for mode in benchmark.modes:
        for impl in benchmark.impls:
            if benchmark.runnable(impl, LENGTH, mode):
                benchmark.setup(impl, LENGTH, mode, **options)()
                ran.append(impl)
    # the plain references never depend on an optional package or a compiler
    always = {"sequential", "reference", "chunkwise", "chunked", "mamba", "attention", "hyena", "fftconv", "C=64"}
    assert always & set(benchmark.impls) <= set(ran)


def test_a_script_case_is_rebuilt_in_the_memory_child():
    rows = run_benchmark(bench_hyena.FORWARD, [LENGTH], repeats=1, options={"d_model": 32, "max_len": 64})
    assert [(r["impl"], r["mode"]) for r in rows] == [("hyena", "forward"), ("attention", "forward")]
    assert all(r["peak_bytes"] is not None for r in rows)
