"""RetNet mixer: the contract for both training forms and odd chunkings, the layer against
torchscale's multi-scale retention (its equations written out, and torchscale 0.3.0's own module with
copied weights when it is installed), config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_mixer
from tests.contract_checks import (
    check_causal,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
)
from tests.references import require
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
    """torchscale's parallel form of multi-scale retention written out in float64 by its equations:
    channel pairs (2i, 2i+1) of q, k turned by n θ_i (θ_i = 10000^(-i / (K/2 - 1))), k scaled by K^-1/2,
    decay mask D_nm = γ^(n-m) / sqrt(Σ_m' γ^(n-m')), scores divided by max(|row sum|, 1), per-head RMS
    norm without affine (eps norm_eps), swish gate, W_O."""
    cfg = mixer.config
    heads, key_dim, value_dim = cfg.heads, cfg.key_dim, cfg.value_dim
    batch, length, _ = x.shape
    q = mixer.q_proj(x).view(batch, length, heads, key_dim)
    k = mixer.k_proj(x).view(batch, length, heads, key_dim) * key_dim**-0.5
    v = mixer.v_proj(x).view(batch, length, heads, value_dim)
    n = torch.arange(length, dtype=torch.float64)
    theta = torch.tensor([10000.0 ** (-i / max(key_dim // 2 - 1, 1)) for i in range(key_dim // 2)],
                         dtype=torch.float64)
    angle = n[:, None, None] * theta[None, None, :]  # (L, 1, K/2)

    def turn(t):
        even, odd = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2] = even * angle.cos() - odd * angle.sin()
        out[..., 1::2] = odd * angle.cos() + even * angle.sin()
        return out

    q, k = turn(q), turn(k)
    heads_out = []
    for h in range(heads):
        gamma = 1 - 2.0 ** (-5 - h)
        decay = torch.where(n[:, None] >= n[None, :], gamma ** (n[:, None] - n[None, :]), 0.0)
        decay = decay / decay.sum(-1, keepdim=True).sqrt()
        scores = torch.einsum("bnk,bmk->bnm", q[:, :, h], k[:, :, h]) * decay
        scores = scores / scores.sum(-1, keepdim=True).abs().clamp(min=1)
        heads_out.append(scores @ v[:, :, h])
    y = torch.stack(heads_out, dim=2)  # (B, L, H, V)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    return mixer.out_proj(F.silu(mixer.g_proj(x)) * y.reshape(batch, length, heads * value_dim))


@pytest.mark.parametrize("backend", ["parallel", "chunked"])
def test_layer_matches_torchscale_equations_at_init_scale(backend):
    """At the model's own initialisation (Xavier gain 2^-2.5, so the retention sums are small and the
    RMS norm's eps is not negligible) and with scores large enough to hit the clamp."""
    torch.manual_seed(0)
    mixer = build_mixer("retnet", d_model=96, n_heads=3, backend=backend, chunk_size=8).double()
    x = torch.randn(2, 41, 96, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mixer(x), multi_scale_retention(mixer, x), f"retnet {backend} vs torchscale's equations")
        for proj in (mixer.q_proj, mixer.k_proj):
            proj.weight.mul_(30)  # |row sum| > sqrt(c): the score normalisation acts
        assert_close(mixer(x), multi_scale_retention(mixer, x), f"retnet {backend} vs equations, large scores")


def test_defaults_and_state_size():
    mixer = build_mixer("retnet", d_model=256)
    cfg = mixer.config
    assert (cfg.heads, cfg.key_dim, cfg.value_dim, cfg.backend) == (4, 64, 128, "auto")
    # S (K x V) per head plus the key sum Σ γ^(t-m) k_m (one more value column) for the score normalisation.
    assert mixer.state_nbytes(3, 10_000) == 3 * 4 * 64 * 129 * 4
    assert mixer.state_nbytes(1, 1, torch.float64) == 4 * 64 * 129 * 8


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


# torchscale 0.3.0's MultiScaleRetention imports on CPU without its other dependencies
# (`pip install --no-deps torchscale==0.3.0`); its rotation angles and decay masks come from
# `RetNetRelPos` in torchscale/architecture/retnet.py, which imports fairscale, so they are restated here.


