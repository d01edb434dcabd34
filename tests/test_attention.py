"""Attention specifics: RoPE's relative property, GQA against explicit head repetition."""

from __future__ import annotations

import math

import torch

from seqarch import build_mixer
from seqarch.positional import apply_rope, rope_cos_sin, rope_frequencies
from tests.tolerance import assert_close


def test_rope_frequencies_follow_the_formula():
    inv_freq, scale = rope_frequencies(8, base=10000.0)
    expected = torch.tensor([10000.0 ** (-2 * i / 8) for i in range(4)])
    assert_close(inv_freq, expected, "inv_freq")
    assert scale == 1.0


def test_rope_scores_depend_on_relative_position_only():
    inv_freq, _ = rope_frequencies(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(s, t):
        cos_s, sin_s = rope_cos_sin(torch.tensor([s]), inv_freq, torch.float64)
        cos_t, sin_t = rope_cos_sin(torch.tensor([t]), inv_freq, torch.float64)
        return (apply_rope(q, cos_s, sin_s) * apply_rope(k, cos_t, sin_t)).sum().item()

    assert math.isclose(score(10, 3), score(107, 100), rel_tol=1e-5)
    assert not math.isclose(score(10, 3), score(10, 4), rel_tol=1e-3)


def test_rope_rotates_pairs_by_position_times_frequency():
    inv_freq, _ = rope_frequencies(4, base=100.0)
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.tensor([5]), inv_freq, torch.float64)
    out = apply_rope(x, cos, sin)[0, 0, 0]
    expected = []
    for i, (a, b) in enumerate([(1.0, 3.0), (2.0, 4.0)]):
        angle = 5 * 100.0 ** (-2 * i / 4)
        expected.append((a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)))
    assert_close(out, torch.tensor([expected[0][0], expected[1][0], expected[0][1], expected[1][1]],
                                   dtype=torch.float64), "rotated pairs", dtype=torch.float32)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build_mixer("attention", d_model=32, n_heads=4, n_kv_heads=2)
    mha = build_mixer("attention", d_model=32, n_heads=4)
    head_dim = 8
    k_weight, v_weight = gqa.kv_proj.weight.chunk(2, dim=0)  # (G*E, D) each

    def repeat(weight):
        return weight.view(2, head_dim, 32).repeat_interleave(2, dim=0).reshape(4 * head_dim, 32)

    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.kv_proj.weight.copy_(torch.cat([repeat(k_weight), repeat(v_weight)]))
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
    x = torch.randn(2, 11, 32)
    assert_close(gqa(x), mha(x), "GQA vs MHA with repeated heads")
    assert gqa.state_nbytes(1, 100) * 2 == mha.state_nbytes(1, 100)


def test_attention_matches_explicit_softmax():
    mixer = build_mixer("attention", d_model=16, n_heads=2, positional="none").double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    q = mixer.q_proj(x).view(1, 6, 2, 8).transpose(1, 2)
    k, v = (t.view(1, 6, 2, 8).transpose(1, 2) for t in mixer.kv_proj(x).chunk(2, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 16)
    assert_close(mixer(x), mixer.out_proj(out), "attention vs explicit softmax")
