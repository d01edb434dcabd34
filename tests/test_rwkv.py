"""rwkv6 specifics: the time-mix against the paper's equations, the wkv modes against each other,
the channel-mix under the mixer contract, and the block wiring of the family's state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqarch import SeqLM, build_block, build_mixer
from seqarch.mixers.rwkv import RWKV6ChannelMix
from tests.compiled import compiled
from tests.contract_checks import (
    check_causal,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
    with_zero_projections_drawn,
)
from tests.tolerance import assert_close

WIDTH = 64


def finch_time_mix(mixer, x):
    """Finch time-mix written token by token from the paper's equations (section 4), float64."""
    p = {name: t.detach().double() for name, t in mixer.named_parameters()}
    heads, size = mixer.config.n_heads, mixer.config.head_dim
    batch, length, _ = x.shape
    state = torch.zeros(batch, heads, size, size, dtype=torch.float64)
    previous = torch.zeros(batch, WIDTH, dtype=torch.float64)
    outputs = []
    for t in range(length):
        x_t = x[:, t]
        delta = previous - x_t
        hidden = torch.tanh((x_t + delta * p["time_maa_x"]) @ p["time_maa_w1"]).view(batch, 5, -1)
        mixed = {}
        for index, name in enumerate("wkvrg"):
            lora = hidden[:, index] @ p["time_maa_w2"][index]
            mixed[name] = x_t + delta * (p[f"time_maa_{name}"] + lora)
        r = (mixed["r"] @ p["receptance.weight"].T).view(batch, heads, size)
        k = (mixed["k"] @ p["key.weight"].T).view(batch, heads, size)
        v = (mixed["v"] @ p["value.weight"].T).view(batch, heads, size)
        g = F.silu(mixed["g"] @ p["gate.weight"].T)
        d = p["time_decay"] + torch.tanh(mixed["w"] @ p["time_decay_w1"]) @ p["time_decay_w2"]
        decay = torch.exp(-torch.exp(d)).view(batch, heads, size)
        kv = k[..., :, None] * v[..., None, :]
        out = torch.einsum("bhk,bhkv->bhv", r, state + p["time_faaaa"][..., None] * kv)
        state = decay[..., None] * state + kv
        normed = F.group_norm(out.reshape(batch, WIDTH), heads, p["ln_x.weight"], p["ln_x.bias"],
                              mixer.config.norm_eps)
        outputs.append((normed * g) @ p["output.weight"].T)
        previous = x_t
    return torch.stack(outputs, dim=1)