def torchscale_rel_pos(key_dim: int, heads: int, length: int, form: str, chunk_size: int = 0):
    """RetNetRelPos.forward of torchscale 0.3.0 (torchscale/architecture/retnet.py, lines 22-67), in
    float64: ((sin, cos), decay argument) for form "parallel", "chunkwise" or "recurrent" (then `length`
    is the number of tokens seen including the current one)."""
    angle = (1.0 / 10000 ** torch.linspace(0, 1, key_dim // 2, dtype=torch.float64)).repeat_interleave(2)
    log_gamma = torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float64)))
    if form == "recurrent":
        return (torch.sin(angle * (length - 1)), torch.cos(angle * (length - 1))), log_gamma.exp()
    index = torch.arange(length, dtype=torch.float64)
    sin_cos = (torch.sin(index[:, None] * angle), torch.cos(index[:, None] * angle))

    def decay_mask(size):  # (H, size, size): γ^(n-m) below the diagonal, 0 above
        distance = torch.arange(size, dtype=torch.float64)
        distance = distance[:, None] - distance[None, :]
        return torch.exp(distance.clamp(min=0) * log_gamma[:, None, None]) * (distance >= 0)

    if form == "parallel":
        mask = decay_mask(length)
        return sin_cos, mask / mask.sum(-1, keepdim=True).sqrt()
    mask = decay_mask(chunk_size)
    row_root = mask.sum(-1, keepdim=True).sqrt()  # (H, C, 1)
    last_row = mask[:, -1]  # (H, C): γ^(C-1-j)
    value_inner_decay = (last_row / last_row.sum(-1, keepdim=True))[..., None]
    cross_decay = torch.exp(log_gamma * chunk_size)[:, None, None]
    query_inner_decay = torch.exp(log_gamma[:, None] * (torch.arange(chunk_size) + 1))[..., None]
    query_inner_decay = query_inner_decay / (row_root / last_row.sum(-1)[:, None, None])
    return sin_cos, (mask / row_root, cross_decay, query_inner_decay, value_inner_decay)


def torchscale_twin(mixer):
    """torchscale's MultiScaleRetention with the mixer's weights (same parameter names), float64."""
    from types import SimpleNamespace

    retention_module = require("torchscale.component.multiscale_retention")
    cfg = mixer.config
    args = SimpleNamespace(multiway=False, layernorm_eps=cfg.norm_eps)
    twin = retention_module.MultiScaleRetention(args, cfg.d_model, cfg.value_width, cfg.heads).double()
    twin.load_state_dict(mixer.state_dict())
    # torchscale's RMSNorm.forward rounds through float32 whatever the input dtype; its `_norm` is the
    # same formula in the input's dtype, so a float64 comparison can hold to float64 precision.
    twin.group_norm.forward = twin.group_norm._norm
    return twin


def torchscale_forward(twin, x, form, chunk_size=0):
    """Run torchscale's module on x (B, L, D) in `form`; "recurrent" loops over tokens."""
    key_dim, heads = twin.key_dim, twin.num_heads

    def cast(tree):  # the rel_pos tensors in x's dtype
        return tuple(cast(t) for t in tree) if isinstance(tree, tuple) else tree.to(x.dtype)

    if form != "recurrent":
        rel_pos = cast(torchscale_rel_pos(key_dim, heads, x.shape[1], form, chunk_size))
        return twin(x, rel_pos, chunkwise_recurrent=form == "chunkwise")
    incremental_state, outputs = {}, []
    for t in range(x.shape[1]):
        rel_pos = cast(torchscale_rel_pos(key_dim, heads, t + 1, "recurrent"))
        outputs.append(twin(x[:, t : t + 1], rel_pos, incremental_state=incremental_state))
    return torch.cat(outputs, dim=1)


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_initialisation_is_torchscales():
    """Same seed, same parameters: Xavier-uniform gain 2^-2.5 on q, k, v, g and gain 1 on W_O."""
    retention_module = require("torchscale.component.multiscale_retention")
    from types import SimpleNamespace

    torch.manual_seed(3)
    twin = retention_module.MultiScaleRetention(SimpleNamespace(multiway=False, layernorm_eps=1e-6), 128, 256, 2)
    torch.manual_seed(3)
    mixer = build_mixer("retnet", d_model=128, n_heads=2)
    ours, theirs = mixer.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs from torchscale's initialisation"


