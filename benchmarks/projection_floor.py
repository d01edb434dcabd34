"""Distance to the matmul floor (issue #19): each mixer's time against its own nn.Linear calls alone.

For every registered mixer (default config, d_model 768, batch 1, float32, 2 threads) this measures
the mixer's forward time (under no_grad) and forward+backward time (input requires grad, backward of a
random output gradient), then the time of just the mixer's own linear projections on random inputs of the
shapes they see in one mixer forward: every F.linear call of one mixer forward, recorded with a
TorchFunctionMode, which catches each nn.Linear module (named by module) and the fused calls some mixers
make on their nn.Linear weights concatenated (deltanet's q/k/v/beta, named "fused"), each call counted as
often as it happens, forward and forward+backward the same way. Runs interleave
mixer, projections, mixer, projections after one warm-up of each; the table reports medians and the
ratio mixer / own projections. A torch.profiler run (CPU, record_shapes off) of one forward at
L = 4096 gives the top ops by self CPU time and their share of the forward, another of one
forward+backward the same for the training step.

    python -m benchmarks.projection_floor                  # L = 4096, all mixers (a few minutes)
    python -m benchmarks.projection_floor --long           # also L = 16384
    python -m benchmarks.projection_floor --mixers mamba s4d --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import seqarch
from seqarch.bench.timing import interleaved_samples
from seqarch.registry import build_config

D_MODEL = 768
OUT_DIR = Path(__file__).resolve().parent / "results" / "projection-floor"


class _LinearRecorder(TorchFunctionMode):
    """Records every F.linear call (what nn.Linear.forward runs, and the fused calls some mixers make
    with their nn.Linear weights concatenated)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            inp, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.calls.append((weight, bias, tuple(inp.shape)))
        return func(*args, **kwargs)


def linear_calls(mixer: nn.Module, x: torch.Tensor) -> list[dict]:
    """Every F.linear call of one mixer forward, in call order: its name (the nn.Linear whose weight it
    uses, or "fused" for a weight built from several), weight, bias and input shape."""
    owner = {m.weight.data_ptr(): n for n, m in mixer.named_modules() if isinstance(m, nn.Linear)}
    recorder = _LinearRecorder()
    with torch.no_grad(), recorder:
        mixer(x)
    calls = []
    for weight, bias, shape in recorder.calls:
        name = owner.get(weight.data_ptr(), "fused")
        calls.append({"name": name, "weight": weight.detach().clone(),
                      "bias": None if bias is None else bias.detach().clone(), "input_shape": shape})
    return calls


def build(name: str, seq_len: int) -> tuple[nn.Module, dict]:
    """The mixer with its default config; only a max_len shorter than seq_len (hyena: 2048) is raised to it."""
    overrides: dict = {}
    max_len = getattr(build_config(name, d_model=D_MODEL), "max_len", None)
    if max_len is not None and max_len < seq_len:
        overrides["max_len"] = seq_len
    return seqarch.build_mixer(name, d_model=D_MODEL, **overrides), overrides


def clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, seq_len: int, repeats: int, bwd_budget_s: float) -> dict:
    torch.manual_seed(0)
    mixer, overrides = build(name, seq_len)
    x = torch.randn(1, seq_len, D_MODEL)
    calls = linear_calls(mixer, x)
    proj_inputs = [torch.randn(c["input_shape"]) for c in calls]
    weights = [c["weight"].clone().requires_grad_(True) for c in calls]
    biases = [None if c["bias"] is None else c["bias"].clone().requires_grad_(True) for c in calls]

    def mixer_fwd():
        with torch.no_grad():
            mixer(x)

    def proj_fwd():
        with torch.no_grad():
            for inp, w, b in zip(proj_inputs, weights, biases, strict=True):
                F.linear(inp, w, b)

    x_grad = x.clone().requires_grad_(True)
    grad_out = torch.randn(1, seq_len, D_MODEL)
    proj_inputs_g = [t.clone().requires_grad_(True) for t in proj_inputs]
    proj_grads = [torch.randn(*c["input_shape"][:-1], c["weight"].shape[0]) for c in calls]

    def mixer_fwdbwd():
        clear_grads(mixer)
        x_grad.grad = None
        mixer(x_grad).backward(grad_out)

    def proj_fwdbwd():
        for inp, w, b, g in zip(proj_inputs_g, weights, biases, proj_grads, strict=True):
            inp.grad = w.grad = None
            if b is not None:
                b.grad = None
            F.linear(inp, w, b).backward(g)

    result = {"mixer": name, "seq_len": seq_len, "config_overrides": overrides,
              "linears": [{"name": c["name"], "input_shape": list(c["input_shape"]),
                           "out_features": c["weight"].shape[0]} for c in calls]}
    for mode, mix_fn, proj_fn in (("fwd", mixer_fwd, proj_fwd), ("fwdbwd", mixer_fwdbwd, proj_fwdbwd)):
        warm = timed(mix_fn)
        timed(proj_fn)
        n = repeats
        if mode == "fwdbwd" and warm * repeats > bwd_budget_s:
            n = 3  # capped: slow mixer, the minimum the median needs
        # the one harness's interleaving (mixer, projections, mixer, ...), the warm-up already done above
        samples = interleaved_samples({"mixer": mix_fn, "projections": proj_fn}, repeats=n, warmup=0)
        mix_t, proj_t = samples["mixer"], samples["projections"]
        mix_ms, proj_ms = 1e3 * statistics.median(mix_t), 1e3 * statistics.median(proj_t)
        result[mode] = {"mixer_ms": mix_ms, "projections_ms": proj_ms, "ratio": mix_ms / proj_ms, "repeats": n,
                        "mixer_runs_ms": [1e3 * t for t in mix_t], "projection_runs_ms": [1e3 * t for t in proj_t]}
    clear_grads(mixer)
    return result


