"""State-tracking tasks: the word problem of a finite group, scored at every position.

Legend: N examples, L sequence length, G the group (its elements are the tokens, 0 the identity).

The model reads a sequence of group elements g_1 ... g_L and must output, at every position t, the product
g_1 g_2 ... g_t (composition left to right). Merrill, Petty, Sabharwal (2024), "The Illusion of State in
State-Space Models", use this to separate what attention and diagonal SSMs can track (abelian groups
within TC0 tricks at bounded length) from what needs a non-diagonal recurrence (S5, NC1-complete);
Grazzi et al. (2025), "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues", train
parity and modular arithmetic at one length and test at longer ones, as seqarch.bench.quality does.

- "parity": Z2; the target at t is the parity of the 1s so far.
- "z5": Z5, addition mod 5; the target at t is the running sum mod 5.
- "s5": the symmetric group on 5 elements (120 permutations, lexicographic order, 0 the identity).

Worked example (parity): inputs 1 0 1 1 0 -> targets 1 1 0 1 1; (z5): inputs 3 4 1 -> targets 3 2 3.
"""

from __future__ import annotations

import itertools

import torch


def _cyclic(order: int) -> torch.Tensor:
    """Multiplication table of Z_order: table[a, b] = a + b mod order."""
    elements = torch.arange(order)
    return (elements[:, None] + elements[None, :]) % order


def _symmetric(degree: int) -> torch.Tensor:
    """Multiplication table of S_degree: table[a, b] = the permutation 'apply a, then b', as an index into
    the lexicographically ordered permutations (index 0 is the identity)."""
    perms = list(itertools.permutations(range(degree)))
    index = {perm: position for position, perm in enumerate(perms)}
    table = torch.empty(len(perms), len(perms), dtype=torch.long)
    for a, first in enumerate(perms):
        for b, second in enumerate(perms):
            table[a, b] = index[tuple(second[first[i]] for i in range(degree))]
    return table


GROUPS: dict[str, torch.Tensor] = {"parity": _cyclic(2), "z5": _cyclic(5), "s5": _symmetric(5)}


def word_problem(num_examples: int, seq_len: int, group: str,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (N, L) int64: uniform random elements of `group` and the running product
    (every position scored). See the module docstring for the groups and a worked example."""
    if group not in GROUPS:
        raise ValueError(f"word_problem: group {group!r}; valid: {', '.join(GROUPS)}")
    table = GROUPS[group]
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    inputs = torch.randint(len(table), (num_examples, seq_len), generator=generator)
    targets = torch.empty_like(inputs)
    state = torch.zeros(num_examples, dtype=torch.long)  # the identity
    for t in range(seq_len):  # a data generator, not a model path: L table look-ups over all rows at once
        state = table[state, inputs[:, t]]
        targets[:, t] = state
    return inputs, targets


__all__ = ["GROUPS", "word_problem"]