@pytest.mark.parametrize("backend", ["parallel", "chunked"])
def test_forward_and_gradients_equal_torchscale_parallel_form(backend):
    torch.manual_seed(0)
    mixer = build_mixer("retnet", d_model=64, n_heads=2, backend=backend, chunk_size=16).double()
    twin = torchscale_twin(mixer)
    x = torch.randn(2, 48, 64, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = mixer(x_ours), torchscale_forward(twin, x_theirs, "parallel")
    assert_close(y, y_ref, f"retnet {backend} vs torchscale parallel")
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    assert_close(x_ours.grad, x_theirs.grad, f"retnet {backend} vs torchscale parallel: dx")
    for (name, param), twin_param in zip(mixer.named_parameters(), twin.parameters(), strict=True):
        assert_close(param.grad, twin_param.grad, f"retnet {backend} vs torchscale parallel: d{name}")


def test_float32_forward_equals_torchscale():
    """In float32 torchscale's own RMSNorm (which computes in float32) is used as it is."""
    torch.manual_seed(4)
    mixer = build_mixer("retnet", d_model=128, n_heads=2, chunk_size=16)
    twin = torchscale_twin(mixer.double())
    mixer.float()
    del twin.group_norm.forward  # back to torchscale's RMSNorm.forward
    twin.float()
    x = torch.randn(2, 50, 128)
    with torch.no_grad():
        assert_close(mixer(x), torchscale_forward(twin, x, "parallel"),
                     "retnet float32 vs torchscale parallel")


def test_decoding_equals_torchscale_recurrent_form():
    """torchscale's recurrent form divides by sqrt(c_n) but does not clamp the scores; at the initial
    weight scale |row sum| < sqrt(c_n), so it is the parallel form's function, and so is our step."""
    torch.manual_seed(1)
    mixer = build_mixer("retnet", d_model=64, n_heads=2).double()
    twin = torchscale_twin(mixer)
    x = torch.randn(2, 20, 64, dtype=torch.float64)
    with torch.no_grad():
        state, outputs = mixer.init_state(2, dtype=torch.float64), []
        for t in range(x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            outputs.append(y_t)
        assert_close(torch.stack(outputs, 1), torchscale_forward(twin, x, "recurrent"),
                     "retnet step vs torchscale recurrent")


def test_torchscale_chunkwise_form_is_close_not_equal():
    """torchscale's chunkwise form normalises with each chunk's own decay sums and the data-dependent
    scale of the carried state; with the RMS norm's eps that is a slightly different function from its
    parallel form (which ours computes in every form): 4.7% (max abs error over max abs) here, at the
    initial weight scale, where the retention output's mean square is within a decade or two of eps."""
    torch.manual_seed(2)
    mixer = build_mixer("retnet", d_model=64, n_heads=2, backend="chunked", chunk_size=16).double()
    twin = torchscale_twin(mixer)
    x = torch.randn(2, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        y = mixer(x)
        chunkwise = torchscale_forward(twin, x, "chunkwise", chunk_size=16)
        parallel = torchscale_forward(twin, x, "parallel")
    assert relative_error(chunkwise, parallel) == pytest.approx(relative_error(y, chunkwise), rel=1e-3)
    assert 1e-3 < relative_error(y, chunkwise) < 0.1


def test_old_mode_key_and_value_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning) as caught:
        mixer = build_mixer("retnet", d_model=64, mode="chunkwise")
    messages = " / ".join(str(w.message) for w in caught)
    assert "config key 'mode' for mixer 'retnet' is deprecated" in messages and "use 'backend'" in messages
    assert "backend='chunkwise' for mixer 'retnet' is deprecated" in messages and "use backend='chunked'" in messages
    assert mixer.config.backend == "chunked"
