"""Perplexity vs context length: how well a model uses (or survives) contexts shorter and longer than trained.

Legend: N windows, L window length, V vocabulary.

The stream is cut into `num_windows` consecutive spans of the largest length; for each length L
the window is the L + 1 bytes that end where a span ends (inputs the first L, targets the last L),
so every length scores the text just before the same end points and the scored bytes of a shorter
window are a subset of those of a longer one. The score is the mean next-byte negative
log-likelihood over the last half of each window (`scored="last_half"`, the default): every scored
byte then has at least L/2 bytes of context, so a longer window can only help a model that uses its
context, and the first bytes of a window (with almost no context, the same at every length) do
not dilute the comparison. `scored="all"` averages over every position instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCORED = ("last_half", "all")


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, scored: str = "last_half") -> torch.Tensor:
    """windows (N, L + 1) int64 -> mean NLL (nats) per window (N,) over the scored targets."""
    if scored not in SCORED:
        raise ValueError(f"scored={scored!r}; valid: {SCORED}")
    inputs, targets = windows[:, :-1], windows[:, 1:]  # (N, L)
    logits = model(inputs).float()  # (N, L, V)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (N, L)
    start = nll.shape[1] // 2 if scored == "last_half" else 0
    return nll[:, start:].mean(dim=1)


def perplexity_vs_length(model: nn.Module, stream: torch.Tensor, lengths: list[int], num_windows: int = 16,
                         scored: str = "last_half", batch_size: int = 4) -> list[dict]:
    """One row per length: {"length", "windows", "nll", "perplexity", "bits_per_token"} over a uint8 or
    int64 token stream (S,). ValueError when the stream is too short for a window of some length."""
    span = max(lengths)
    available = (stream.numel() - 1) // span
    if available < 1:
        raise ValueError(f"ppl: the validation stream ({stream.numel()} tokens) is shorter than length {span}")
    count = min(num_windows, available)
    ends = [(index + 1) * span + 1 for index in range(count)]  # exclusive end of each window
    rows = []
    for length in lengths:
        windows = torch.stack([stream[end - length - 1:end].long() for end in ends])  # (N, L + 1)
        nll = torch.cat([window_nll(model, batch, scored) for batch in windows.split(batch_size)]).mean().item()
        rows.append({"length": length, "windows": count, "nll": nll, "perplexity": math.exp(nll),
                     "bits_per_token": nll / math.log(2)})
    return rows


__all__ = ["SCORED", "perplexity_vs_length", "window_nll"]
