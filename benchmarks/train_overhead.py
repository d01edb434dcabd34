"""Training throughput: seqarch's Lightning path (`LMModule` under `Trainer`) vs a plain PyTorch loop.

Both train the same SeqLM on the same byte windows with AdamW, warmup-cosine and gradient
clipping; the Lightning side is timed by the module's own per-step clock (the number `seqarch fit`
reports as tokens/s), the plain loop by the same clock around its steps. Runs alternate A B A B
and the table reports medians and the ratio, so machine load shifts both sides alike.

    python benchmarks/train_overhead.py --quick        # < 1 min
    python benchmarks/train_overhead.py                # the full sweep
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from seqarch.data.sources import build_data
from seqarch.models.lm import SeqLM
from seqarch.train.datamodule import SeqDataModule
from seqarch.train.module import LMModule, parameter_groups, warmup_cosine


def settings(mixer: str, d_model: int, steps: int, seq_len: int, batch_size: int) -> tuple[dict, dict]:
    config = {"optim": {"lr": 3e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "warmup_steps": 5,
                        "min_lr_ratio": 0.1, "grad_clip": 1.0},
              "trainer": {"max_steps": steps}}
    data = {"source": "stdlib", "seq_len": seq_len, "batch_size": batch_size, "val_percent": 5.0}
    model = {"vocab_size": 256, "d_model": d_model, "n_layers": 4, "mixer": mixer}
    return config, {"data": data, "model": model}


def lightning_tokens_per_s(config: dict, parts: dict, steps: int) -> float:
    module = LMModule(config, parts["model"], "bits_per_byte")
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, gradient_clip_val=1.0, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=SeqDataModule(parts["data"]))
    return module.train_tokens / module.train_seconds


def plain_tokens_per_s(config: dict, parts: dict, steps: int) -> float:
    data = dict(parts["data"])
    bundle = build_data(data.pop("source"), **data)
    loader = iter(torch.utils.data.DataLoader(bundle.train, batch_size=data["batch_size"], shuffle=True))
    model = SeqLM(**parts["model"])
    optim = config["optim"]
    optimizer = torch.optim.AdamW(parameter_groups(model, optim["weight_decay"]), lr=optim["lr"],
                                  betas=(optim["beta1"], optim["beta2"]))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, optim["warmup_steps"], steps, optim["min_lr_ratio"]))
    tokens, seconds = 0, 0.0
    for _ in range(steps):
        inputs, targets = next(loader)
        start = time.perf_counter()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim["grad_clip"])
        optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        tokens += inputs.numel()
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case, 2 repeats (< 1 min)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    cases = [("attention", 64, 128)] if args.quick else [("attention", 128, 128), ("s4d", 128, 128),
                                                          ("attention", 128, 512)]
    repeats, steps = (2, 10) if args.quick else (5, 30)
    print(f"threads {args.threads}, {steps} steps per run, {repeats} interleaved repeats, batch 16, 4 layers")
    print("| mixer | d_model | seq_len | plain tok/s | lightning tok/s | lightning / plain |")
    print("|---|---|---|---|---|---|")
    for mixer, d_model, seq_len in cases:
        config, parts = settings(mixer, d_model, steps, seq_len, 16)
        plain, light = [], []
        for _ in range(repeats):
            plain.append(plain_tokens_per_s(config, parts, steps))
            light.append(lightning_tokens_per_s(config, parts, steps))
        a, b = statistics.median(plain), statistics.median(light)
        print(f"| {mixer} | {d_model} | {seq_len} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
