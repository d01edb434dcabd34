"""Synthetic sequence tasks that probe recall and copying, generated on the fly with no download.

Legend: N examples, L sequence length, V vocabulary size, P key-value pairs / tokens to copy.

Every generator returns `(inputs, targets)`, both (N, L) int64: the model reads `inputs` and is
scored only where `targets != IGNORE` (-100), so accuracy measures the task and nothing else.

- Multi-query associative recall (MQAR): Arora et al. (2023), "Zoology: Measuring and Improving
  Recall in Efficient Language Models", section 3. P key-value pairs, then the keys queried again
  at power-law distributed gaps; the answer to a query is the value that followed its key.
- Induction heads: Olsson et al. (2022), "In-context Learning and Induction Heads"; the variant of
  the H3 paper (Fu et al., 2023): a trigger token appears once followed by a token, and again at
  the end, where the model must produce that token.
- Selective copying: Gu and Dao (2023), "Mamba", section 3.1: P data tokens scattered among noise
  tokens must be reproduced in order after the context.
"""

from __future__ import annotations

import torch

IGNORE = -100  # target value that the loss and the metrics skip


def _sample_without_replacement(num_rows: int, population: int, count: int, generator: torch.Generator):
    """(num_rows, count) distinct integers in [0, population) per row, uniformly."""
    return torch.rand(num_rows, population, generator=generator).argsort(dim=-1)[:, :count]


def multiquery_associative_recall(num_examples: int, seq_len: int, vocab_size: int, num_kv_pairs: int,
                                  power_a: float = 0.01, random_non_queries: bool = True,
                                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR as Zoology defines it.

    Keys come from [1, V/2), values from [V/2, V). The first 2P tokens are `k1 v1 k2 v2 ...`; the rest
    holds each key once more, at even offsets 2 * gap with gaps drawn without replacement with
    probability proportional to a * gap^(a - 1) (a = power_a: short gaps are likelier), and random
    tokens (or 0) everywhere else. The target after a queried key is its value. Example (P = 2):

        inputs   k1 v1 k2 v2 .  .  k2 .  k1 .       targets  -  -  -  -  -  -  v2 -  v1 -
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    context = 2 * num_kv_pairs
    key_vocab = vocab_size // 2
    keys = 1 + _sample_without_replacement(num_examples, key_vocab - 1, num_kv_pairs, generator)  # (N, P)
    values = key_vocab + _sample_without_replacement(num_examples, vocab_size - key_vocab, num_kv_pairs, generator)
    pairs = torch.stack([keys, values], dim=-1).flatten(1)  # (N, 2P): k1 v1 k2 v2 ...
    space = (seq_len - context) // 2
    gap_weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(gap_weights.expand(num_examples, space), num_kv_pairs, replacement=False,
                             generator=generator)  # (N, P)
    queries = torch.zeros(num_examples, seq_len - context + 1, dtype=torch.long)
    queries.scatter_(1, 2 * gaps, keys)
    sequence = torch.cat([pairs, queries], dim=1)  # (N, L + 1)
    answers = torch.full_like(sequence, IGNORE)
    answers.scatter_(1, 2 * gaps + context + 1, values)
    inputs, targets = sequence[:, :-1].clone(), answers[:, 1:].clone()
    if random_non_queries:
        empty = inputs == 0
        inputs[empty] = torch.randint(vocab_size, (int(empty.sum()),), generator=generator)
    return inputs, targets


def induction_heads(num_examples: int, seq_len: int, vocab_size: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens from [1, V) with the trigger token 0 placed once at a random position p < L - 2,
    followed by the answer token, and again at the last position; the target there is the answer.

        inputs   5 9 0 7 3 8 0        targets  - - - - - - 7
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    inputs = torch.randint(1, vocab_size, (num_examples, seq_len), generator=generator)
    rows = torch.arange(num_examples)
    trigger_at = torch.randint(0, seq_len - 2, (num_examples,), generator=generator)
    inputs[rows, trigger_at] = 0
    inputs[:, -1] = 0
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = inputs[rows, trigger_at + 1]
    return inputs, targets


def selective_copying(num_examples: int, seq_len: int, vocab_size: int, num_tokens: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """P data tokens from [2, V) at random (ordered) positions of a context of L - P noise tokens (0),
    then P copy markers (1); at the j-th marker the target is the j-th data token.

        inputs   0 4 0 0 6 0 1 1        targets  - - - - - - 4 6
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    context = seq_len - num_tokens
    positions = _sample_without_replacement(num_examples, context, num_tokens, generator).sort(dim=-1).values
    data = torch.randint(2, vocab_size, (num_examples, num_tokens), generator=generator)  # (N, P)
    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    inputs.scatter_(1, positions, data)
    inputs[:, context:] = 1
    targets = torch.full_like(inputs, IGNORE)
    targets[:, context:] = data
    return inputs, targets


__all__ = ["IGNORE", "induction_heads", "multiquery_associative_recall", "selective_copying"]