def breakdown(name: str, seq_len: int, top: int = 5, backward: bool = False) -> list[dict]:
    """The top ops by self CPU time of one forward (under no_grad), or of one forward+backward."""
    torch.manual_seed(0)
    mixer, _ = build(name, seq_len)
    x = torch.randn(1, seq_len, D_MODEL, requires_grad=backward)
    grad_out = torch.randn(1, seq_len, D_MODEL)

    def run():
        if backward:
            clear_grads(mixer)
            mixer(x).backward(grad_out)
        else:
            with torch.no_grad():
                mixer(x)

    run()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        run()
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def report(results: dict) -> str:
    lines = ["# Distance to the matmul floor (issue #19)", "",
             f"d_model {D_MODEL}, batch 1, float32, {results['threads']} threads, default config per mixer; "
             "medians of interleaved runs (mixer, projections, ...); forward under no_grad, forward+backward "
             "with a random output gradient. \"Projections\" = the mixer's own F.linear calls (its nn.Linear "
             "modules, and fused calls on their concatenated weights) alone, on random inputs of the shapes they "
             "see in one mixer forward; other matrix products (attention scores, chunked-scan bmm, RWKV-7's "
             "low-rank `@` parameters) count as the mixer's overhead. Config overrides: "
             + (", ".join(sorted({f"{r['mixer']} {k}={v}" for r in results["runs"]
                                  for k, v in r["config_overrides"].items()})) or "none") + ".", "",
             f"Command: `{results['command']}`; load average (1, 5, 15 min) at the start: "
             + ", ".join(f"{v:.1f}" for v in results.get("load_average", ())), ""]
    for seq_len in results["seq_lens"]:
        rows = [r for r in results["runs"] if r["seq_len"] == seq_len]
        lines += [f"## L = {seq_len}", "",
                  "| mixer | fwd ms | own projections fwd ms | ratio | fwd+bwd ms | projections fwd+bwd ms | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            f, b = r["fwd"], r["fwdbwd"]
            lines.append(f"| {r['mixer']} | {f['mixer_ms']:.1f} | {f['projections_ms']:.1f} | {f['ratio']:.2f}x "
                         f"| {b['mixer_ms']:.1f} | {b['projections_ms']:.1f} | {b['ratio']:.2f}x |")
        lines.append("")
    for key, what in (("breakdown", "forward"), ("breakdown_fwdbwd", "forward+backward")):
        lines += [f"## Where the {what} goes (torch.profiler, L = {results['profile_seq_len']}, "
                  "top 5 by self CPU time)", ""]
        for name, ops in results.get(key, {}).items():
            top = "; ".join(f"`{o['op']}` {100 * o['share']:.0f}% ({o['self_ms']:.1f} ms, {o['calls']}x)"
                            for o in ops)
            lines.append(f"- **{name}**: {top}")
        lines.append("")
    lines += ["## Linear calls counted per mixer", ""]
    for r in results["runs"]:
        if r["seq_len"] == results["seq_lens"][0]:
            names = ", ".join(f"{c['name']} {c['input_shape'][-1]}->{c['out_features']}" for c in r["linears"])
            lines.append(f"- **{r['mixer']}**: {names}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="*", default=None, help="default: seqarch.list_mixers()")
    parser.add_argument("--long", action="store_true", help="also L = 16384 (slow)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median), >= 3")
    parser.add_argument("--bwd-budget", type=float, default=20.0,
                        help="seconds; a mixer whose fwd+bwd repeats would exceed this gets 3 repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mixers = args.mixers or seqarch.list_mixers()
    seq_lens = [args.seq_len] + ([16384] if args.long else [])
    results = {"command": "python -m benchmarks.projection_floor" + (" --long" if args.long else ""),
               "threads": args.threads, "d_model": D_MODEL, "seq_lens": seq_lens, "profile_seq_len": args.seq_len,
               "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
               "load_average": os.getloadavg(), "runs": [], "breakdown": {}, "breakdown_fwdbwd": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for seq_len in seq_lens:
        for name in mixers:
            start = time.perf_counter()
            r = measure(name, seq_len, max(3, args.repeats), args.bwd_budget)
            results["runs"].append(r)
            print(f"L={seq_len} {name}: fwd {r['fwd']['mixer_ms']:.1f} / {r['fwd']['projections_ms']:.1f} ms "
                  f"= {r['fwd']['ratio']:.2f}x, fwd+bwd {r['fwdbwd']['mixer_ms']:.1f} / "
                  f"{r['fwdbwd']['projections_ms']:.1f} ms = {r['fwdbwd']['ratio']:.2f}x "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    for name in mixers:
        results["breakdown"][name] = breakdown(name, args.seq_len)
        results["breakdown_fwdbwd"][name] = breakdown(name, args.seq_len, backward=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "report.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
