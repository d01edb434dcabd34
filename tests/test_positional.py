"""Positional encodings against their published formulas, each recomputed here with plain math."""

from __future__ import annotations

import math

import pytest
import torch

from seqarch.positional import (
    alibi_slopes,
    apply_rope,
    rerope_angles,
    rerope_distance,
    rope_cos_sin,
    rope_frequencies,
    sinusoidal_positions,
)
from tests.references import require
from tests.tolerance import assert_close

HEAD_DIM, BASE, TRAINED = 64, 10000.0, 2048


def plain(i: int, base: float = BASE, dim: int = HEAD_DIM) -> float:
    return base ** (-2 * i / dim)


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_linear_scaling_is_position_interpolation(factor):
    inv_freq, scale = rope_frequencies(HEAD_DIM, BASE, TRAINED, {"type": "linear", "factor": factor})
    # Position Interpolation: angle (t / s) * theta_i.
    assert_close(inv_freq, as_tensor([plain(i) / factor for i in range(HEAD_DIM // 2)]).float(), "linear inv_freq")
    assert scale == 1.0


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_ntk_scaling_changes_the_base(factor):
    inv_freq, scale = rope_frequencies(HEAD_DIM, BASE, TRAINED, {"type": "ntk", "factor": factor})
    new_base = BASE * factor ** (HEAD_DIM / (HEAD_DIM - 2))
    assert_close(inv_freq, as_tensor([plain(i, new_base) for i in range(HEAD_DIM // 2)]).float(), "ntk inv_freq")
    assert scale == 1.0
    # The highest frequency is untouched, the lowest is divided by exactly s (the point of the exponent).
    assert math.isclose(inv_freq[0].item(), 1.0)
    assert math.isclose(plain(HEAD_DIM // 2 - 1) / inv_freq[-1].item(), factor, rel_tol=1e-5)


@pytest.mark.parametrize("seq_len", [None, 100, 2048, 3000, 8192])
def test_dynamic_ntk_grows_the_base_beyond_the_trained_length_only(seq_len):
    factor = 4.0
    scaling = {"type": "dynamic", "factor": factor, "original_max_position": TRAINED}
    inv_freq, scale = rope_frequencies(HEAD_DIM, BASE, 4096, scaling, seq_len=seq_len)
    length = TRAINED if seq_len is None else max(seq_len, TRAINED)
    new_base = BASE * (factor * length / TRAINED - (factor - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    assert_close(inv_freq, as_tensor([plain(i, new_base) for i in range(HEAD_DIM // 2)]).float(), "dynamic inv_freq")
    assert scale == 1.0
    if seq_len is not None and seq_len <= TRAINED:
        assert torch.equal(inv_freq, rope_frequencies(HEAD_DIM, BASE)[0])


def yarn_expected(factor, beta_fast, beta_slow, dim=HEAD_DIM, base=BASE, trained=TRAINED):
    """YaRN as in the authors' code: ramp over dimension index between the correction dims."""

    def correction(rotations):
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction(beta_fast)), 0), min(math.ceil(correction(beta_slow)), dim - 1)
    values = []
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        values.append(plain(i, base, dim) * (1 - ramp) + plain(i, base, dim) / factor * ramp)
    return values


@pytest.mark.parametrize(("factor", "beta_fast", "beta_slow"), [(4.0, 32.0, 1.0), (16.0, 16.0, 2.0)])
def test_yarn_ramps_between_extrapolation_and_interpolation(factor, beta_fast, beta_slow):
    scaling = {"type": "yarn", "factor": factor, "original_max_position": TRAINED, "beta_fast": beta_fast,
               "beta_slow": beta_slow}
    inv_freq, scale = rope_frequencies(HEAD_DIM, BASE, TRAINED, scaling)
    assert_close(inv_freq, as_tensor(yarn_expected(factor, beta_fast, beta_slow)).float(), "yarn inv_freq")
    assert math.isclose(scale, 0.1 * math.log(factor) + 1)
    # The paper's statement in terms of r = L / wavelength: r > beta_fast keeps theta, r < beta_slow gets theta / s.
    for i in range(HEAD_DIM // 2):
        rotations = TRAINED * plain(i) / (2 * math.pi)
        if rotations > beta_fast:
            assert math.isclose(inv_freq[i].item(), plain(i), rel_tol=1e-6)
        if rotations < beta_slow:
            assert math.isclose(inv_freq[i].item(), plain(i) / factor, rel_tol=1e-6)


def test_yarn_attention_factor_with_mscale_fields():
    scaling = {"type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert rope_frequencies(HEAD_DIM, BASE, TRAINED, scaling)[1] == 1.0
    scaling = {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5}
    expected = (0.1 * math.log(40.0) + 1) / (0.05 * math.log(40.0) + 1)
    assert math.isclose(rope_frequencies(HEAD_DIM, BASE, TRAINED, scaling)[1], expected)
    # mscale without mscale_all_dim is ignored (HF's semantics): the paper's 0.1 ln s + 1.
    scaling = {"type": "yarn", "factor": 40.0, "mscale": 0.707}
    assert math.isclose(rope_frequencies(HEAD_DIM, BASE, TRAINED, scaling)[1], 0.1 * math.log(40.0) + 1)
    # An explicit attention_factor wins over everything.
    scaling = {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5, "attention_factor": 1.25}
    assert rope_frequencies(HEAD_DIM, BASE, TRAINED, scaling)[1] == 1.25


def llama3_expected(factor, low_freq_factor, high_freq_factor, trained, base=BASE, dim=HEAD_DIM):
    """Llama 3.1's rule written per frequency from its description (Meta's reference code)."""
    values = []
    for i in range(dim // 2):
        wavelength = 2 * math.pi / plain(i, base, dim)
        if wavelength < trained / high_freq_factor:
            values.append(plain(i, base, dim))
        elif wavelength > trained / low_freq_factor:
            values.append(plain(i, base, dim) / factor)
        else:
            smooth = (trained / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            values.append((1 - smooth) * plain(i, base, dim) / factor + smooth * plain(i, base, dim))
    return values


@pytest.mark.parametrize(("factor", "low", "high", "trained"), [(8.0, 1.0, 4.0, 2048), (4.0, 2.0, 8.0, 512)])
def test_llama3_scaling_keeps_high_divides_low_and_blends_between(factor, low, high, trained):
    scaling = {"type": "llama3", "factor": factor, "original_max_position": trained, "low_freq_factor": low,
               "high_freq_factor": high}
    inv_freq, scale = rope_frequencies(HEAD_DIM, BASE, trained, scaling)
    assert_close(inv_freq, as_tensor(llama3_expected(factor, low, high, trained)).float(), "llama3 inv_freq")
    assert scale == 1.0
    blended = [i for i in range(HEAD_DIM // 2) if trained / high <= 2 * math.pi / plain(i) <= trained / low]
    assert blended, "the grid should exercise the blended band"


def _hf_config(rope_parameters: dict, head_dim: int = HEAD_DIM):
    transformers = require("transformers")
    return transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                    max_position_embeddings=4 * TRAINED, rope_parameters=rope_parameters)


@pytest.mark.parametrize("fields", [
    {"factor": 4.0},
    {"factor": 16.0, "beta_fast": 16.0, "beta_slow": 2.0},
    {"factor": 40.0, "mscale": 0.707},  # mscale alone: HF ignores it
    {"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5},  # DeepSeek's ratio
    {"factor": 8.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 8.0, "attention_factor": 1.3, "mscale": 2.0, "mscale_all_dim": 1.0},
], ids=["plain", "betas", "mscale-only", "mscale-ratio", "mscale-equal", "explicit-factor"])
@pytest.mark.parametrize("head_dim", [64, 96])
def test_yarn_matches_transformers(fields, head_dim):
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    config = _hf_config({"rope_type": "yarn", "rope_theta": BASE, "original_max_position_embeddings": TRAINED,
                         **fields}, head_dim)
    expected_freq, expected_factor = _compute_yarn_parameters(config)
    inv_freq, factor = rope_frequencies(head_dim, BASE, TRAINED, {"type": "yarn", "original_max_position": TRAINED,
                                                                  **fields})
    assert_close(inv_freq, expected_freq.float(), "yarn inv_freq vs transformers")
    assert math.isclose(factor, expected_factor, rel_tol=1e-12), (factor, expected_factor)


@pytest.mark.parametrize(("factor", "low", "high", "trained", "theta"), [
    (8.0, 1.0, 4.0, 2048, 500000.0), (32.0, 1.0, 4.0, 8192, 500000.0), (4.0, 2.0, 8.0, 512, 10000.0)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama3_matches_transformers(factor, low, high, trained, theta, head_dim):
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    fields = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high}
    config = _hf_config({"rope_type": "llama3", "rope_theta": theta, "original_max_position_embeddings": trained,
                         **fields}, head_dim)
    expected_freq, expected_factor = _compute_llama3_parameters(config)
    inv_freq, scale = rope_frequencies(head_dim, theta, trained, {"type": "llama3", "original_max_position": trained,
                                                                  **fields})
    assert_close(inv_freq, expected_freq.float(), "llama3 inv_freq vs transformers")
    assert scale == expected_factor == 1.0


@pytest.mark.parametrize("scaling", [{"type": "longrope"}, {"type": "linear", "factor": 0.5},
                                     {"type": "linear", "beta_fast": 3}, "linear"])
def test_bad_scaling_is_named(scaling):
    with pytest.raises(ValueError, match="RoPE scaling"):
        rope_frequencies(HEAD_DIM, BASE, TRAINED, scaling)


@pytest.mark.parametrize(("heads", "expected"), [
    (8, [2.0**-k for k in range(1, 9)]),
    (16, [2.0 ** (-k / 2) for k in range(1, 17)]),
    # 12 = 8 + 4: the eight slopes of 8 heads, then slopes 1, 3, 5, 7 (0-based) of 16 heads.
    (12, [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]),
])
def test_alibi_slopes_match_the_paper(heads, expected):
    assert_close(alibi_slopes(heads), as_tensor(expected), f"slopes for {heads} heads")


def test_sinusoidal_positions_follow_vaswani():
    positions = torch.tensor([0, 3, 250])
    table = sinusoidal_positions(positions, 8, dtype=torch.float64)
    expected = [[f(t / 10000 ** (2 * i / 8)) for i in range(4) for f in (math.sin, math.cos)] for t in (0, 3, 250)]
    assert_close(table, as_tensor(expected), "sinusoidal table")


def test_rerope_distances_clip_or_compress_beyond_the_window():
    distance = torch.tensor([0, 3, 5, 6, 20])
    assert rerope_distance(distance, 5).tolist() == [0, 3, 5, 5, 5]
    assert rerope_distance(distance, 5, leak=0.25).tolist() == [0, 3, 5, 5.25, 8.75]


def test_rerope_second_pass_rotation_gives_the_compressed_distance():
    inv_freq, _ = rope_frequencies(16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    t, s = torch.tensor(40.0, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64)
    window, leak = 10, 0.1
    q_pos, k_pos = rerope_angles(t, s, window, leak)
    two_sided = (apply_rope(q, *rope_cos_sin(q_pos, inv_freq, torch.float64))
                 * apply_rope(k, *rope_cos_sin(k_pos, inv_freq, torch.float64))).sum()
    relative = torch.tensor(window + (40 - 7 - window) * leak, dtype=torch.float64)
    one_sided = (apply_rope(q, *rope_cos_sin(relative, inv_freq, torch.float64)) * k).sum()
    assert math.isclose(two_sided.item(), one_sided.item(), rel_tol=1e-9)
