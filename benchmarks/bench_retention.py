"""Retention forms vs sequence length: tokens/s, peak memory, and speed ratios to the loop reference.

Legend: B batch (1), H heads (12), T length, K = V head dim (64), C chunk length.

    PYTHONPATH=$PWD python benchmarks/bench_retention.py            # full sweep, T = 256 .. 8192
    PYTHONPATH=$PWD python benchmarks/bench_retention.py --quick    # T = 256, 1024, 4096; about 1 min quiet

Forms: `chunkwise` (default path), `parallel` (O(T^2) memory; skipped above --parallel-max),
`recurrent` (the op's loop of `retention_step`) and `reference` (`retention_ref`, the sequential
loop). Timings are interleaved (every form once per round, rounds repeated) and reported as
medians, so a slow stretch of a shared machine hits all forms alike; the ratio column is
reference time / form time from the same run. Peak memory is the growth of the process's peak RSS (Linux VmHWM)
over one run (inputs made before the baseline), each (form, T) in a fresh subprocess so that every peak is its own.
A second table times the chunkwise form for several chunk lengths (how the default C was chosen).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from seqarch.bench.memory import peak_rss_growth_bytes
from seqarch.ops.retention import retention, retention_ref

HEADS, HEAD_DIM = 12, 64
FORMS = ("chunkwise", "parallel", "recurrent", "reference")
BACKEND = {"chunkwise": "chunked", "parallel": "parallel", "recurrent": "sequential"}  # label -> backend


def make_inputs(length: int, requires_grad: bool):
    torch.manual_seed(0)
    return [torch.randn(1, HEADS, length, HEAD_DIM, requires_grad=requires_grad) for _ in range(3)]


def run(form: str, inputs: list[torch.Tensor], train: bool, chunk_size: int = 64) -> None:
    """One call of `form` (and its backward when training) on inputs made beforehand."""
    q, k, v = inputs
    with torch.set_grad_enabled(train):
        if form == "reference":
            out, _ = retention_ref(q, k, v)
        else:
            out, _ = retention(q, k, v, backend=BACKEND[form], chunk_size=chunk_size)
        if train:
            out.sum().backward()


def timed(form: str, inputs: list[torch.Tensor], train: bool, chunk_size: int = 64) -> float:
    """Seconds of one run; making the inputs is not timed, gradients are cleared before."""
    for tensor in inputs:
        tensor.grad = None
    start = time.perf_counter()
    run(form, inputs, train, chunk_size)
    return time.perf_counter() - start


def peak_memory_child(form: str, length: int, train: bool) -> None:
    """Runs in a subprocess: prints the peak RSS growth (bytes) of one run over the resident size
    just before it (the high-water mark of importing torch does not hide a smaller run)."""
    run("chunkwise", make_inputs(64, train), train)  # load lazily initialised kernels before measuring
    inputs = make_inputs(length, train)
    print(json.dumps({"peak_bytes": peak_rss_growth_bytes(run, form, inputs, train)}))


def peak_memory(form: str, length: int, train: bool) -> int:
    command = [sys.executable, __file__, "--threads", str(torch.get_num_threads()),
               "--child", form, str(length), str(int(train))]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def forms_for(length: int, train: bool, args) -> list[str]:
    forms = ["chunkwise", "reference"]
    if length <= args.parallel_max:
        forms.append("parallel")
    if length <= args.recurrent_max:
        forms.append("recurrent")
    if train and length > args.reference_train_max:
        forms.remove("reference")
    return forms


def sweep(args) -> None:
    print(f"retention, B=1, H={HEADS}, K=V={HEAD_DIM}, float32, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} interleaved rounds after one warm-up round")
    header = (f"{'pass':<8}{'T':>6}  {'form':<10}{'time (ms)':>11}{'tokens/s':>12}"
              f"{'peak MB':>10}{'ref / form':>12}")
    print(header)
    print("-" * len(header))
    for train in (False, True):
        for length in args.lengths:
            forms = forms_for(length, train, args)
            inputs = make_inputs(length, train)
            for form in forms:
                timed(form, inputs, train)
            times = {form: [] for form in forms}
            for _ in range(args.repeats):
                for form in forms:
                    times[form].append(timed(form, inputs, train))
            medians = {form: statistics.median(values) for form, values in times.items()}
            for form in FORMS:
                if form not in forms:
                    continue
                memory = peak_memory(form, length, train) / 2**20 if args.memory else float("nan")
                ratio = medians["reference"] / medians[form] if "reference" in medians else float("nan")
                print(f"{'fwd+bwd' if train else 'forward':<8}{length:>6}  {form:<10}{medians[form] * 1e3:>11.1f}"
                      f"{length / medians[form]:>12.0f}{memory:>10.1f}{ratio:>12.1f}", flush=True)


def chunk_sweep(args) -> None:
    length = args.chunk_length
    sizes = (16, 32, 64, 128, 256)
    print(f"\nchunkwise forward+backward at T={length}: time (ms) by chunk length, median of {args.repeats}")
    inputs = make_inputs(length, True)
    for size in sizes:
        timed("chunkwise", inputs, True, size)
    times = {size: [] for size in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            times[size].append(timed("chunkwise", inputs, True, size))
    print("  ".join(f"C={size}: {statistics.median(values) * 1e3:.1f}" for size, values in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="T = 256, 1024, 4096, 3 rounds; parallel form and the reference's backward up to 1024")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--parallel-max", type=int, default=4096, help="longest T for the O(T^2) parallel form")
    parser.add_argument("--recurrent-max", type=int, default=8192, help="longest T for the op's recurrent loop")
    parser.add_argument("--reference-train-max", type=int, default=4096,
                        help="longest T for the reference's backward (autograd keeps every step's state)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        form, length, train = args.child
        peak_memory_child(form, int(length), bool(int(train)))
        return
    if args.quick:
        args.lengths = (256, 1024, 4096)
        args.repeats = args.repeats or 3
        args.recurrent_max = 1024
        args.parallel_max = 1024
        args.reference_train_max = 1024
        args.chunk_length = 1024
    else:
        args.lengths = (256, 512, 1024, 2048, 4096, 8192)
        args.repeats = args.repeats or 5
        args.chunk_length = 4096
    sweep(args)
    chunk_sweep(args)


if __name__ == "__main__":
    main()
