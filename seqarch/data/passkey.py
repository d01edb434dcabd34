"""Passkey retrieval (Mohtashami and Jaggi, 2023, "Landmark Attention", section 4.2), byte-level.

Legend: N examples, L sequence length (bytes), K digits of the key.

One example is a haystack of filler sentences with one needle at a depth fraction d in [0, 1]:

    <filler ...> the pass key is 40913. remember it. <filler ...> what is the pass key? the pass key is 40913

The filler is a fixed cycle of plain sentences, entered at a random offset so the model cannot
count its way to the needle. The needle starts at round(d * (filler bytes)) inside the filler, so
d = 0 puts it first and d = 1 right before the question. Only the K digits of the answer are
scored (targets elsewhere are IGNORE), so accuracy measures retrieval and nothing else.

The training source (`data=passkey`) draws depth uniformly in [0, 1] and the haystack length
uniformly in [min_len, L]; shorter haystacks are left-padded with byte 0, so every example is
(L,) and the answer always ends the sequence.
"""

from __future__ import annotations

import torch

from seqarch.data.synthetic import IGNORE

FILLER = (b"the grass is green. the sky is blue. the sun is yellow. here we go. there and back again. "
          b"the river runs to the sea. a cat sleeps in the sun. ")
NEEDLE = b"the pass key is {key}. remember it. "
QUESTION = b"what is the pass key? the pass key is "
PAD = 0  # left padding byte of haystacks shorter than the sequence


def passkey_overhead(num_digits: int) -> int:
    """Bytes of an example that are not filler: the needle, the question and the answer."""
    return len(NEEDLE) - len(b"{key}") + num_digits + len(QUESTION) + num_digits


def passkey_example(length: int, depth: float, key: str, filler_offset: int = 0) -> tuple[list[int], int]:
    """(bytes of one example of exactly `length` bytes, index of the first answer byte).

    The answer is the last len(key) bytes. ValueError when `length` leaves no room for filler."""
    if not 0 <= depth <= 1:
        raise ValueError(f"passkey: depth must be in [0, 1], got {depth}")
    needle = NEEDLE.replace(b"{key}", key.encode())
    filler_len = length - len(needle) - len(QUESTION) - len(key)
    if filler_len < 0:
        raise ValueError(f"passkey: length {length} is too short for a {len(key)}-digit key; "
                         f"need at least {passkey_overhead(len(key))} bytes")
    repeats = (filler_offset + filler_len) // len(FILLER) + 1
    filler = (FILLER * repeats)[filler_offset % len(FILLER):][:filler_len]
    cut = round(depth * filler_len)
    example = filler[:cut] + needle + filler[cut:] + QUESTION + key.encode()
    return list(example), length - len(key)


def random_key(num_digits: int, generator: torch.Generator) -> str:
    """A key of `num_digits` decimal digits drawn uniformly (leading zeros allowed)."""
    return "".join(str(int(d)) for d in torch.randint(0, 10, (num_digits,), generator=generator))


def passkey_batch(num_examples: int, seq_len: int, num_digits: int, min_len: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (N, L), targets (N, L)) int64 next-byte pairs of random-depth, random-length examples;
    targets are IGNORE except at the K answer digits. Each example holds seq_len + 1 bytes, so inputs
    and targets both have seq_len."""
    inputs = torch.full((num_examples, seq_len), PAD, dtype=torch.long)
    targets = torch.full((num_examples, seq_len), IGNORE, dtype=torch.long)
    for row in range(num_examples):
        length = int(torch.randint(min_len, seq_len + 1, (), generator=generator)) + 1
        depth = float(torch.rand((), generator=generator))
        offset = int(torch.randint(0, len(FILLER), (), generator=generator))
        example, answer_start = passkey_example(length, depth, random_key(num_digits, generator), offset)
        sequence = torch.tensor(example)  # (length,)
        inputs[row, seq_len + 1 - length:] = sequence[:-1]
        targets[row, -num_digits:] = sequence[answer_start:]
    return inputs, targets


__all__ = ["FILLER", "NEEDLE", "QUESTION", "passkey_batch", "passkey_example", "passkey_overhead", "random_key"]
