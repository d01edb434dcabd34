"""Synthetic tasks: every scored target is the answer the task definition implies, checked by
reading the sequence back token by token (not by re-running the generator's arithmetic)."""

from __future__ import annotations

import pytest
import torch

from seqarch.data import IGNORE, build_data
from seqarch.data.synthetic import induction_heads, multiquery_associative_recall, selective_copying


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_answers_are_the_values_paired_with_the_queried_keys(random_non_queries):
    vocab, pairs, seq_len = 64, 5, 41
    inputs, targets = multiquery_associative_recall(50, seq_len, vocab, pairs, random_non_queries=random_non_queries,
                                                    generator=torch.Generator().manual_seed(3))
    assert inputs.shape == targets.shape == (50, seq_len)
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row_inputs[0:2 * pairs:2], row_inputs[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        pairing = dict(zip(keys, values, strict=True))
        scored = [t for t, target in enumerate(row_targets) if target != IGNORE]
        assert len(scored) == pairs  # every key is queried exactly once
        assert sorted(row_inputs[t] for t in scored) == sorted(keys)
        for t in scored:
            assert t >= 2 * pairs and (t - 2 * pairs) % 2 == 0  # queries sit at even offsets after the context
            assert row_targets[t] == pairing[row_inputs[t]]
        if not random_non_queries:
            assert all(row_inputs[t] == 0 for t in range(2 * pairs, seq_len) if t not in scored)


def test_mqar_prefers_short_gaps_and_is_seeded():
    inputs, targets = multiquery_associative_recall(400, 256, 512, 4, generator=torch.Generator().manual_seed(0))
    offsets = (targets != IGNORE).nonzero()[:, 1] - 8
    near, far = (offsets < 64).sum(), (offsets >= 184).sum()
    assert near > 2 * far  # power law a * gap^(a - 1): mass concentrates at small gaps
    again = multiquery_associative_recall(400, 256, 512, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])


def test_induction_heads_answer_is_the_token_after_the_first_trigger():
    inputs, targets = induction_heads(100, 23, 11, generator=torch.Generator().manual_seed(1))
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert row_inputs[-1] == 0 and row_inputs[:-1].count(0) == 1
        first = row_inputs.index(0)
        assert row_targets[:-1] == [IGNORE] * 22 and row_targets[-1] == row_inputs[first + 1] != 0


def test_selective_copying_targets_are_the_data_tokens_in_order():
    inputs, targets = selective_copying(100, 31, 12, 6, generator=torch.Generator().manual_seed(2))
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        context, markers = row_inputs[:25], row_inputs[25:]
        data = [token for token in context if token != 0]
        assert len(data) == 6 and all(2 <= token < 12 for token in data)
        assert markers == [1] * 6
        assert row_targets[25:] == data and row_targets[:25] == [IGNORE] * 25


@pytest.mark.parametrize("source, message", [
    ("mqar", "num_kv_pairs <= seq_len / 4"),
    ("selective_copy", "num_tokens <= seq_len / 2"),
])
def test_task_configs_reject_impossible_sizes(source, message):
    with pytest.raises(ValueError, match=message):
        build_data(source, seq_len=16, **({"num_kv_pairs": 5} if source == "mqar" else {"num_tokens": 9}))


def test_task_bundles_report_chance_and_use_distinct_validation_examples():
    bundle = build_data("mqar", seq_len=32, vocab_size=64, num_kv_pairs=4, num_train=64, num_val=16)
    assert bundle.metric == "accuracy" and bundle.baseline == pytest.approx(1 / 32)
    train_inputs = bundle.train.tensors[0]
    val_inputs = bundle.val.tensors[0]
    assert not any(torch.equal(v, t) for v in val_inputs for t in train_inputs)


def _docstring_example(function) -> tuple[list[str], list[str]]:
    lines = [line.split() for line in function.__doc__.splitlines() if line.strip().startswith("inputs")]
    [row] = lines
    split = row.index("targets")
    return row[1:split], row[split + 1:]


def test_the_mqar_docstring_example_is_a_valid_example():
    """The worked example reads as the task: each scored position holds a key of the context, and its target
    is the value that followed that key; nothing else is scored."""
    inputs, targets = _docstring_example(multiquery_associative_recall)
    assert len(inputs) == len(targets)
    pairs = dict(zip(inputs[0:4:2], inputs[1:4:2], strict=True))
    scored = [t for t, target in enumerate(targets) if target != "-"]
    assert scored and all(inputs[t] in pairs and targets[t] == pairs[inputs[t]] for t in scored)


def test_mqar_scores_only_query_positions_and_filler_is_uniform_over_the_vocabulary():
    inputs, targets = multiquery_associative_recall(300, 64, 32, 4, generator=torch.Generator().manual_seed(5))
    scored = targets != IGNORE
    assert (scored.sum(dim=1) == 4).all()  # one scored position per key, nothing else carries loss
    assert (targets[:, :8] == IGNORE).all()  # never inside the key-value context
    filler = inputs[:, 8:][~scored[:, 8:]]
    counts = torch.bincount(filler, minlength=32).float()
    assert counts.min() > 0.6 * counts.mean()  # Zoology: zeros replaced by tokens drawn from all of [0, V)


@pytest.mark.parametrize("group", ["parity", "z5", "s5"])
def test_word_problem_targets_are_the_running_products(group):
    from seqarch.data.state_tracking import GROUPS, word_problem

    table = GROUPS[group]
    inputs, targets = word_problem(20, 13, group, generator=torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (20, 13) and int(inputs.max()) < len(table)
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        if group == "parity":
            assert row_targets == [sum(row_inputs[:t + 1]) % 2 for t in range(13)]
        elif group == "z5":
            assert row_targets == [sum(row_inputs[:t + 1]) % 5 for t in range(13)]
        else:
            state = 0
            for token, target in zip(row_inputs, row_targets, strict=True):
                state = int(table[state, token])
                assert target == state


def test_s5_table_is_the_symmetric_group():
    from seqarch.data.state_tracking import GROUPS

    table = GROUPS["s5"]
    assert table.shape == (120, 120)
    assert (table[0] == torch.arange(120)).all() and (table[:, 0] == torch.arange(120)).all()  # 0 is the identity
    assert all(sorted(row) == list(range(120)) for row in table.tolist())  # Latin square: every element invertible
    a, b, c = torch.randint(120, (3, 500), generator=torch.Generator().manual_seed(0))
    assert (table[table[a, b], c] == table[a, table[b, c]]).all()  # associative
    assert not (table == table.T).all()  # not abelian, unlike Z5


def test_the_state_tracking_docstring_examples():
    from seqarch.data import state_tracking

    text = state_tracking.__doc__
    assert "(parity): inputs 1 0 1 1 0 -> targets 1 1 0 1 1" in text and "(z5): inputs 3 4 1 -> targets 3 2 3" in text
    assert [sum([1, 0, 1, 1, 0][:t + 1]) % 2 for t in range(5)] == [1, 1, 0, 1, 1]
    assert [sum([3, 4, 1][:t + 1]) % 5 for t in range(3)] == [3, 2, 3]
