"""RetNet mixer: the contract for both training forms and odd chunkings, the layer against the
paper's multi-scale retention written out, config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_mixer
from seqarch.positional import apply_rope, rope_cos_sin, rope_frequencies
from tests.contract_checks import (
    check_causal,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
)
from tests.tolerance import assert_close

VARIANTS = {
    "parallel": dict(d_model=64, backend="parallel"),
    "chunked": dict(d_model=64, backend="chunked"),
    "chunked-C5-2heads": dict(d_model=64, n_heads=2, backend="chunked", chunk_size=5),
    "parallel-custom-decay": dict(d_model=64, n_heads=2, backend="parallel", decay=(0.7, 0.99), value_factor=1),
    "sequential": dict(d_model=64, backend="sequential"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_contract_for_each_form(variant):
    mixer = build_mixer("retnet", **VARIANTS[variant])
    for length in (1, 7, 63, 130):
        check_paths_agree(mixer, length, f"retnet {variant}")
    check_paths_agree(mixer.double(), 33, f"retnet {variant} float64", dtype=torch.float64)
    mixer.float()
    for first, second in ((1, 6), (13, 9), (63, 2)):
        check_prefill_then_continue(mixer, first, second, f"retnet {variant}")
    check_causal(mixer, f"retnet {variant}")
    check_gradients(mixer, f"retnet {variant}")
    check_state_bytes(mixer, f"retnet {variant}")


def test_parallel_and_chunkwise_are_the_same_function():
    chunkwise = build_mixer("retnet", d_model=128, chunk_size=16)
    parallel = build_mixer("retnet", d_model=128, backend="parallel")
    parallel.load_state_dict(chunkwise.state_dict())
    x = torch.randn(2, 77, 128)
    with torch.no_grad():
        assert_close(chunkwise(x), parallel(x), "retnet chunkwise vs parallel forward")


def multi_scale_retention(mixer, x):
    """Paper section 2.2 written out in float64: per-head RoPE'd q, k, v, retention by its
    definition with γ_h = 1 - 2^(-5-h) and scale K^-1/2, GroupNorm per head, swish gate, W_O."""
    cfg = mixer.config
    heads, key_dim, value_dim = cfg.heads, cfg.key_dim, cfg.value_dim
    batch, length, _ = x.shape
    q = mixer.q_proj(x).view(batch, length, heads, key_dim).transpose(1, 2)
    k = mixer.k_proj(x).view(batch, length, heads, key_dim).transpose(1, 2)
    v = mixer.v_proj(x).view(batch, length, heads, value_dim).transpose(1, 2)
    inv_freq, _ = rope_frequencies(key_dim, cfg.rope_base)
    cos, sin = rope_cos_sin(torch.arange(length), inv_freq.to(x.dtype), x.dtype)  # as in a .double() module
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    n = torch.arange(length, dtype=torch.float64)
    heads_out = []
    for h in range(heads):
        gamma = 1 - 2.0 ** (-5 - h)
        decay = torch.where(n[:, None] >= n[None, :], gamma ** (n[:, None] - n[None, :]), 0.0)
        heads_out.append((q[:, h] @ k[:, h].transpose(1, 2) * key_dim**-0.5 * decay) @ v[:, h])
    y = torch.stack(heads_out, dim=2)  # (B, L, H, V)
    mean = y.mean(-1, keepdim=True)
    var = y.var(-1, unbiased=False, keepdim=True)
    y = ((y - mean) / torch.sqrt(var + cfg.norm_eps)).reshape(batch, length, heads * value_dim)
    y = y * mixer.norm_weight + mixer.norm_bias
    return mixer.out_proj(F.silu(mixer.g_proj(x)) * y)


def test_layer_matches_multi_scale_retention_definition():
    mixer = build_mixer("retnet", d_model=96, n_heads=3).double()
    with torch.no_grad():
        mixer.norm_weight.normal_()
        mixer.norm_bias.normal_()
        x = torch.randn(2, 41, 96, dtype=torch.float64)
        assert_close(mixer(x), multi_scale_retention(mixer, x), "retnet forward vs MSR definition")


def test_groupnorm_cancels_per_head_per_token_scaling():
    """Why the paper's row normalisations are left out: a positive scalar per (head, token) on the
    retention output (what they are) changes the layer output only through GroupNorm's eps."""
    mixer = build_mixer("retnet", d_model=128).double()
    heads_out = torch.randn(2, 2, 9, 128, dtype=torch.float64)
    gate = torch.randn(2, 9, 256, dtype=torch.float64)
    scales = torch.rand(2, 2, 9, 1, dtype=torch.float64) * 10 + 1
    with torch.no_grad():
        y, y_scaled = mixer._output(heads_out, gate), mixer._output(heads_out * scales, gate)
    assert_close(y_scaled, y, "GroupNorm output after per-(head, token) rescaling", tolerance=1e-4)


def test_defaults_and_state_size():
    mixer = build_mixer("retnet", d_model=256)
    cfg = mixer.config
    assert (cfg.heads, cfg.key_dim, cfg.value_dim, cfg.backend) == (4, 64, 128, "auto")
    assert mixer.state_nbytes(3, 10_000) == 3 * 4 * 64 * 128 * 4
    assert mixer.state_nbytes(1, 1, torch.float64) == 4 * 64 * 128 * 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=64, n_heads=3), "not divisible by n_heads=3"),
        (dict(d_model=66, n_heads=6), "even head dim"),
        (dict(d_model=64, decay=(0.9, 0.8)), "one γ per head"),
        (dict(d_model=64, decay=(1.0,)), r"must lie in \(0, 1\)"),
        (dict(d_model=64, backend="recurrent"), "'backend' for mixer 'retnet' must be 'auto' \\| 'chunked'"),
        (dict(d_model=0), "d_model must be >= 1"),
        (dict(d_model=64, n_heads=0), "n_heads must be >= 1"),
        (dict(d_model=64, chunk_size=0), "chunk_size must be >= 1"),
        (dict(d_model=64, value_factor=0), "value_factor must be >= 1"),
        (dict(d_model=64, heads=2), "unknown config key 'heads'"),
    ],
    ids=["heads", "odd-head-dim", "decay-count", "decay-range", "backend", "d_model", "n_heads", "chunk",
         "value-factor", "unknown-key"],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_mixer("retnet", **overrides)


def test_old_mode_key_and_value_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning) as caught:
        mixer = build_mixer("retnet", d_model=64, mode="chunkwise")
    messages = " / ".join(str(w.message) for w in caught)
    assert "config key 'mode' for mixer 'retnet' is deprecated" in messages and "use 'backend'" in messages
    assert "backend='chunkwise' for mixer 'retnet' is deprecated" in messages and "use backend='chunked'" in messages
    assert mixer.config.backend == "chunked"
