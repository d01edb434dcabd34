"""Throughput, memory and state size vs sequence length for every registered mixer, and reports.

    from seqarch.bench import bench_command, memory_command
    bench_command(["mixers=all", "seq_lens=256..4096", "out=bench_results"])   # measured, one process per case
    memory_command(["model=llama-2-13b", "seq_lens=[4096,131072]"])            # analytic, nothing allocated

Modules: settings (what a sweep measures), case (one case in a fresh process), runner (subprocess
per case under a time budget, the sweep), analysis (fitted exponents, crossovers), accounting
(parameters, state bytes, FLOPs per token on the meta device), report (JSON, CSV, Markdown, PNG),
machine (where it ran), commands (the two entry points).
"""

from seqarch.bench.commands import bench_command, memory_command, run_bench
from seqarch.bench.settings import BenchSettings, parse_bench_settings

__all__ = ["BenchSettings", "bench_command", "memory_command", "parse_bench_settings", "run_bench"]
