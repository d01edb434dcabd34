"""Dynamic NTK's two modes: "exact" (query t uses the base of length t + 1) and "per_call" (one base per
forward call from its sequence length, as HF transformers' `dynamic_rope_update`), and the op's backends."""

from __future__ import annotations

import pytest
import torch

from seqarch import SeqLM, build_mixer
from seqarch.ops.attention import LogitPositions, attention, repeat_kv, rotate
from seqarch.positional import rope_frequencies
from tests.references import require
from tests.tolerance import assert_close

WIDTH, HEADS, KV_HEADS, HEAD_DIM, TRAINED = 64, 4, 2, 16, 16
DYNAMIC = {"rope_scaling": "dynamic", "rope_factor": 4.0, "max_position": TRAINED}


def make(dtype=torch.float64, **config):
    torch.manual_seed(0)
    return build_mixer("attention", d_model=WIDTH, n_heads=HEADS, n_kv_heads=KV_HEADS, **config).to(dtype).eval()


def test_per_call_uses_the_base_of_the_call_length_for_every_position():
    """per_call forward over L tokens = plain causal attention with RoPE at the dynamic base of length L."""
    mixer = make(**DYNAMIC, dynamic_ntk_mode="per_call")
    for length in (7, TRAINED, 41):
        x = torch.randn(2, length, WIDTH, dtype=torch.float64)
        q, k, v = mixer._project(x)
        scaling = {"type": "dynamic", "factor": 4.0, "original_max_position": TRAINED}
        inv_freq, _ = rope_frequencies(HEAD_DIM, 10000.0, TRAINED, scaling, seq_len=length)
        positions = torch.arange(length)
        q, k = rotate(q, positions, inv_freq), rotate(k, positions, inv_freq)
        out = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, HEADS), repeat_kv(v, HEADS),
                                                               is_causal=True)
        expected = mixer.out_proj(out.transpose(1, 2).reshape(2, length, WIDTH))
        with torch.no_grad():
            assert_close(mixer(x), expected, f"per_call L={length} vs base(L) attention")


def test_modes_agree_inside_the_trained_length_and_on_the_last_query_beyond_it():
    exact, per_call = make(**DYNAMIC), make(**DYNAMIC, dynamic_ntk_mode="per_call")
    per_call.load_state_dict(exact.state_dict())
    x = torch.randn(2, 37, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        y_exact, y_call = exact(x), per_call(x)
        # a call no longer than the trained length uses the trained base, as exact does there
        assert_close(per_call(x[:, :TRAINED]), y_exact[:, :TRAINED], "per_call vs exact inside the trained length")
        # exact: query t sees every key with base(t + 1), which is what one call over t + 1 tokens uses
        for t in (TRAINED, 24, 36):
            assert_close(per_call(x[:, : t + 1])[:, -1], y_exact[:, t], f"per_call last query vs exact at t={t}")
        assert (y_call[:, :TRAINED] - y_exact[:, :TRAINED]).abs().max() > 1e-6  # a longer call changes early ones


@pytest.mark.parametrize("window", [None, 7])
def test_per_call_forward_equals_prefill_and_its_reference(window):
    mixer = make(**DYNAMIC, dynamic_ntk_mode="per_call", window=window)
    x = torch.randn(2, 29, WIDTH, dtype=torch.float64)
    cotangent = torch.randn_like(x)
    results = []
    for run in (mixer.forward, mixer.forward_ref, lambda t: mixer.prefill(t, mixer.init_state(2))[0]):
        mixer.zero_grad()
        y = run(x)
        (y * cotangent).sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()}))
    for (y, grads), label in zip(results[1:], ("reference", "prefill"), strict=True):
        assert_close(results[0][0], y, f"per_call forward vs {label}")
        for name, grad in grads.items():
            assert_close(results[0][1][name], grad, f"per_call d{name} forward vs {label}")


