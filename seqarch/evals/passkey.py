"""Passkey retrieval accuracy per length x depth (Mohtashami and Jaggi, 2023, section 4.2).

Legend: N trials, L example length (bytes), K key digits, V vocabulary.

Each cell (L, depth) runs N examples of exactly L bytes (seqarch/data/passkey.py) with random keys
and filler offsets drawn from `seed`, the same for every model and scaling evaluated with that seed.
The answer is scored teacher-forced in one forward pass: digit accuracy is the share of the K
answer digits whose argmax prediction (given the true earlier digits) is right, and a trial is an
exact match when all K are right. That exact match is what greedy decoding after the question
produces: greedy decoding emits the argmax digit by digit, so it reproduces the key exactly when
every teacher-forced argmax is right, and diverges at the first wrong one.
"""

from __future__ import annotations

import torch
from torch import nn

from seqarch.data.passkey import FILLER, passkey_example, passkey_overhead, random_key


def passkey_trials(length: int, depth: float, trials: int, num_digits: int, seed: int) -> torch.Tensor:
    """(N, L) int64 examples of one cell; the answer is the last K bytes of each row."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(trials):
        key = random_key(num_digits, generator)
        offset = int(torch.randint(0, len(FILLER), (), generator=generator))
        rows.append(passkey_example(length, depth, key, offset)[0])
    return torch.tensor(rows)


@torch.no_grad()
def score_answers(model: nn.Module, examples: torch.Tensor, num_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """examples (N, L) -> (exact match (N,) bool, digit accuracy (N,) float), teacher-forced."""
    logits = model(examples[:, :-1])  # (N, L - 1, V)
    predicted = logits[:, -num_digits:].argmax(dim=-1)  # (N, K)
    correct = predicted == examples[:, -num_digits:]  # (N, K)
    return correct.all(dim=1), correct.float().mean(dim=1)


def passkey_accuracy(model: nn.Module, lengths: list[int], depths: list[float], trials: int = 20,
                     num_digits: int = 5, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """One row per (length, depth): {"length", "depth", "trials", "accuracy", "digit_accuracy"}.
    ValueError for a length too short to hold the needle and the question, or a depth outside [0, 1]."""
    shortest = passkey_overhead(num_digits)
    for length in lengths:
        if length < shortest:
            raise ValueError(f"passkey: length {length} is too short for a {num_digits}-digit key; "
                             f"need lengths >= {shortest}")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ValueError(f"passkey: depths must be in [0, 1], got {depth}")
    rows = []
    for length in lengths:
        for cell, depth in enumerate(depths):
            examples = passkey_trials(length, depth, trials, num_digits, seed + cell)
            scores = [score_answers(model, batch, num_digits) for batch in examples.split(batch_size)]
            exact = torch.cat([s[0] for s in scores]).float().mean().item()
            digits = torch.cat([s[1] for s in scores]).mean().item()
            rows.append({"length": length, "depth": depth, "trials": trials, "accuracy": exact,
                         "digit_accuracy": digits})
    return rows


__all__ = ["passkey_accuracy", "passkey_trials", "score_answers"]
