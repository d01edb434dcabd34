"""The mixer contract, checked for every registered mixer (see seqarch/mixers/base.py).

A mixer is covered here the moment it registers: the parameters come from `list_mixers()`.
"""

from __future__ import annotations

import pytest
import torch

from seqarch import build_block, build_mixer, list_mixers
from tests.tolerance import assert_close

WIDTH = 64
BATCH = 2
MIXERS = list_mixers()


def make(name: str, dtype=torch.float32):
    return build_mixer(name, d_model=WIDTH).to(dtype)


def run_steps(module, x: torch.Tensor, state):
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = module.step(x[:, t], state)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("length", [1, 7, 63, 257])
@pytest.mark.parametrize("name", MIXERS)
def test_forward_prefill_step_agree(name, length):
    mixer = make(name)
    x = torch.randn(BATCH, length, WIDTH)
    with torch.no_grad():
        y = mixer(x)
        y_prefill, _ = mixer.prefill(x, mixer.init_state(BATCH))
        y_step, _ = run_steps(mixer, x, mixer.init_state(BATCH))
    assert y.shape == x.shape
    assert_close(y_prefill, y, f"{name} prefill vs forward")
    assert_close(y_step, y, f"{name} step vs forward")


@pytest.mark.parametrize("split", [(1, 6), (13, 9), (63, 2)])
@pytest.mark.parametrize("name", MIXERS)
def test_prefill_then_continue(name, split):
    first, second = split
    mixer = make(name)
    x = torch.randn(BATCH, first + second, WIDTH)
    with torch.no_grad():
        y = mixer(x)
        y_a, state = mixer.prefill(x[:, :first], mixer.init_state(BATCH))
        y_b, _ = run_steps(mixer, x[:, first:], state)
        y_c, _ = mixer.prefill(x[:, first:], state)
    assert_close(torch.cat([y_a, y_b], dim=1), y, f"{name} prefill({first}) then step({second})")
    assert_close(torch.cat([y_a, y_c], dim=1), y, f"{name} prefill({first}) then prefill({second})")


@pytest.mark.parametrize("name", MIXERS)
def test_float64_step_matches_forward(name):
    mixer = make(name, torch.float64)
    x = torch.randn(BATCH, 33, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        y = mixer(x)
        y_step, _ = run_steps(mixer, x, mixer.init_state(BATCH, dtype=torch.float64))
    assert_close(y_step, y, f"{name} float64 step vs forward")


@pytest.mark.parametrize("name", MIXERS)
def test_causal(name):
    mixer = make(name)
    x = torch.randn(BATCH, 40, WIDTH)
    t = 17
    x_changed = x.clone()
    x_changed[:, t + 1 :] = torch.randn_like(x_changed[:, t + 1 :]) * 3
    with torch.no_grad():
        y, y_changed = mixer(x), mixer(x_changed)
    assert_close(y_changed[:, : t + 1], y[:, : t + 1], f"{name} outputs up to t after changing inputs past t")
    assert (y_changed[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3, "perturbation did not reach the future"


@pytest.mark.parametrize("name", MIXERS)
def test_every_parameter_gets_a_gradient(name):
    mixer = make(name)
    x = torch.randn(BATCH, 23, WIDTH, requires_grad=True)
    (mixer(x) * torch.randn(BATCH, 23, WIDTH)).sum().backward()
    for param_name, param in mixer.named_parameters():
        assert param.grad is not None, f"{name}.{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{param_name} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{name}.{param_name} has an all-zero gradient"
    assert x.grad is not None and x.grad.abs().max() > 0


@pytest.mark.parametrize("name", MIXERS)
def test_state_bytes(name):
    mixer = make(name)
    sizes = {}
    with torch.no_grad():
        for length in (7, 63):
            _, state = mixer.prefill(torch.randn(BATCH, length, WIDTH), mixer.init_state(BATCH))
            assert state.batch_size == BATCH
            assert state.nbytes == mixer.state_nbytes(BATCH, length), f"{name}: state_nbytes at L={length}"
            sizes[length] = state.nbytes
    if mixer.state_grows_with_length:
        assert sizes[63] > sizes[7]
    else:
        assert sizes[63] == sizes[7], f"{name}: recurrent state grew with L: {sizes}"


@pytest.mark.parametrize("name", MIXERS)
def test_state_moves_and_casts(name):
    mixer = make(name)
    with torch.no_grad():
        _, state = mixer.prefill(torch.randn(BATCH, 5, WIDTH), mixer.init_state(BATCH))
    cast = state.to("cpu", torch.float64)
    assert cast.batch_size == BATCH
    assert cast.nbytes >= state.nbytes
    mixer64 = make(name, torch.float64)
    mixer64.load_state_dict({k: v.double() for k, v in mixer.state_dict().items()})
    x_t = torch.randn(BATCH, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        y32, _ = mixer.step(x_t.float(), state)
        y64, _ = mixer64.step(x_t, cast)
    assert_close(y64, y32.double(), f"{name} step after state.to(float64)", dtype=torch.float32)


@pytest.mark.parametrize("name", MIXERS)
def test_block_step_matches_forward(name):
    block = build_block(name, d_model=WIDTH)
    x = torch.randn(BATCH, 19, WIDTH)
    with torch.no_grad():
        y = block(x)
        y_a, state = block.prefill(x[:, :8], block.init_state(BATCH))
        y_b, _ = run_steps(block, x[:, 8:], state)
    assert_close(torch.cat([y_a, y_b], dim=1), y, f"{name} block prefill+step vs forward")


@pytest.mark.parametrize("name", MIXERS)
def test_bad_input_shape_is_named(name):
    mixer = make(name)
    with pytest.raises(ValueError, match=f"D={WIDTH}"):
        mixer(torch.randn(BATCH, 5, WIDTH + 1))