def test_per_call_steps_inside_the_trained_length_equal_forward():
    mixer = make(torch.float32, **DYNAMIC, dynamic_ntk_mode="per_call")
    x = torch.randn(2, TRAINED, WIDTH)
    with torch.no_grad():
        state, steps = mixer.init_state(2), []
        for t in range(TRAINED):
            y_t, state = mixer.step(x[:, t], state)
            steps.append(y_t)
        assert_close(torch.stack(steps, 1), mixer(x), "per_call steps vs forward inside the trained length")


def test_per_call_dynamic_llama_loads_with_hf_logits(tmp_path):
    transformers = require("transformers")
    require("safetensors")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
                                      rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "llama")
    model = SeqLM.from_hf(tmp_path / "llama")
    assert model.layers[0].mixer.config.dynamic_ntk_mode == "per_call"
    # Increasing lengths: HF keeps the base of the longest call since the last one within the trained length.
    for length in (9, 23, 50):
        x = torch.randint(0, 101, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected, actual = hf_model(x).logits, model(x)
        assert_close(actual, expected, f"SeqLM logits vs HF dynamic NTK at L={length}", tolerance=1e-4)


def test_per_call_rotary_tables_equal_hf_llama_rotary_embedding():
    """cos / sin of HF's LlamaRotaryEmbedding with dynamic scaling at a call of length L are those of
    seqarch's per-call base of length L."""
    transformers = require("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=TRAINED,
                                      rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    for length in (5, 40, 300):
        rotary = LlamaRotaryEmbedding(config)  # fresh: HF remembers the longest call
        positions = torch.arange(length)[None]
        cos, sin = rotary(torch.zeros(1, length, 64), positions)
        mixer = make(torch.float32, **DYNAMIC, dynamic_ntk_mode="per_call")
        inv_freq = mixer._call_positions(length).inv_freq
        angles = positions[0, :, None].float() * inv_freq
        angles = torch.cat([angles, angles], -1)
        assert_close(angles.cos(), cos[0], f"cos at L={length}", tolerance=1e-5)
        assert_close(angles.sin(), sin[0], f"sin at L={length}", tolerance=1e-5)


# --- the op's backends ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"window": 5}, {"positional": "alibi", "window": 6}, {"window": 5, "sinks": 2},
                                     {"positional": "rerope", "rerope_window": 6}, DYNAMIC,
                                     {**DYNAMIC, "dynamic_ntk_mode": "per_call"}])
def test_attention_backends_agree(variant):
    """mixer backends "blocked" and "sequential" (and "fused" where it applies) give the output of "auto"."""
    reference = make(**variant)
    x = torch.randn(2, 27, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)
        for backend in ("blocked", "sequential", "fused"):
            try:
                mixer = make(**variant, backend=backend)
            except ValueError as error:
                assert backend == "fused" and "fused" in str(error)
                continue
            mixer.load_state_dict(reference.state_dict())
            assert_close(mixer(x), expected, f"backend={backend} vs auto for {variant}")
            y_a, state = mixer.prefill(x[:, :11], mixer.init_state(2))
            y_b, _ = mixer.prefill(x[:, 11:], state)
            if "dynamic_ntk_mode" not in variant:  # per_call's second call has its own base
                assert_close(torch.cat([y_a, y_b], 1), expected, f"backend={backend} prefill split for {variant}")


def test_fused_backend_is_refused_where_one_formula_cannot_serve():
    positions = LogitPositions("alibi", slopes=torch.ones(HEADS))
    q = torch.randn(1, HEADS, 3, HEAD_DIM)
    with pytest.raises(ValueError, match="fused"):
        attention(q, q, q, torch.arange(3), torch.arange(3), positions, 0.25, backend="fused")
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, torch.arange(3), torch.arange(3), positions, 0.25, backend="flash")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dynamic_ntk_mode": "hf"}, "dynamic_ntk_mode"),
    ({"backend": "fused", "window": 4}, "fused"),
    ({"backend": "blocked", "knn_top_k": 2}, "knn_top_k"),
])
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_mixer("attention", d_model=WIDTH, **overrides)
