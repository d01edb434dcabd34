"""RWKV-7: the mixer against an independent transcription of RWKV-LM's per-token time-mix and
channel-mix with copied weights, the parameter names / shapes of RWKV-LM's x070 modules, the value
residual, the config, and the contract on variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_block, build_mixer
from seqarch.mixers.rwkv7 import RWKV7ChannelMixState, RWKV7Config, RWKV7State
from tests.compiled import needs_compiler
from tests.contract_checks import (
    BATCH,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    run_steps,
    with_zero_projections_drawn,
)
from tests.tolerance import assert_close

WIDTH, HEAD = 64, 16


# --- the reference, transcribed -------------------------------------------------------------------------
# From BlinkDL/RWKV-LM, RWKV-v7/rwkv_v7_demo_rnn.py (`time_mixing__`, `channel_mixing__`), batched over a
# leading B, with the "naive version" of the decay from RWKV-v7/rwkv_v7_demo.py / train_temp model.py
# (w = -softplus(-(w0 + tanh(xw w1) w2)) - 0.5, decay = exp(-exp(w))). The state is RWKV-LM's (B, H, V, K).
def reference_time_mixing(layer_id, H, N, x, x_prev, v_first, state, p):
    xx = x_prev - x
    xr, xw, xk, xv, xa, xg = (x + xx * p[f"x_{n}"].view(-1) for n in "rwkvag")
    r = xr @ p["receptance.weight"].T
    w = torch.tanh(xw @ p["w1"]) @ p["w2"]
    k = xk @ p["key.weight"].T
    v = xv @ p["value.weight"].T
    a = torch.sigmoid(p["a0"].view(-1) + (xa @ p["a1"]) @ p["a2"])
    g = torch.sigmoid(xg @ p["g1"]) @ p["g2"]
    kk = k * p["k_k"].view(-1)
    kk = F.normalize(kk.view(-1, H, N), dim=-1, p=2.0).view(-1, H * N)
    k = k * (1 + (a - 1) * p["k_a"].view(-1))
    if layer_id == 0:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(p["v0"].view(-1) + (xv @ p["v1"]) @ p["v2"])
    w = -F.softplus(-(p["w0"].view(-1) + w)) - 0.5
    w = torch.exp(-torch.exp(w))
    vk = v.view(-1, H, N, 1) @ k.view(-1, H, 1, N)
    ab = (-kk).view(-1, H, N, 1) @ (kk * a).view(-1, H, 1, N)
    state = state * w.view(-1, H, 1, N) + state @ ab + vk
    out = state @ r.view(-1, H, N, 1)
    out = F.group_norm(out.view(-1, H * N), num_groups=H, weight=p["ln_x.weight"], bias=p["ln_x.bias"], eps=64e-5)
    bonus = (r * k * p["r_k"].flatten()).view(-1, H, N).sum(dim=-1, keepdim=True) * v.view(-1, H, N)
    out = out + bonus.view(-1, H * N)
    return (out * g) @ p["output.weight"].T, x, state, v_first


def reference_channel_mixing(x, x_prev, p):
    xx = x_prev - x
    k = x + xx * p["x_k"].view(-1)
    k = torch.relu(k @ p["key.weight"].T) ** 2
    return k @ p["value.weight"].T, x


def run_reference(mixer, x, layer_id, v_first=None):
    """The transcription over x (B, L, D), one token at a time, with the mixer's weights."""
    p = {name: t.detach() for name, t in mixer.state_dict().items()}  # identical names: the key mapping is 1:1
    cfg = mixer.config
    batch, length, width = x.shape
    x_prev = torch.zeros(batch, width, dtype=x.dtype)
    state = torch.zeros(batch, cfg.heads, cfg.head_size, cfg.head_size, dtype=x.dtype)
    outputs = []
    for t in range(length):
        y, x_prev, state, _ = reference_time_mixing(layer_id, cfg.heads, cfg.head_size, x[:, t], x_prev,
                                                    None if v_first is None else v_first[:, t], state, p)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def trained_like(mixer, seed=0):
    """Weights at trained scales: the LoRA first factors (zero / tiny at init) and the output projection
    drawn at the scale of their partners, so every path of the time-mix matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            if name in ("w1", "a1", "v1", "g1"):
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * param.shape[0] ** -0.5)
            elif name == "output.weight":
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * param.shape[1] ** -0.5)
            elif name in ("ln_x.weight", "ln_x.bias", "r_k"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return mixer


@pytest.mark.parametrize("backend", ["chunked", "sequential"])
@pytest.mark.parametrize("length", [1, 7, 63])
def test_time_mix_matches_rwkv_lm_first_layer(length, backend):
    mixer = trained_like(build_mixer("rwkv7", d_model=WIDTH, head_dim=HEAD, backend=backend, layer_id=0,
                                     n_layers=4).double())
    x = torch.randn(BATCH, length, WIDTH, dtype=torch.float64)
    expected, state_ref = run_reference(mixer, x, layer_id=0)
    with torch.no_grad():
        y = mixer(x)
        y_prefill, state = mixer.prefill(x, mixer.init_state(BATCH))
        y_step, _ = run_steps(mixer, x, mixer.init_state(BATCH))
    assert_close(y, expected, f"rwkv7 forward vs RWKV-LM (L={length})")
    assert_close(y_prefill, expected, f"rwkv7 prefill vs RWKV-LM (L={length})")
    assert_close(y_step, expected, f"rwkv7 step vs RWKV-LM (L={length})")
    assert_close(state.wkv, state_ref.transpose(-1, -2), "wkv state = RWKV-LM's state transposed")


def test_time_mix_matches_rwkv_lm_later_layer_with_value_residual():
    mixer = trained_like(build_mixer("rwkv7", d_model=WIDTH, head_dim=HEAD, value_residual=True, layer_id=2,
                                     n_layers=4).double())
    x = torch.randn(BATCH, 37, WIDTH, dtype=torch.float64)
    v_first = torch.randn(BATCH, 37, WIDTH, dtype=torch.float64)
    expected, _ = run_reference(mixer, x, layer_id=2, v_first=v_first)
    with torch.no_grad():
        y = mixer(x, v_first=v_first)
        y_a, state = mixer.prefill(x[:, :20], mixer.init_state(BATCH), v_first=v_first[:, :20])
        steps = []
        for t in range(20, 37):
            y_t, state = mixer.step(x[:, t], state, v_first=v_first[:, t])
            steps.append(y_t)
    assert_close(y, expected, "rwkv7 value residual forward vs RWKV-LM")
    assert_close(torch.cat([y_a, torch.stack(steps, dim=1)], dim=1), expected, "rwkv7 value residual prefill+step")
    # Without v_first the residual is the identity: the layer computes what RWKV-LM's first layer does.
    assert_close(mixer(x), run_reference(mixer, x, layer_id=0)[0], "value_residual without v_first")


def test_channel_mix_matches_rwkv_lm():
    mix = build_mixer("rwkv7", d_model=WIDTH, layer_id=1, n_layers=3).double().own_mlp()
    with torch.no_grad():
        mix.value.weight.normal_(0.0, mix.value.weight.shape[1] ** -0.5)
    x = torch.randn(BATCH, 11, WIDTH, dtype=torch.float64)
    p = {name: t.detach() for name, t in mix.state_dict().items()}
    x_prev, expected = torch.zeros(BATCH, WIDTH, dtype=torch.float64), []
    for t in range(11):
        y, x_prev = reference_channel_mixing(x[:, t], x_prev, p)
        expected.append(y)
    with torch.no_grad():
        y = mix(x)
        y_steps, _ = run_steps(mix, x, mix.init_state(BATCH))
    assert_close(y, torch.stack(expected, dim=1), "channel-mix vs RWKV-LM")
    assert_close(y_steps, y, "channel-mix steps vs forward")
    check_gradients(mix.float(), "rwkv7 channel-mix")


# --- names, shapes and initialisation as RWKV-LM's ------------------------------------------------------
def rwkv_lm_time_mix_shapes(C, H, N, decay, aaa, mv, gate, value_residual):
    """Parameter shapes of RWKV_Tmix_x070 (RWKV-v7/train_temp/src/model.py), transcribed."""
    shapes = {f"x_{n}": (1, 1, C) for n in "rwkvag"}
    shapes.update({"w0": (1, 1, C), "w1": (C, decay), "w2": (decay, C), "a0": (1, 1, C), "a1": (C, aaa),
                   "a2": (aaa, C), "g1": (C, gate), "g2": (gate, C), "k_k": (1, 1, C), "k_a": (1, 1, C),
                   "r_k": (H, N), "receptance.weight": (C, C), "key.weight": (C, C), "value.weight": (C, C),
                   "output.weight": (C, C), "ln_x.weight": (C,), "ln_x.bias": (C,)})
    if value_residual:
        shapes.update({"v0": (1, 1, C), "v1": (C, mv), "v2": (mv, C)})
    return shapes


@pytest.mark.parametrize("value_residual", [False, True])
def test_state_dict_keys_and_shapes_are_rwkv_lm_x070(value_residual):
    # The 0.1B model (rwkv_v7_demo.py): C = 768, head 64, D_DECAY_LORA 64, D_AAA_LORA 64, D_MV_LORA 32,
    # D_GATE_LORA 128, dim_ffn 4 C. Our ranks come from RWKV-LM's formulas, so they must land on these.
    mixer = build_mixer("rwkv7", d_model=768, value_residual=value_residual, layer_id=3, n_layers=12)
    ours = {name: tuple(t.shape) for name, t in mixer.state_dict().items()}
    assert ours == rwkv_lm_time_mix_shapes(768, 12, 64, 64, 64, 32, 128, value_residual)
    ffn = {name: tuple(t.shape) for name, t in mixer.own_mlp().state_dict().items()}
    assert ffn == {"x_k": (1, 1, 768), "key.weight": (3072, 768), "value.weight": (768, 3072)}


def rwkv_lm_x070_init(layer_id: int, n_layer: int, C: int, N: int) -> dict[str, torch.Tensor]:
    """RWKV-LM's x070 initialisation of the deterministic parameters of block `layer_id` of `n_layer`, transcribed
    channel by channel in float32 from BlinkDL/RWKV-LM RWKV-v7/train_temp/src/model.py: RWKV_Tmix_x070 (x_*, w0,
    a0, v0, k_k, k_a, r_k), RWKV_CMix_x070 (x_k, key "ffn.x_k") and RWKV.generate_init_weight (ln_x.weight).
    Shapes are RWKV-LM's."""
    ratio_0_to_1 = layer_id / (n_layer - 1)
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    ddd = torch.tensor([[[i / C for i in range(C)]]])
    linear = torch.tensor([n / (C - 1) - 0.5 for n in range(C)])
    zigzag = torch.tensor([((n % N) - (N - 1) / 2) / ((N - 1) / 2) for n in range(C)])
    zigzag = zigzag * zigzag.abs()
    www = torch.tensor([-6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1**0.3) for n in range(C)])
    lerps = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
    return {
        **{f"x_{name}": 1.0 - torch.pow(ddd, factor * ratio_1_to_almost0) for name, factor in lerps.items()},
        "w0": (www + 0.5 + zigzag * 2.5).reshape(1, 1, C),
        "a0": (torch.zeros(C) - 0.19 + zigzag * 0.3 + linear * 0.4).reshape(1, 1, C),
        "v0": (torch.zeros(C) + 0.73 - linear * 0.4).reshape(1, 1, C),
        "k_k": (torch.zeros(C) + 0.71 - linear * 0.1).reshape(1, 1, C),
        "k_a": torch.zeros(1, 1, C) + 1.02,
        "r_k": torch.zeros(C // N, N) - 0.04,
        "ln_x.weight": torch.ones(C) * ((1 + layer_id) / n_layer) ** 0.7,
        "ffn.x_k": 1.0 - torch.pow(ddd, ratio_1_to_almost0**4),
    }


@pytest.mark.parametrize("n_layers", [3, 6])
def test_each_layer_of_a_model_starts_as_rwkv_lm_x070(n_layers):
    """First, middle and last layer of an n-layer SeqLM against RWKV-LM's formulas for that layer. RWKV-LM's
    first layer also holds v0 (unused); ours has none (value_residual=False)."""
    from seqarch.models.lm import SeqLM

    model = SeqLM(50, d_model=WIDTH, n_layers=n_layers, mixer="rwkv7", head_dim=HEAD)
    for layer_id in (0, n_layers // 2, n_layers - 1):
        block = model.layers[layer_id]
        ours = {**dict(block.mixer.named_parameters()), **{f"ffn.{n}": p for n, p in block.mlp.named_parameters()}}
        assert ("v0" in ours) == (layer_id > 0)
        for name, expected in rwkv_lm_x070_init(layer_id, n_layers, WIDTH, HEAD).items():
            if name in ours:
                assert_close(ours[name].detach(), expected, f"layer {layer_id} of {n_layers}: {name}")


def test_initialisation_follows_rwkv_lm():
    """Spot values of RWKV-LM's init formulas (layer 0 of 12, C = 128, N = 64), evaluated by hand."""
    mixer = build_mixer("rwkv7", d_model=128, layer_id=0, n_layers=12)
    C, N = 128, 64
    # www[n] = -6 + 6 (n / (C-1))^(1 + 0); zigzag[0] = -1 * |-1| = -1; w0 = www + 0.5 + 2.5 zigzag
    assert mixer.w0[0, 0, 0].item() == pytest.approx(-6 + 0.5 - 2.5)
    assert mixer.w0[0, 0, C - 1].item() == pytest.approx(0 + 0.5 + 2.5 * 1.0)  # zigzag[127] = +1
    # a0 = -0.19 + 0.3 zigzag + 0.4 linear, linear[0] = -0.5
    assert mixer.a0[0, 0, 0].item() == pytest.approx(-0.19 - 0.3 - 0.2)
    # x_r = 1 - (i / C)^(0.2 * 1) at i = 64
    assert mixer.x_r[0, 0, 64].item() == pytest.approx(1 - 0.5**0.2)
    assert mixer.k_k[0, 0, 0].item() == pytest.approx(0.71 + 0.05)
    assert torch.all(mixer.k_a == 1.02) and torch.all(mixer.r_k == -0.04)
    assert mixer.receptance.weight.abs().max() <= 0.5 / C**0.5
    assert mixer.key.weight.abs().max() <= 0.05 / C**0.5
    assert mixer.r_k.shape == (C // N, N)
    # the first factors: small random, the second: orthogonal with gain 0.1 (rows of w2 orthogonal)
    gram = mixer.w2 @ mixer.w2.T
    assert_close(gram, 0.01 * torch.eye(gram.shape[0]), "w2 w2^T", tolerance=1e-4)


# --- config, errors, contract on variants ---------------------------------------------------------------
def test_heads_derive_from_one_field():
    assert RWKV7Config(d_model=256).heads == 4 and RWKV7Config(d_model=256).head_size == 64
    assert RWKV7Config(d_model=256, n_heads=8).head_size == 32
    assert RWKV7Config(d_model=256, head_dim=16).heads == 16
    with pytest.raises(ValueError, match="n_heads"):
        RWKV7Config(d_model=256, n_heads=3, head_dim=64)
    with pytest.raises(ValueError, match="divisible"):
        RWKV7Config(d_model=100, head_dim=64)
    with pytest.raises(ValueError, match="backend"):
        build_mixer("rwkv7", d_model=64, backend="parallel")


def test_states_of_another_type_or_batch_are_refused():
    mixer = build_mixer("rwkv7", d_model=WIDTH)
    x = torch.randn(BATCH, 3, WIDTH)
    with pytest.raises(ValueError, match="RWKV7State"):
        mixer.prefill(x, RWKV7ChannelMixState(shift=torch.zeros(BATCH, WIDTH)))
    with pytest.raises(ValueError, match="batch of"):
        mixer.step(x[:, 0], mixer.init_state(BATCH + 1))
    with pytest.raises(ValueError, match="value_residual=False"):
        mixer(x, v_first=x)
    state = mixer.init_state(1)
    assert isinstance(state, RWKV7State) and state.wkv.dtype == torch.float32
    assert mixer.double().init_state(1).wkv.dtype == torch.float64


def test_sequential_backend_equals_chunked_with_gradients():
    chunked = build_mixer("rwkv7", d_model=WIDTH, head_dim=HEAD).double()
    trained_like(chunked)
    sequential = build_mixer("rwkv7", d_model=WIDTH, head_dim=HEAD, backend="sequential").double()
    sequential.load_state_dict(chunked.state_dict())
    x = torch.randn(BATCH, 45, WIDTH, dtype=torch.float64)
    grad_out = torch.randn(BATCH, 45, WIDTH, dtype=torch.float64)
    for module in (chunked, sequential):
        (module(x) * grad_out).sum().backward()
    for (name, param), param_ref in zip(chunked.named_parameters(), sequential.parameters(), strict=True):
        assert_close(param.grad, param_ref.grad, f"chunked vs sequential d{name}")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_compiled_backend_equals_chunked_with_gradients(dtype):
    """The mixer on the C++ kernel against the mixer on the chunked form, same weights: output and the
    gradients of every parameter and of the input, at odd lengths that cross the checkpoint interval."""
    chunked = trained_like(build_mixer("rwkv7", d_model=WIDTH, head_dim=HEAD, value_residual=True, layer_id=1,
                                       n_layers=2, chunk_size=16, subchunk_size=8)).to(dtype)
    compiled = build_mixer("rwkv7", d_model=WIDTH, head_dim=HEAD, value_residual=True, layer_id=1, n_layers=2,
                           backend="compiled", chunk_size=16, subchunk_size=8).to(dtype)
    compiled.load_state_dict(chunked.state_dict())
    generator = torch.Generator().manual_seed(5)
    for length in (1, 7, 37):
        x = torch.randn(BATCH, length, WIDTH, generator=generator, dtype=dtype)
        v_first = torch.randn(BATCH, length, WIDTH, generator=generator, dtype=dtype)
        grad_out = torch.randn(BATCH, length, WIDTH, generator=generator, dtype=dtype)
        results = []
        for module in (compiled, chunked):
            module.zero_grad()
            inputs = [x.clone().requires_grad_(True), v_first.clone().requires_grad_(True)]
            y = module(*inputs)
            (y * grad_out).sum().backward()
            param_grads = {name: p.grad.clone() for name, p in module.named_parameters()}
            results.append((y, [t.grad for t in inputs], param_grads))
        (y, input_grads, grads), (y_ref, input_grads_ref, grads_ref) = results
        assert_close(y, y_ref, f"compiled vs chunked L={length} output")
        for name, grad, grad_ref in zip(("x", "v_first"), input_grads, input_grads_ref, strict=True):
            assert_close(grad, grad_ref, f"compiled vs chunked L={length} d{name}")
        for name, grad in grads.items():
            assert_close(grad, grads_ref[name], f"compiled vs chunked L={length} d{name}")


@pytest.mark.parametrize("overrides", [{"value_residual": True, "layer_id": 1, "n_layers": 2},
                                       {"n_heads": 2, "chunk_size": 16, "subchunk_size": 4}],
                         ids=["value_residual", "c16_e4"])
def test_contract_on_variants(overrides):
    mixer = build_mixer("rwkv7", d_model=WIDTH, **overrides)
    check_paths_agree(mixer, 41, "rwkv7 variant")
    check_prefill_then_continue(mixer, 19, 5, "rwkv7 variant")


def test_block_uses_the_channel_mix():
    block = build_block("rwkv7", d_model=WIDTH)
    assert type(block.mlp).__name__ == "RWKV7ChannelMix"
    assert block.state_nbytes(BATCH, 10) == block.init_state(BATCH).nbytes


# --- the whole model: v_first threaded through the stack --------------------------------------------------
def reference_model(model, tokens):
    """RWKV-LM's whole-model forward (RWKV-v7/rwkv_v7_demo.py, `RWKV.forward` and `Block.forward`), one token
    at a time through the per-token time-mix and channel-mix above, with the SeqLM's weights. Block 0's value
    is v_first; every later block mixes towards it. seqarch's documented deviation in the norms is kept: its
    RMSNorms stand where RWKV-LM has LayerNorms (ln1, ln2, ln_out), and there is no ln0."""
    def rms(x, norm):
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)

    params = [{name: t.detach() for name, t in layer.mixer.state_dict().items()} for layer in model.layers]
    ffn = [{name: t.detach() for name, t in layer.mlp.state_dict().items()} for layer in model.layers]
    cfg = model.layers[0].mixer.config
    batch, length = tokens.shape
    x_all = model.embedding.weight.detach()[tokens]
    zeros = torch.zeros(batch, x_all.shape[-1], dtype=x_all.dtype)
    att_prev = [zeros] * len(model.layers)
    ffn_prev = [zeros] * len(model.layers)
    states = [torch.zeros(batch, cfg.heads, cfg.head_size, cfg.head_size, dtype=x_all.dtype)] * len(model.layers)
    logits = []
    for t in range(length):
        x, v_first = x_all[:, t], None
        for i, layer in enumerate(model.layers):
            xx, att_prev[i], states[i], v_first = reference_time_mixing(i, cfg.heads, cfg.head_size,
                                                                        rms(x, layer.norm_mixer), att_prev[i],
                                                                        v_first, states[i], params[i])
            x = x + xx
            xx, ffn_prev[i] = reference_channel_mixing(rms(x, layer.norm_mlp), ffn_prev[i], ffn[i])
            x = x + xx
        logits.append(rms(x, model.norm) @ model.head.weight.detach().T)
    return torch.stack(logits, dim=1)


def trained_like_model(model, seed=1):
    for index, layer in enumerate(model.layers):
        trained_like(layer.mixer, seed=seed + index)
        if layer.mixer.config.value_residual:  # v0 / v1 at trained scale, so the gate is far from constant
            generator = torch.Generator().manual_seed(100 + index)
            with torch.no_grad():
                layer.mixer.v0.add_(torch.randn(layer.mixer.v0.shape, generator=generator, dtype=torch.float64))
        with torch.no_grad():
            layer.mlp.value.weight.normal_(0.0, layer.mlp.value.weight.shape[1] ** -0.5)
    return model


@pytest.mark.parametrize("n_layers", [2, 3])
def test_seqlm_threads_v_first_as_rwkv_lm(n_layers):
    from seqarch.models.lm import SeqLM

    model = SeqLM(vocab_size=50, d_model=WIDTH, n_layers=n_layers, mixer="rwkv7", head_dim=HEAD,
                  backend="chunked").double()
    assert [layer.mixer.config.value_residual for layer in model.layers] == [False] + [True] * (n_layers - 1)
    trained_like_model(model)
    tokens = torch.randint(0, 50, (BATCH, 23), generator=torch.Generator().manual_seed(3))
    expected = reference_model(model, tokens)
    with torch.no_grad():
        logits = model(tokens)
        prefill, state = model.prefill(tokens[:, :9], model.init_state(BATCH))
        steps = [prefill]
        for t in range(9, 23):
            step, state = model.step(tokens[:, t], state)
            steps.append(step.unsqueeze(1))
    assert_close(logits, expected, f"SeqLM rwkv7 x{n_layers} forward vs RWKV-LM's model")
    assert_close(torch.cat(steps, dim=1), expected, f"SeqLM rwkv7 x{n_layers} prefill + steps vs RWKV-LM's model")
    # The residual matters: a model whose later layers ignore v_first computes something else.
    plain = SeqLM(vocab_size=50, d_model=WIDTH, n_layers=n_layers, mixer="rwkv7", head_dim=HEAD,
                  backend="chunked").double()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in plain.layers[1:]:
            layer.mixer.v0.fill_(-30.0)  # sigmoid(-30) ~ 1e-13: no residual
        assert (plain(tokens) - logits).abs().max() > 1e-3


def test_seqlm_v_first_forward_prefill_steps_agree_with_gradients():
    """float32, the default backend, a hybrid stack (another mixer between the rwkv7 layers passes the context by),
    and a config that turns the residual off keeps every layer on its own value."""
    from seqarch.models.lm import SeqLM

    model = SeqLM(vocab_size=40, d_model=WIDTH, n_layers=3, mixer=["rwkv7", "attention", "rwkv7"],
                  rwkv7={"head_dim": HEAD}, attention={"n_heads": 4})
    with_zero_projections_drawn(model)  # RWKV-LM's zero outputs would hide the rwkv7 layers (and their gradients)
    assert model.layers[2].mixer.config.value_residual
    tokens = torch.randint(0, 40, (BATCH, 63), generator=torch.Generator().manual_seed(4))
    logits = model(tokens)
    with torch.no_grad():
        prefill, state = model.prefill(tokens[:, :30], model.init_state(BATCH))
        steps = [prefill]
        for t in range(30, 63):
            step, state = model.step(tokens[:, t], state)
            steps.append(step.unsqueeze(1))
    assert_close(torch.cat(steps, dim=1), logits.detach(), "hybrid rwkv7 prefill + steps vs forward")
    logits.square().mean().backward()
    first_value = model.layers[0].mixer.value.weight.grad
    assert first_value is not None and first_value.abs().max() > 0
    for name in ("v0", "v1", "v2"):
        assert getattr(model.layers[2].mixer, name).grad.abs().max() > 0, name
    off = SeqLM(vocab_size=40, d_model=WIDTH, n_layers=2, mixer="rwkv7", rwkv7={"value_residual": False})
    assert not any(layer.mixer.config.value_residual for layer in off.layers)


def test_quality_scoring_threads_v_first_as_the_model():
    """The quality sweep runs the blocks itself (head only at scored positions): it must pass v_first on."""
    from seqarch.bench.quality import IGNORE, scored_logits
    from seqarch.models.lm import SeqLM

    model = trained_like_model(SeqLM(vocab_size=30, d_model=WIDTH, n_layers=2, mixer="rwkv7", head_dim=HEAD,
                                     backend="chunked").double())
    inputs = torch.randint(0, 30, (BATCH, 17), generator=torch.Generator().manual_seed(5))
    targets = inputs.clone()
    targets[:, :5] = IGNORE
    with torch.no_grad():
        logits, _ = scored_logits(model, inputs, targets)
        assert_close(logits, model(inputs)[targets != IGNORE], "scored logits vs SeqLM.forward")
