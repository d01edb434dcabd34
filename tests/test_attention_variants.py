"""The attention mixer's long-context variants: each held to the mixer contract and to its definition.

Variants use small trained lengths / windows / chunks so that the test lengths (20 to 45) cross
them: scalings act beyond max_position=16, windows of 5-7 keys, kNN chunks of 8.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqarch import build_mixer
from seqarch.ops.attention import (
    knn_attention,
    knn_attention_ref,
    retained_positions,
    s2_attention,
    s2_attention_ref,
)
from seqarch.positional import apply_rope, dynamic_ntk_inv_freq, rope_cos_sin, rope_frequencies
from tests.contract_checks import (
    BATCH,
    check_causal,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
    run_steps,
)
from tests.tolerance import assert_close

WIDTH, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
VARIANTS = {
    "window": {"window": 5},
    "sinks": {"window": 5, "sinks": 2},
    "sinks-alibi": {"window": 5, "sinks": 2, "positional": "alibi"},
    "alibi": {"positional": "alibi"},
    "alibi-window": {"positional": "alibi", "window": 6},
    "nope-window": {"positional": "none", "window": 6},
    "linear": {"rope_scaling": "linear", "rope_factor": 4.0, "max_position": 16},
    "ntk": {"rope_scaling": "ntk", "rope_factor": 4.0, "max_position": 16},
    "yarn": {"rope_scaling": "yarn", "rope_factor": 4.0, "max_position": 16},
    "dynamic": {"rope_scaling": "dynamic", "rope_factor": 4.0, "max_position": 16},
    "dynamic-window": {"rope_scaling": "dynamic", "rope_factor": 4.0, "max_position": 16, "window": 7},
    "rerope": {"positional": "rerope", "rerope_window": 6},
    "leaky-rerope": {"positional": "rerope", "rerope_window": 6, "rerope_leak": 0.25},
    "knn": {"knn_top_k": 3, "knn_chunk": 8, "knn_memory_size": 12},
    "knn-nope": {"knn_top_k": 3, "knn_chunk": 8, "knn_memory_size": 12, "positional": "none"},
    "s2-eval": {"s2_group": 8},
}
BOUNDED = {"window", "sinks", "sinks-alibi", "alibi-window", "nope-window", "dynamic-window", "knn", "knn-nope"}


def make(name: str, dtype=torch.float32, **extra):
    return build_mixer("attention", d_model=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS, **{**VARIANTS[name], **extra}
                       ).to(dtype).eval()


def make_plain(source, dtype=torch.float64, **config):
    """A default-config mixer (full causal attention) with the weights of `source`."""
    plain = build_mixer("attention", d_model=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS, **config).to(dtype)
    plain.load_state_dict(source.state_dict())
    return plain


# --- the contract, for every variant ----------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_keeps_the_contract(name):
    mixer = make(name)
    for length in (1, 7, 29):
        check_paths_agree(mixer, length, name)
    check_prefill_then_continue(mixer, 13, 9, name)
    check_prefill_then_continue(mixer, 1, 20, name)
    check_causal(mixer, name)
    check_gradients(mixer, name)
    # Lengths past the first fills of every bounded cache (window 7 + sinks, two kNN chunks + memory).
    check_state_bytes(mixer, name, lengths=(39, 63) if name in BOUNDED else (7, 63))
    assert mixer.state_grows_with_length == (name not in BOUNDED)
    check_paths_agree(make(name, torch.float64), 21, f"{name} float64", dtype=torch.float64)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_its_per_query_definition(name):
    """forward (blocked / fused paths) against forward_ref (one query at a time), values and gradients."""
    mixer = make(name, torch.float64)
    x = torch.randn(BATCH, 27, WIDTH, dtype=torch.float64)
    cotangent = torch.randn_like(x)
    grads = []
    for run in (mixer.forward, mixer.forward_ref):
        mixer.zero_grad()
        y = run(x)
        (y * cotangent).sum().backward()
        grads.append({n: p.grad.clone() for n, p in mixer.named_parameters()})
        grads[-1]["y"] = y.detach()
    assert_close(grads[0].pop("y"), grads[1].pop("y"), f"{name} forward vs reference")
    for param, grad in grads[0].items():
        assert_close(grad, grads[1][param], f"{name} d{param} vs reference")


def test_blocked_path_matches_reference_across_blocks(monkeypatch):
    """Blocks of a few queries (the budget shrunk) give the same result as one block."""
    import seqarch.mixers.attention as module

    x = torch.randn(1, 45, WIDTH, dtype=torch.float64)
    for name in ("sinks", "dynamic", "leaky-rerope", "alibi"):
        mixer = make(name, torch.float64)
        with torch.no_grad():
            whole = mixer(x)
            monkeypatch.setattr(module, "_SCORE_BLOCK_ELEMENTS", 400 * HEADS)
            assert mixer._block_size(1, 45, 45) < 45
            blocked = mixer(x)
            monkeypatch.undo()
        assert_close(blocked, whole, f"{name} in small blocks")


# --- window and sinks: the cache equals the masked attention it stands for ------------------------------------
def projections(mixer, x):
    q, k, v = mixer._project(x)
    return q, mixer._repeat_kv(k), mixer._repeat_kv(v)


def test_sliding_window_equals_masked_full_attention():
    window = 5
    mixer = make("window", torch.float64)
    x = torch.randn(BATCH, 23, WIDTH, dtype=torch.float64)
    q, k, v = projections(mixer, x)
    positions = torch.arange(23)
    cos, sin = rope_cos_sin(positions, rope_frequencies(HEAD_DIM)[0], torch.float64)
    scores = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2) / math.sqrt(HEAD_DIM)
    mask = torch.tensor([[0 <= t - s < window for s in range(23)] for t in range(23)])
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    expected = mixer.out_proj(out.transpose(1, 2).reshape(BATCH, 23, WIDTH))
    with torch.no_grad():
        y_step, state = run_steps(mixer, x, mixer.init_state(BATCH, dtype=torch.float64))
    assert_close(mixer(x), expected, "window forward vs masked attention")
    assert_close(y_step, expected, "window decoding vs masked attention")
    assert state.key.shape[2] == window - 1


def streaming_llm_decode(mixer, x, sinks, window):
    """StreamingLLM decoding written out: a list cache, evict the oldest non-sink entry when full,
    rotate keys and the query at their slots 0..n-1 in the cache."""
    q, k, v = projections(mixer, x)
    inv_freq = rope_frequencies(HEAD_DIM)[0]
    cache, outputs = [], []
    for t in range(x.shape[1]):
        cache.append(t)
        if len(cache) > sinks + window:
            del cache[sinks]
        slots = torch.arange(len(cache))
        cos, sin = rope_cos_sin(slots, inv_freq, torch.float64)
        keys = apply_rope(k[:, :, cache], cos, sin)
        query = apply_rope(q[:, :, t : t + 1], cos[-1:], sin[-1:])
        weights = (query @ keys.transpose(-1, -2) / math.sqrt(HEAD_DIM)).softmax(-1)
        outputs.append(weights @ v[:, :, cache])
    out = torch.cat(outputs, dim=2)
    return mixer.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], WIDTH))


def test_attention_sinks_equal_streaming_llm_cache_positions():
    mixer = make("sinks", torch.float64)
    x = torch.randn(BATCH, 29, WIDTH, dtype=torch.float64)
    expected = streaming_llm_decode(mixer, x, sinks=2, window=5)
    with torch.no_grad():
        y_step, _ = run_steps(mixer, x, mixer.init_state(BATCH, dtype=torch.float64))
        assert_close(mixer(x), expected, "sinks forward vs StreamingLLM cache")
    assert_close(y_step, expected, "sinks decoding vs StreamingLLM cache")


def test_sinks_decode_indefinitely_in_bounded_memory():
    mixer = make("sinks")
    state = mixer.init_state(1)
    sizes = set()
    with torch.no_grad():
        for t in range(60):
            y, state = mixer.step(torch.randn(1, WIDTH), state)
            if t >= 10:
                sizes.add(state.nbytes)
    assert torch.isfinite(y).all() and state.position == 60
    assert sizes == {mixer.state_nbytes(1, 60)} == {2 * 1 * KV_HEADS * (2 + 5 - 1) * HEAD_DIM * 4}
    assert mixer.state_nbytes(1, 10**6) == mixer.state_nbytes(1, 60)


def test_window_and_rope_scaling_bytes_follow_the_policy():
    full = build_mixer("attention", d_model=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS)
    assert full.state_nbytes(1, 1000) == 2 * KV_HEADS * 1000 * HEAD_DIM * 4
    assert make("window").state_nbytes(1, 1000) == 2 * KV_HEADS * 4 * HEAD_DIM * 4
    knn = make("knn")  # chunk 8, memory 12: 1003 tokens leave 3 in the chunk and 12 in memory
    assert knn.state_nbytes(1, 1003) == 2 * KV_HEADS * (3 + 12) * HEAD_DIM * 4


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("window", [1, 3, 5])
def test_retained_positions_are_the_sinks_and_the_last_window_minus_one(window, sinks):
    for position in range(12):
        kept = [p for p in range(position) if p < sinks or p >= position - (window - 1)]
        assert retained_positions(position, window, sinks).tolist() == kept


# --- positions inside the mixer ---------------------------------------------------------------------------------
def test_yarn_mixer_is_rope_with_yarn_frequencies_and_temperature():
    mixer = make("yarn", torch.float64)
    inv_freq, mscale = rope_frequencies(HEAD_DIM, 10000.0, 16, {"type": "yarn", "factor": 4.0})
    plain = make_plain(mixer)
    plain.inv_freq = inv_freq.double()
    with torch.no_grad():
        plain.q_proj.weight.mul_(mscale**2)  # q and k each scaled by mscale: logits by mscale^2
    x = torch.randn(BATCH, 41, WIDTH, dtype=torch.float64)
    assert_close(mixer(x), plain(x), "yarn mixer vs rope with yarn frequencies and temperature")


@pytest.mark.parametrize("kind", ["linear", "ntk"])
def test_static_scaling_mixer_is_rope_with_scaled_frequencies(kind):
    mixer = make(kind, torch.float64)
    plain = make_plain(mixer)
    plain.inv_freq = rope_frequencies(HEAD_DIM, 10000.0, 16, {"type": kind, "factor": 4.0})[0].double()
    x = torch.randn(BATCH, 41, WIDTH, dtype=torch.float64)
    assert_close(mixer(x), plain(x), f"{kind} mixer vs rope with scaled frequencies")


def test_dynamic_ntk_output_at_t_is_full_attention_with_the_base_of_length_t_plus_1():
    """As HF recomputes the frequencies per forward without a cache: the last token of a prefix of
    length t + 1 sees every key rotated with the base for t + 1. Our cache keeps keys unrotated, so
    decoding gives exactly that at every step."""
    mixer = make("dynamic", torch.float64)
    x = torch.randn(BATCH, 41, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        y_step, state = run_steps(mixer, x, mixer.init_state(BATCH, dtype=torch.float64))
        for t in (5, 15, 16, 30, 40):
            plain = make_plain(mixer)
            plain.inv_freq = dynamic_ntk_inv_freq(HEAD_DIM, 10000.0, 4.0, 16, torch.tensor([t + 1]))[0].double()
            assert_close(y_step[:, t], plain(x[:, : t + 1])[:, -1], f"dynamic NTK at t={t}")
    plain = make_plain(mixer)
    with torch.no_grad():
        assert_close(mixer(x[:, :16]), plain(x[:, :16]), "dynamic NTK inside the trained length is RoPE")
        assert (mixer(x)[:, 16:] - plain(x)[:, 16:]).abs().max() > 1e-6


def test_rerope_with_a_window_past_the_sequence_is_rope():
    mixer = make("rerope", torch.float64, rerope_window=64)
    x = torch.randn(BATCH, 41, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mixer(x), make_plain(mixer)(x), "ReRoPE with w > L vs RoPE")
        clipped = make("rerope", torch.float64)
        clipped.load_state_dict(mixer.state_dict())
        assert (clipped(x) - mixer(x)).abs().max() > 1e-6


def test_alibi_matches_explicit_bias():
    mixer = make("alibi", torch.float64)
    x = torch.randn(BATCH, 19, WIDTH, dtype=torch.float64)
    q, k, v = projections(mixer, x)
    slopes = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8], dtype=torch.float64)  # 4 heads: 2^(-8h/4)
    distance = torch.arange(19)[:, None] - torch.arange(19)[None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) - slopes[:, None, None] * distance
    out = scores.masked_fill(distance < 0, float("-inf")).softmax(-1) @ v
    expected = mixer.out_proj(out.transpose(1, 2).reshape(BATCH, 19, WIDTH))
    assert_close(mixer(x), expected, "alibi vs explicit bias")


# --- S2-Attn ---------------------------------------------------------------------------------------------------
def test_s2_attention_on_a_hand_checked_example():
    """L = 8, G = 4, 2 heads: head 0 groups {0-3}, {4-7}; head 1 (shifted by 2) {0, 1}, {2-5}, {6, 7}."""
    visible = {0: [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [4], [4, 5], [4, 5, 6], [4, 5, 6, 7]],
               1: [[0], [0, 1], [2], [2, 3], [2, 3, 4], [2, 3, 4, 5], [6], [6, 7]]}
    q, k, v = (torch.randn(1, 2, 8, 3, dtype=torch.float64) for _ in range(3))
    expected = torch.zeros_like(q)
    for head, rows in visible.items():
        for t, keys in enumerate(rows):
            weights = torch.softmax(k[0, head, keys] @ q[0, head, t] * 0.5, dim=0)
            expected[0, head, t] = weights @ v[0, head, keys]
    assert_close(s2_attention_ref(q, k, v, 4, 0.5), expected, "S2-Attn reference vs hand-listed groups")
    assert_close(s2_attention(q, k, v, 4, 0.5), expected, "S2-Attn vs hand-listed groups")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("length", "group"), [(37, 8), (3, 8), (64, 16)])
def test_s2_attention_matches_reference_forward_and_backward(dtype, length, group):
    q, k, v = (torch.randn(2, 4, length, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    cotangent = torch.randn(2, 4, length, 8, dtype=dtype)
    results = []
    for op in (s2_attention, s2_attention_ref):
        out = op(q, k, v, group, 0.3)
        results.append((out, *torch.autograd.grad((out * cotangent).sum(), (q, k, v))))
    for label, fast, ref in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert_close(fast, ref, f"S2-Attn {label} L={length} G={group}")


def test_s2_is_a_training_mode_and_eval_is_full_attention():
    mixer = build_mixer("attention", d_model=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS, s2_group=8).double()
    plain = make_plain(mixer)
    x = torch.randn(BATCH, 37, WIDTH, dtype=torch.float64)
    q, k, v = projections(mixer, x)
    cos, sin = rope_cos_sin(torch.arange(37), mixer.inv_freq, torch.float64)
    expected = s2_attention_ref(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 8, 1 / math.sqrt(HEAD_DIM))
    assert mixer.training
    assert_close(mixer(x), mixer.out_proj(expected.transpose(1, 2).reshape(BATCH, 37, WIDTH)), "S2 train mode")
    check_causal(mixer.float(), "s2 training mode")
    mixer.double().eval()
    with torch.no_grad():
        assert_close(mixer(x), plain(x), "S2 eval mode vs full attention")
    mixer.train()
    assert (mixer(x) - plain(x)).abs().max() > 1e-6


# --- kNN memory -------------------------------------------------------------------------------------------------
def test_knn_memory_covering_the_past_equals_full_attention():
    mixer = make("knn", torch.float64, knn_top_k=64, knn_memory_size=64)
    x = torch.randn(BATCH, 41, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        y_step, _ = run_steps(mixer, x, mixer.init_state(BATCH, dtype=torch.float64))
        expected = make_plain(mixer)(x)
        assert_close(mixer(x), expected, "kNN with the whole past vs full attention")
    assert_close(y_step, expected, "kNN decoding with the whole past vs full attention")


def test_knn_attention_op_matches_its_loop():
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    local_k, local_v = torch.randn(2, 2, 6, 4, dtype=torch.float64), torch.randn(2, 2, 6, 4, dtype=torch.float64)
    memory_k, memory_v = torch.randn(2, 2, 9, 4, dtype=torch.float64), torch.randn(2, 2, 9, 4, dtype=torch.float64)
    allowed = torch.arange(6)[None, :] <= torch.arange(1, 6)[:, None]
    for top_k in (1, 3, 20):
        args = (q, local_k, local_v, allowed, memory_k, memory_v, top_k, 0.5)
        assert_close(knn_attention(*args), knn_attention_ref(*args), f"knn_attention top_k={top_k}")


def test_knn_retrieval_changes_the_output_when_memory_is_truncated():
    x = torch.randn(BATCH, 41, WIDTH, dtype=torch.float64)
    wide = make("knn", torch.float64, knn_top_k=64, knn_memory_size=64)
    narrow = make("knn", torch.float64)
    narrow.load_state_dict(wide.state_dict())
    with torch.no_grad():
        difference = wide(x) - narrow(x)
    assert difference[:, :8].abs().max() < 1e-12  # the first chunk has no memory either way
    assert difference[:, 16:].abs().max() > 1e-6


# --- configuration errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    ({"sinks": 4}, "needs .* a window"),
    ({"positional": "sinusoidal"}, "embedding"),
    ({"positional": "alibi", "rope_scaling": "linear"}, "rope_scaling needs positional='rope'"),
    ({"rope_scaling": "longrope"}, "rope_scaling='longrope'"),
    ({"rope_factor": 0.5, "rope_scaling": "linear"}, "rope_factor"),
    ({"s2_group": 7, "n_heads": 2}, "even number"),
    ({"s2_group": 8, "n_heads": 1}, "odd"),
    ({"window": 4, "knn_top_k": 2}, "cannot be combined"),
    ({"positional": "rerope", "window": 4, "sinks": 1}, "not with ReRoPE"),
    ({"knn_top_k": 2, "positional": "alibi"}, "ranks memory"),
    ({"s2_group": 8, "n_heads": 2, "positional": "alibi"}, "without a bias"),
    ({"window": 0}, "window"),
    ({"rerope_leak": 1.0, "positional": "rerope"}, "rerope_leak"),
])
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_mixer("attention", d_model=WIDTH, **overrides)
