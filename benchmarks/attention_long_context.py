"""Long-context attention variants against full causal attention, on this machine.

Prints, per sequence length L: prefill (no-grad forward) and training (forward + backward) tokens/s
of each variant and its ratio to full attention measured in the same process (runs interleaved
A B A B ..., medians), the peak resident memory of one training step (each case in a fresh
subprocess), and per-token decode time with a cache of L tokens plus the state bytes each policy
keeps. Dynamic NTK is an inference-time method and its parallel path beyond the trained length is
O(L T E) elementwise work (docs/long-context.md), so it is timed for prefill and decode only.

    PYTHONPATH=$PWD python benchmarks/attention_long_context.py --quick     # < 1 min
    PYTHONPATH=$PWD python benchmarks/attention_long_context.py             # full sweep

Variants (d_model 256, 4 heads of 64 unless --d-model / --heads): window 256, window 256 + 4 sinks,
ALiBi (full), ReRoPE (w = L/4), dynamic NTK (trained length L/4, so 3/4 of the queries are beyond it),
YaRN (trained length L/4), kNN memory (chunk 512, memory 2048, top 32), S2-Attn (G = L/4, training).
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


def variants(length: int) -> dict[str, dict]:
    quarter = max(16, length // 4)
    return {
        "full": {},
        "window256": {"window": 256},
        "sinks4+window256": {"window": 256, "sinks": 4},
        "alibi": {"positional": "alibi"},
        "rerope": {"positional": "rerope", "rerope_window": quarter},
        "dynamic-ntk": {"rope_scaling": "dynamic", "rope_factor": 4.0, "max_position": quarter},
        "yarn": {"rope_scaling": "yarn", "rope_factor": 4.0, "max_position": quarter},
        "knn": {"knn_top_k": 32, "knn_chunk": 512, "knn_memory_size": 2048},
        "s2-train": {"s2_group": quarter},
    }


def build(name: str, length: int, d_model: int, heads: int):
    mixer = build_mixer("attention", d_model=d_model, n_heads=heads, **variants(length)[name])
    return mixer.train(name == "s2-train")


def prefill(mixer, x):
    with torch.no_grad():
        mixer(x)


def train_step(mixer, x):
    mixer.zero_grad(set_to_none=True)
    mixer(x).sum().backward()


def decode_setup(mixer, length: int, d_model: int):
    with torch.no_grad():
        _, state = mixer.prefill(torch.randn(1, length, d_model), mixer.init_state(1))
    return state


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(cases: dict, repeats: int) -> dict[str, float]:
    """Median seconds per case, running the cases in turn (A B C A B C ...) after one warm-up each."""
    for fn in cases.values():
        fn()
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory_child(name: str, length: int, d_model: int, heads: int) -> None:
    """Run in a subprocess: print the peak RSS growth (MiB) of one training step (Linux: the high-water
    mark is reset through /proc/self/clear_refs, so the import's own peak does not hide the step's)."""
    mixer = build(name, length, d_model, heads)
    x = torch.randn(1, length, d_model)
    print(json.dumps({"peak_mib": peak_rss_growth_bytes(train_step, mixer, x) / 2**20}))


def peak_memory(name: str, length: int, d_model: int, heads: int) -> float:
    command = [sys.executable, __file__, "--child", name, str(length), "--d-model", str(d_model),
               "--heads", str(heads)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="L=512, 2 repeats, no memory subprocesses")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", help="a subset of the variants (full is always included)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child[0], int(args.child[1]), args.d_model, args.heads)
        return
    lengths, repeats = ([512], 2) if args.quick else (args.lengths, args.repeats)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_model {args.d_model}, "
          f"{args.heads} heads, batch 1, float32; machine shared with other jobs: read the ratios")
    for length in lengths:
        report_length(length, args, repeats)


def chosen(length: int, args) -> list[str]:
    names = list(variants(length))
    if not args.variants:
        return names
    unknown = sorted(set(args.variants) - set(names))
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; valid: {', '.join(names)}")
    return ["full"] + [name for name in names if name in args.variants and name != "full"]


def decode(mixer, state, x_t: torch.Tensor, steps: int) -> None:
    with torch.no_grad():
        for _ in range(steps):
            _, state = mixer.step(x_t, state)


def report_length(length: int, args, repeats: int) -> None:
    names = chosen(length, args)
    mixers = {name: build(name, length, args.d_model, args.heads) for name in names}
    x = torch.randn(1, length, args.d_model)
    trainable = [name for name in names if name != "dynamic-ntk"]
    train = interleaved({name: (lambda m=mixers[name]: train_step(m, x)) for name in trainable}, repeats)
    decoders = {name: mixer.eval() for name, mixer in mixers.items() if name != "s2-train"}
    forward = interleaved({name: (lambda m=decoders[name]: prefill(m, x)) for name in decoders}, repeats)
    states = {name: decode_setup(mixer, length, args.d_model) for name, mixer in decoders.items()}
    x_t = torch.randn(1, args.d_model)
    steps = args.decode_steps
    decode_time = interleaved({name: (lambda n=name: decode(decoders[n], states[n], x_t, steps))
                               for name in decoders}, repeats)
    print(f"\nL = {length}")
    header = ("| variant | prefill tok/s | vs full | train tok/s | vs full | peak MiB (train step) | decode ms/token "
              "| vs full | state KiB |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in names:
        row = [name]
        if name in forward:
            row += [f"{length / forward[name]:.0f}", f"{forward['full'] / forward[name]:.2f}x"]
        else:
            row += ["(eval = full)", "-"]
        if name in train:
            memory = "-" if args.quick else f"{peak_memory(name, length, args.d_model, args.heads):.0f}"
            row += [f"{length / train[name]:.0f}", f"{train['full'] / train[name]:.2f}x", memory]
        else:
            row += ["(inference only)", "-", "-"]
        if name in decode_time:
            per_token, full_token = decode_time[name] / steps, decode_time["full"] / steps
            state_kib = mixers[name].state_nbytes(1, length) / 1024
            row += [f"{per_token * 1e3:.2f}", f"{full_token / per_token:.2f}x", f"{state_kib:.0f}"]
        else:
            row += ["(training only)", "-", "-"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