def rwkv_lm_x060_init(layer_id: int, n_layer: int, n_embd: int, head_size: int) -> dict[str, torch.Tensor]:
    """RWKV-LM's x060 initialisation of block `layer_id` of `n_layer`, transcribed channel by channel in float32
    from BlinkDL/RWKV-LM RWKV-v5/src/model.py: RWKV_Tmix_x060 (time_maa_*, time_decay, time_faaaa), RWKV_CMix_x060
    (its time_maa_k / time_maa_r, keys prefixed "ffn.") and RWKV.generate_init_weight (ln_x.weight); dim_att =
    n_embd. Shapes are RWKV-LM's."""
    ratio_0_to_1 = layer_id / (n_layer - 1)
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    ddd = torch.tensor([[[i / n_embd for i in range(n_embd)]]])
    decay = torch.tensor([-6 + 5 * (n / (n_embd - 1)) ** (0.7 + 1.3 * ratio_0_to_1) for n in range(n_embd)])
    bonus = torch.tensor([ratio_0_to_1 * (1 - n / (n_embd - 1)) + ((n + 1) % 3 - 1) * 0.1 for n in range(n_embd)])
    return {
        "time_maa_x": 1.0 - torch.pow(ddd, ratio_1_to_almost0),
        "time_maa_w": 1.0 - torch.pow(ddd, ratio_1_to_almost0),
        "time_maa_k": 1.0 - torch.pow(ddd, ratio_1_to_almost0),
        "time_maa_v": 1.0 - (torch.pow(ddd, ratio_1_to_almost0) + 0.3 * ratio_0_to_1),
        "time_maa_r": 1.0 - torch.pow(ddd, 0.5 * ratio_1_to_almost0),
        "time_maa_g": 1.0 - torch.pow(ddd, 0.5 * ratio_1_to_almost0),
        "time_decay": decay.reshape(1, 1, n_embd),
        "time_faaaa": bonus.reshape(n_embd // head_size, head_size),
        "ln_x.weight": torch.ones(n_embd) * ((1 + layer_id) / n_layer) ** 0.7,
        "ffn.time_maa_k": 1.0 - torch.pow(ddd, ratio_1_to_almost0**3),
        "ffn.time_maa_r": 1.0 - torch.pow(ddd, ratio_1_to_almost0**3),
    }


def block_parameters(block) -> dict[str, torch.Tensor]:
    """A block's time-mix parameters by name, its channel-mix's prefixed "ffn." (RWKV-LM's `att` / `ffn`)."""
    return {**dict(block.mixer.named_parameters()), **{f"ffn.{name}": p for name, p in block.mlp.named_parameters()}}


def assert_rwkv_lm_init(block, layer_id: int, n_layer: int, where: str) -> None:
    ours = block_parameters(block)
    for name, expected in rwkv_lm_x060_init(layer_id, n_layer, WIDTH, block.mixer.config.head_dim).items():
        assert_close(ours[name].detach().reshape(expected.shape), expected, f"{where}: {name}")


@pytest.mark.parametrize("n_layers", [3, 6])
def test_each_layer_of_a_model_starts_as_rwkv_lm_x060(n_layers):
    """First, middle and last layer of an n-layer SeqLM against RWKV-LM's formulas for that layer (the two
    ratios have different denominators, so a single depth ratio cannot match both)."""
    model = SeqLM(50, d_model=WIDTH, n_layers=n_layers, mixer="rwkv6")
    for layer_id in (0, n_layers // 2, n_layers - 1):
        assert_rwkv_lm_init(model.layers[layer_id], layer_id, n_layers, f"layer {layer_id} of {n_layers}")


def test_hybrid_layers_count_their_place_in_the_whole_stack():
    """In a hybrid, an rwkv6 layer's position is its block index among all blocks (as RWKV-LM counts
    layer_id), and an explicit per-layer setting wins over the one SeqLM fills in."""
    model = SeqLM(50, d_model=WIDTH, n_layers=4, mixer=["attention", "rwkv6", "attention", "rwkv6"])
    assert_rwkv_lm_init(model.layers[1], 1, 4, "hybrid layer 1 of 4")
    assert_rwkv_lm_init(model.layers[3], 3, 4, "hybrid layer 3 of 4")
    pinned = SeqLM(50, d_model=WIDTH, n_layers=4, mixer="rwkv6", layer_overrides={2: {"layer_id": 0, "n_layers": 2}})
    assert_rwkv_lm_init(pinned.layers[2], 0, 2, "layer 2 told it is layer 0 of 2")
    assert_rwkv_lm_init(pinned.layers[3], 3, 4, "layer 3 of 4 beside it")


def test_depth_ratio_is_deprecated_and_builds_the_old_init():
    """An old config's depth_ratio r still builds (and loads) for one release, with the initialisation it gave:
    r for both of RWKV-LM's ratios (ratio_0_to_1 = r, ratio_1_to_almost0 = 1 - r), the channel-mix's mu with
    exponent 1 - r, ln_x weight 1."""
    with pytest.warns(DeprecationWarning, match="'depth_ratio' for mixer 'rwkv6' is deprecated.*'layer_id' and "
                                                "'n_layers'") as caught:
        block = build_block("rwkv6", d_model=WIDTH, depth_ratio=0.25)
    assert caught[0].filename == __file__, "the warning points at the caller's line"
    ours = block_parameters(block)
    profile = 1.0 - (torch.arange(WIDTH) / WIDTH) ** 0.75
    channel = torch.arange(WIDTH) / (WIDTH - 1)
    zigzag = ((torch.arange(WIDTH) + 1) % 3 - 1) * 0.1
    expected = {"time_maa_x": profile, "time_maa_v": profile - 0.3 * 0.25, "ffn.time_maa_k": profile,
                "time_decay": -6 + 5 * channel ** (0.7 + 1.3 * 0.25), "ln_x.weight": torch.ones(WIDTH),
                "time_faaaa": (0.25 * (1 - channel) + zigzag).view(2, 32)}
    for name, value in expected.items():
        assert_close(ours[name].detach(), value, f"depth_ratio=0.25: {name}")


def test_time_mix_matches_the_equations():
    mixer = build_mixer("rwkv6", d_model=WIDTH).double()
    x = torch.randn(2, 37, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mixer(x), finch_time_mix(mixer, x), "rwkv6 forward vs the Finch equations")


def test_channel_mix_matches_the_equations():
    mix = build_mixer("rwkv6", d_model=WIDTH).own_mlp().double()
    x = torch.randn(2, 11, WIDTH, dtype=torch.float64)
    previous = torch.cat([torch.zeros(2, 1, WIDTH, dtype=torch.float64), x[:, :-1]], dim=1)
    delta = previous - x
    key = torch.relu((x + delta * mix.time_maa_k) @ mix.key.weight.T) ** 2
    expected = torch.sigmoid((x + delta * mix.time_maa_r) @ mix.receptance.weight.T) * (key @ mix.value.weight.T)
    with torch.no_grad():
        assert_close(mix(x), expected, "channel-mix vs its equations")


@pytest.mark.parametrize("mode", ["parallel", "sequential", compiled("compiled"), "chunked_odd"])
def test_wkv_backends_agree_forward_and_backward(mode):
    """Every backend against the eager chunked one (compiled: the C++ kernel inside the layer)."""
    overrides = ({"backend": "chunked", "chunk_size": 12, "subchunk_size": 4} if mode == "chunked_odd"
                 else {"backend": mode})
    reference = build_mixer("rwkv6", d_model=WIDTH, backend="chunked").double()
    variant = build_mixer("rwkv6", d_model=WIDTH, **overrides).double()
    variant.load_state_dict(reference.state_dict())
    x = torch.randn(2, 45, WIDTH, dtype=torch.float64)
    grad_out = torch.randn(2, 45, WIDTH, dtype=torch.float64)
    for module in (reference, variant):
        (module(x) * grad_out).sum().backward()
    assert_close(variant(x), reference(x), f"{mode} vs chunked output")
    for (name, param), param_ref in zip(variant.named_parameters(), reference.parameters(), strict=True):
        assert_close(param.grad, param_ref.grad, f"{mode} vs chunked d{name}")


@pytest.mark.parametrize("mode", ["parallel", "sequential", "chunked", "chunked_odd"])
def test_backends_keep_the_contract(mode):
    """The default ("auto": compiled on CPU) runs in tests/test_contract.py; the other backends here."""
    overrides = ({"backend": "chunked", "chunk_size": 12, "subchunk_size": 4} if mode == "chunked_odd"
                 else {"backend": mode})
    mixer = build_mixer("rwkv6", d_model=WIDTH, **overrides)
    check_paths_agree(mixer, 29, f"rwkv6 {mode}")
    check_prefill_then_continue(mixer, 13, 9, f"rwkv6 {mode}")


def test_strong_decays_stay_exact_in_the_mixer():
    """Decays of about e^-20 per step (time_decay = 3) over 300 tokens: chunked equals sequential."""
    mixer = build_mixer("rwkv6", d_model=WIDTH).double()
    with torch.no_grad():
        mixer.time_decay.fill_(3.0)
    sequential = build_mixer("rwkv6", d_model=WIDTH, backend="sequential").double()
    sequential.load_state_dict(mixer.state_dict())
    x = torch.randn(1, 300, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mixer(x), sequential(x), "strong decay: chunked vs sequential")


def channel_mix():
    return build_mixer("rwkv6", d_model=WIDTH).own_mlp()


@pytest.mark.parametrize("length", [1, 7, 63])
def test_channel_mix_paths_agree(length):
    check_paths_agree(channel_mix(), length, "rwkv6 channel-mix")


def test_channel_mix_keeps_the_contract():
    mix = channel_mix()
    check_prefill_then_continue(mix, 13, 9, "rwkv6 channel-mix")
    check_paths_agree(mix.double(), 33, "rwkv6 channel-mix float64", dtype=torch.float64)
    mix = channel_mix()
    check_causal(mix, "rwkv6 channel-mix")
    check_gradients(mix, "rwkv6 channel-mix")
    check_state_bytes(mix, "rwkv6 channel-mix")
    with pytest.raises(ValueError, match=f"D={WIDTH}"):
        mix(torch.randn(2, 5, WIDTH + 1))


def test_block_uses_channel_mix_and_carries_its_state():
    block = build_block("rwkv6", d_model=WIDTH)
    assert isinstance(block.mlp, RWKV6ChannelMix)
    state = block.init_state(2)
    assert state.mixer.shift.shape == (2, WIDTH)
    assert state.mixer.wkv.shape == (2, 2, 32, 32)
    assert state.mlp.shift.shape == (2, WIDTH)
    assert block.state_nbytes(2, 100) == state.nbytes == 4 * 2 * (WIDTH + 2 * 32 * 32 + WIDTH)
    assert not set(map(id, block.mixer.parameters())) & set(map(id, block.mlp.parameters()))


def test_language_model_generates_through_the_recurrent_path():
    """An rwkv6 SeqLM's greedy decode (prefill + step, channel-mix state included) equals the argmax of
    full forwards (the zero-initialised projections drawn, so the blocks are not the identity)."""
    model = with_zero_projections_drawn(SeqLM(37, d_model=32, n_layers=2, mixer="rwkv6")).eval()
    tokens = torch.randint(0, 37, (2, 9))
    expected = tokens
    with torch.no_grad():
        for _ in range(10):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(tokens, 10, temperature=0), expected)


def test_default_heads_and_decay_sign():
    assert build_mixer("rwkv6", d_model=64).config.n_heads == 2
    assert build_mixer("rwkv6", d_model=64).config.head_dim == 32
    assert build_mixer("rwkv6", d_model=768).config.head_dim == 64
    mixer = build_mixer("rwkv6", d_model=WIDTH)
    x = torch.randn(2, 9, WIDTH)
    with torch.no_grad():
        *_, w, _ = mixer._project(x, torch.zeros_like(x))
    assert (w < 0).all(), "log-decay must be negative (decay exp(w) < 1)"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"head_dim": 48}, "not divisible by head_dim=48"),
        ({"head_dim": 0}, "head_dim must be >= 1"),
        ({"backend": "fast"}, "'auto' \\| 'compiled' \\| 'chunked' \\| 'parallel' \\| 'sequential', got 'fast'"),
        ({"chunk_size": 20, "subchunk_size": 8}, "multiple of subchunk_size"),
        ({"depth_ratio": 1.5}, r"depth_ratio must be in \[0, 1\]"),
        ({"layer_id": 3, "n_layers": 3}, "need 0 <= layer_id < n_layers, got layer_id=3, n_layers=3"),
        ({"n_layers": 0}, "need 0 <= layer_id < n_layers"),
        ({"ffn_ratio": 0}, "ffn_ratio must be > 0"),
        ({"chunk_size": "32"}, "must be int"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_mixer("rwkv6", d_model=WIDTH, **overrides)


def test_old_config_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning) as caught:
        mixer = build_mixer("rwkv6", d_model=WIDTH, head_size=16, mode="sequential")
    messages = " / ".join(sorted(str(w.message) for w in caught))
    assert "'head_size' for mixer 'rwkv6' is deprecated" in messages and "use 'head_dim'" in messages
    assert "'mode' for mixer 'rwkv6' is deprecated" in messages and "use 'backend'" in messages
    assert (mixer.config.head_dim, mixer.config.n_heads, mixer.config.backend) == (16, 4, "sequential")
    assert mixer.describe_paths("cpu") == "wkv6 backend=sequential"


def test_step_refuses_a_state_of_another_batch_size_or_mixer():
    """A batch-1 state is not broadcast over a batch of 2 (issue #18 item 8); another mixer's state
    is named, not an AttributeError."""
    mixer = build_mixer("rwkv6", d_model=WIDTH)
    with pytest.raises(ValueError, match="rwkv6.step: the state holds a batch of 1, the input a batch of 2"):
        mixer.step(torch.randn(2, WIDTH), mixer.init_state(1))
    other = build_mixer("retnet", d_model=WIDTH).init_state(2)
    with pytest.raises(ValueError, match="rwkv6.prefill expects a RWKV6State .* got RetNetState"):
        mixer.prefill(torch.randn(2, 3, WIDTH), other)
