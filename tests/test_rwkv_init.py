"""RWKV-6 / RWKV-7 projections after the model init, against RWKV-LM's `generate_init_weight` (RWKV-v5/src/model.py
for x060, RWKV-v7/train_temp/src/model.py for x070; train.py draws it for every model it trains and it replaces
the module's own init of every projection).

Its rule, by parameter name: `.att.output.`, `.ffn.value.`, `.ffn.receptance.` zero; `.att.key.` and `.att.gate.`
orthogonal with gain 0.1; every other projection weight orthogonal with gain 1 (torch's orthogonal_, so rows, or
columns for a tall matrix, are orthonormal times the gain). The table below is that rule written out for
seqarch's module names (time-mix = `mixer`, channel-mix = `mlp`); every Linear of a block must be in it.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from seqarch import SeqLM, build_block, build_mixer
from tests.contract_checks import BATCH, run_steps, with_zero_projections_drawn
from tests.tolerance import assert_close

WIDTH, VOCAB = 64, 50

RWKV_LM_GAINS = {
    "rwkv6": {"mixer.receptance": 1.0, "mixer.key": 0.1, "mixer.value": 1.0, "mixer.gate": 0.1, "mixer.output": 0.0,
              "mlp.key": 1.0, "mlp.receptance": 0.0, "mlp.value": 0.0},
    "rwkv7": {"mixer.receptance": 1.0, "mixer.key": 0.1, "mixer.value": 1.0, "mixer.output": 0.0,
              "mlp.key": 1.0, "mlp.value": 0.0},
}


def assert_follows_rwkv_lm(block, mixer: str, where: str) -> None:
    linears = {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}
    assert set(linears) == set(RWKV_LM_GAINS[mixer]), f"{where}: projections {sorted(linears)}"
    for name, gain in RWKV_LM_GAINS[mixer].items():
        weight = linears[name].weight.detach()
        if gain == 0:
            assert torch.count_nonzero(weight) == 0, f"{where}: {name} is not zero"
            continue
        rows, cols = weight.shape
        gram = weight @ weight.T if rows <= cols else weight.T @ weight  # the orthonormal side
        expected = gain**2 * torch.eye(min(rows, cols), dtype=weight.dtype)
        assert_close(gram, expected, f"{where}: {name} W W^T (gain {gain})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mixer", sorted(RWKV_LM_GAINS))
def test_every_layer_of_a_model_has_rwkv_lm_projections(mixer, dtype):
    model = SeqLM(VOCAB, WIDTH, n_layers=3, mixer=mixer, dtype=dtype)
    for index, layer in enumerate(model.layers):
        assert_follows_rwkv_lm(layer, mixer, f"{mixer} layer {index} of 3 ({dtype})")
    # drawn per layer (not one matrix shared by every layer), and per model
    first, second = (layer.mixer.receptance.weight for layer in model.layers[:2])
    assert (first - second).abs().max() > 0.1


@pytest.mark.parametrize("mixer", sorted(RWKV_LM_GAINS))
def test_a_hybrid_stack_gives_each_mixer_its_own_rule(mixer):
    """RWKV layers take RWKV-LM's rule; the attention layers and their SwiGLU keep the GPT-2 rule, scaled by
    the residual branches of the whole stack (2 per layer here: 4 layers, 8 branches)."""
    model = SeqLM(VOCAB, WIDTH, n_layers=4, mixer=["attention", mixer, "attention", mixer])
    for index in (1, 3):
        assert_follows_rwkv_lm(model.layers[index], mixer, f"hybrid layer {index}")
    attention = model.layers[0]
    assert attention.mixer.out_proj.weight.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert attention.mlp.down.weight.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert attention.mixer.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("mixer", sorted(RWKV_LM_GAINS))
def test_a_block_built_alone_and_a_bfloat16_model_follow_it_too(mixer):
    assert_follows_rwkv_lm(build_block(mixer, d_model=WIDTH), mixer, f"{mixer} build_block")
    model = SeqLM(VOCAB, WIDTH, n_layers=2, mixer=mixer, dtype=torch.bfloat16)
    layer = model.layers[1]
    assert torch.count_nonzero(layer.mixer.output.weight) == 0 and torch.count_nonzero(layer.mlp.value.weight) == 0
    weight = layer.mixer.receptance.weight.float()
    assert_close(weight @ weight.T, torch.eye(WIDTH), f"{mixer} bfloat16 receptance W W^T", tolerance=2e-2)


@pytest.mark.parametrize("mixer", sorted(RWKV_LM_GAINS))
def test_a_mixer_built_alone_keeps_a_non_zero_output(mixer):
    """The rule belongs to the model init: a mixer built alone has an output (the contract suite runs on it)."""
    alone = build_mixer(mixer, d_model=WIDTH)
    assert alone.output.weight.abs().min() > 0 and alone.own_mlp().value.weight.abs().max() > 0
    y = alone(torch.randn(2, 9, WIDTH))
    assert y.abs().max() > 1e-3


# The step (1-based) by which every parameter has had a gradient: the first step reaches only the zero outputs (and
# the embedding, norms, head); rwkv6's channel-mix receptance is zero too and is multiplied by the zero value, so it
# gets its first gradient on the second step and its token-shift mix (time_maa_r) on the third.
EVERY_PARAMETER_LEARNS_BY = {"rwkv6": 3, "rwkv7": 2}


@pytest.mark.parametrize("mixer", sorted(RWKV_LM_GAINS))
def test_each_block_starts_as_the_identity_and_every_parameter_learns_within_steps(mixer):
    """Zero time-mix output and channel-mix value: every block passes its input through unchanged at init. The
    first step's gradient reaches those two projections (and the embedding, norms, head) only; a few optimizer
    steps later every parameter of every block has had a gradient, as in RWKV-LM's training from this init."""
    torch.manual_seed(0)
    model = SeqLM(VOCAB, WIDTH, n_layers=2, mixer=mixer)
    x = torch.randn(2, 13, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        for layer in copy.deepcopy(model).double().layers:
            assert torch.equal(layer(x), x)
    tokens = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first_gradient = {}
    for step in range(1, 4):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        grads = {name: param.grad for name, param in model.named_parameters()}
        if step == 1:
            for layer in range(2):
                assert grads[f"layers.{layer}.mixer.output.weight"].abs().max() > 0
                assert grads[f"layers.{layer}.mlp.value.weight"].abs().max() > 0
                assert grads[f"layers.{layer}.mixer.receptance.weight"].abs().max() == 0  # behind the zero output
        for name, grad in grads.items():
            if name not in first_gradient and grad is not None and grad.abs().max() > 0:
                first_gradient[name] = step
        optimizer.step()
    late = {name: first_gradient.get(name) for name, _ in model.named_parameters()
            if first_gradient.get(name, 99) > EVERY_PARAMETER_LEARNS_BY[mixer]}
    assert not late, f"{mixer}: first gradient only after step {EVERY_PARAMETER_LEARNS_BY[mixer]} for {late}"
    assert max(first_gradient.values()) == EVERY_PARAMETER_LEARNS_BY[mixer]


@pytest.mark.parametrize("mixer", sorted(RWKV_LM_GAINS))
def test_the_rule_survives_pickling_and_a_rebuild(mixer):
    """The tags are plain functions (a model pickles, e.g. for spawned workers) and a rebuilt model draws the rule
    again, not a copy of the old weights."""
    model = SeqLM(VOCAB, WIDTH, n_layers=2, mixer=mixer)
    clone = pickle.loads(pickle.dumps(model))
    assert_close(clone.layers[1].mixer.receptance.weight, model.layers[1].mixer.receptance.weight, "pickled")
    clone.layers[1].init_weights(4)
    assert_follows_rwkv_lm(clone.layers[1], mixer, f"{mixer} re-initialised after unpickling")
    rebuilt = SeqLM.from_config(model.init_kwargs)
    assert_follows_rwkv_lm(rebuilt.layers[0], mixer, f"{mixer} rebuilt")


@pytest.mark.parametrize("mixer", sorted(RWKV_LM_GAINS))
def test_block_paths_agree_once_the_zero_projections_are_drawn(mixer):
    """The contract suite's block check (tests/test_contract.py) sees an identity block for RWKV at init; here
    the same check with the zeroed projections drawn, so the time-mix and channel-mix take part."""
    block = with_zero_projections_drawn(build_block(mixer, d_model=WIDTH))
    x = torch.randn(BATCH, 19, WIDTH)
    with torch.no_grad():
        y = block(x)
        y_a, state = block.prefill(x[:, :8], block.init_state(BATCH))
        y_b, _ = run_steps(block, x[:, 8:], state)
    assert (y - x).abs().max() > 0.1
    assert_close(torch.cat([y_a, y_b], dim=1), y, f"{mixer} block prefill+step vs forward")
