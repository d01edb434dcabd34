"""One benchmark case, run in a fresh process so that its peak memory is its own.

    python -m seqarch.bench.case '{"mode": "train", "mixer": "s4d", "seq_len": 1024, ...}'

Legend: B batch, L sequence length (decode: prefix length), V vocabulary.

Modes (all on the `SeqLM` built by `accounting.build_model`, random tokens):
  train    forward + cross-entropy + backward over (B, L) tokens; tokens/s = B L / run time
  prefill  `prefill(tokens, init_state)` without autograd; tokens/s = B L / run time
  decode   prefill L tokens (untimed), then `decode_tokens` chained `step` calls per timed run;
           latency = run time / decode_tokens, tokens/s = B / latency
  probe    allocate and touch `alloc_bytes` bytes: checks that the memory probe sees a known size

Each case times `warmup` untimed runs, then `repeats` timed runs, and reports every sample.
Memory: on CPU the process's peak resident set (VmHWM) after the case, and the
resident set after imports, model build and inputs (the baseline), so that peak - baseline is the
case's own increment. On CUDA, `torch.cuda.max_memory_allocated` after a reset at the baseline.
The result is one line on stdout starting with RESULT_PREFIX, followed by JSON.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from seqarch.bench.accounting import build_model, parameter_counts, torch_dtype
from seqarch.bench.memory import current_rss_bytes, peak_rss_bytes

RESULT_PREFIX = "SEQARCH_BENCH_RESULT "


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(run: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` timed calls of `run`, after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    _synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def _train(model, tokens, spec, device) -> dict[str, Any]:
    targets = torch.roll(tokens, -1, dims=1)

    def run():
        logits = model(tokens)  # (B, L, V)
        F.cross_entropy(rearrange(logits, "b l v -> (b l) v").float(), rearrange(targets, "b l -> (b l)")).backward()
        model.zero_grad(set_to_none=True)

    model.train()
    return {"samples_s": time_runs(run, spec["warmup"], spec["repeats"], device), "tokens_per_run": tokens.numel()}


def _prefill(model, tokens, spec, device) -> dict[str, Any]:
    model.eval()
    batch = tokens.shape[0]

    def run():
        with torch.inference_mode():
            model.prefill(tokens, model.init_state(batch))

    return {"samples_s": time_runs(run, spec["warmup"], spec["repeats"], device), "tokens_per_run": tokens.numel()}


def _decode(model, tokens, spec, device) -> dict[str, Any]:
    model.eval()
    batch, steps = tokens.shape[0], spec["decode_tokens"]
    next_tokens = torch.randint(0, model.vocab_size, (steps, batch), device=device)
    with torch.inference_mode():
        _, prefix_state = model.prefill(tokens, model.init_state(batch))

    def run():
        with torch.inference_mode():
            state = prefix_state
            for token in next_tokens:
                _, state = model.step(token, state)

    samples = time_runs(run, spec["warmup"], spec["repeats"], device)
    return {"samples_s": samples, "tokens_per_run": batch * steps, "state_bytes_measured": prefix_state.nbytes}


MODE_RUNNERS = {"train": _train, "prefill": _prefill, "decode": _decode}


def _probe(spec) -> dict[str, Any]:
    # Run the same allocation path once at a small size first, so that the code pages it loads
    # (file-backed, counted in RSS) are in the baseline and not in the measured increment.
    torch.ones(1 << 20, dtype=torch.uint8)
    baseline = current_rss_bytes()
    block = torch.ones(spec["alloc_bytes"], dtype=torch.uint8)  # ones, so every page is touched
    return {"allocated_bytes": block.numel(), "baseline_bytes": baseline, "peak_bytes": peak_rss_bytes(),
            "memory_kind": "peak_rss"}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the case described by `spec` in this process and return its measurements."""
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    if spec["mode"] == "probe":
        return _probe(spec)
    torch.manual_seed(spec.get("seed", 0))
    device = torch.device(spec.get("device", "cpu"))
    dtype = torch_dtype(spec.get("dtype", "float32"))
    model = build_model(spec["mixer"], spec["d_model"], spec["n_layers"], spec["vocab_size"], spec.get("mlp", True),
                        mixer_kwargs=spec.get("mixer_kwargs"), device=device, dtype=dtype)
    tokens = torch.randint(0, spec["vocab_size"], (spec["batch_size"], spec["seq_len"]), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = current_rss_bytes()
    result = MODE_RUNNERS[spec["mode"]](model, tokens, spec, device)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = peak_rss_bytes(), "peak_rss"
    return {**result, **parameter_counts(model), "baseline_bytes": baseline, "peak_bytes": peak, "memory_kind": kind,
            "state_bytes": model.state_nbytes(spec["batch_size"], spec["seq_len"], dtype)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m seqarch.bench.case '<json case spec>'", file=sys.stderr)
        return 2
    result = run_case(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
