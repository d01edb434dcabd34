"""Checks of the mixer contract, reusable for any mixer instance (variants, modes, dtypes).

tests/test_contract.py applies them to every registered mixer with its default config; a mixer's
own tests apply them to its variants (another scan, mode, window, or a distilled filter).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seqarch.mixers.base import MixerState
from tests.tolerance import assert_close

BATCH = 2


@dataclasses.dataclass
class ForeignState(MixerState):
    """A state no built-in mixer makes: stands for another mixer's state."""

    hidden: torch.Tensor


def with_zero_projections_drawn(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every all-zero Linear weight (a reference that starts its blocks as the identity zeroes their output
    projections: RWKV-LM) at a trained scale, N(0, 1 / fan_in), so a test of the paths sees the blocks compute."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in module.modules():
            if isinstance(linear, torch.nn.Linear) and torch.count_nonzero(linear.weight) == 0:
                draw = torch.randn(linear.weight.shape, generator=generator, dtype=torch.float64)
                linear.weight.copy_(draw * linear.in_features**-0.5)
    return module


def run_steps(module, x: torch.Tensor, state):
    """Feed x (B, L, D) one token at a time through module.step; returns (y (B, L, D), state)."""
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = module.step(x[:, t], state)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1), state


def check_paths_agree(mixer, length: int, name: str, dtype=torch.float32) -> None:
    """forward(x) == prefill(x, init_state)[0] == stack(step(x_t))."""
    x = torch.randn(BATCH, length, mixer.d_model, dtype=dtype)
    with torch.no_grad():
        y = mixer(x)
        y_prefill, _ = mixer.prefill(x, mixer.init_state(BATCH, dtype=dtype))
        y_step, _ = run_steps(mixer, x, mixer.init_state(BATCH, dtype=dtype))
    assert y.shape == x.shape, f"{name}: output shape {tuple(y.shape)}"
    assert_close(y_prefill, y, f"{name} prefill vs forward (L={length})")
    assert_close(y_step, y, f"{name} step vs forward (L={length})")


def check_prefill_then_continue(mixer, first: int, second: int, name: str, dtype=torch.float32) -> None:
    """prefill(a) then step(b), and prefill(a) then prefill(b), equal forward(a + b)."""
    x = torch.randn(BATCH, first + second, mixer.d_model, dtype=dtype)
    with torch.no_grad():
        y = mixer(x)
        y_a, state = mixer.prefill(x[:, :first], mixer.init_state(BATCH, dtype=dtype))
        y_b, _ = run_steps(mixer, x[:, first:], state)
        y_c, _ = mixer.prefill(x[:, first:], state)
    assert_close(torch.cat([y_a, y_b], dim=1), y, f"{name} prefill({first}) then step({second})")
    assert_close(torch.cat([y_a, y_c], dim=1), y, f"{name} prefill({first}) then prefill({second})")


def check_causal(mixer, name: str, length: int = 40, t: int = 17) -> None:
    """Outputs up to t do not change when inputs after t change (and later outputs do)."""
    x = torch.randn(BATCH, length, mixer.d_model)
    x_changed = x.clone()
    x_changed[:, t + 1 :] = torch.randn_like(x_changed[:, t + 1 :]) * 3
    with torch.no_grad():
        y, y_changed = mixer(x), mixer(x_changed)
    assert_close(y_changed[:, : t + 1], y[:, : t + 1], f"{name} outputs up to t after changing inputs past t")
    assert (y_changed[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3, f"{name}: perturbation did not reach the future"


def check_gradients(mixer, name: str, length: int = 23) -> None:
    """Every parameter gets a finite, non-zero gradient."""
    x = torch.randn(BATCH, length, mixer.d_model, requires_grad=True)
    (mixer(x) * torch.randn(BATCH, length, mixer.d_model)).sum().backward()
    for param_name, param in mixer.named_parameters():
        assert param.grad is not None, f"{name}.{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{param_name} has a non-finite gradient"
        assert param.grad.abs().max() > 0, f"{name}.{param_name} has an all-zero gradient"
    assert x.grad is not None and x.grad.abs().max() > 0


def check_state_bytes(mixer, name: str, lengths=(7, 63)) -> None:
    """state.nbytes == state_nbytes(B, L); constant in L unless the state grows with length."""
    sizes = {}
    with torch.no_grad():
        for length in lengths:
            _, state = mixer.prefill(torch.randn(BATCH, length, mixer.d_model), mixer.init_state(BATCH))
            assert state.batch_size == BATCH
            assert state.nbytes == mixer.state_nbytes(BATCH, length), (
                f"{name}: state.nbytes {state.nbytes} != state_nbytes {mixer.state_nbytes(BATCH, length)} at L={length}"
            )
            sizes[length] = state.nbytes
    if mixer.state_grows_with_length:
        assert sizes[lengths[-1]] > sizes[lengths[0]]
    else:
        assert len(set(sizes.values())) == 1, f"{name}: recurrent state grew with L: {sizes}"


def check_state_mismatch_raises(mixer, name: str) -> None:
    """step / prefill refuse, with a ValueError naming the mismatch, a state of another batch size
    and a state of another type (instead of broadcasting it or failing inside torch)."""
    x = torch.randn(BATCH, 3, mixer.d_model)
    with torch.no_grad():
        single = mixer.init_state(1)
        for what, call in (("step", lambda state: mixer.step(x[:, 0], state)),
                           ("prefill", lambda state: mixer.prefill(x, state))):
            with pytest.raises(ValueError, match=f"state holds a batch of 1, the input a batch of {BATCH}"):
                call(single)
            foreign = ForeignState(hidden=torch.zeros(BATCH, 4))
            with pytest.raises(ValueError, match=f"{what} expects a .* \\(from init_state\\), got ForeignState"):
                call(foreign)
            ints = dataclasses.replace(mixer.init_state(BATCH))
            field = next(f.name for f in dataclasses.fields(ints) if isinstance(getattr(ints, f.name), torch.Tensor))
            setattr(ints, field, torch.zeros(getattr(ints, field).shape, dtype=torch.int64))
            with pytest.raises(ValueError, match=f"state field '{field}' must be"):
                call(ints)


def check_empty_sequence_raises(mixer, name: str) -> None:
    """A length-0 sequence is refused with a ValueError by forward and prefill."""
    empty = torch.randn(BATCH, 0, mixer.d_model)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"empty sequence \(L = 0"):
            mixer(empty)
        with pytest.raises(ValueError, match=r"empty sequence \(L = 0"):
            mixer.prefill(empty, mixer.init_state(BATCH))


def check_init_state_follows_parameters(mixer, name: str) -> None:
    """init_state(B) without device / dtype takes the parameters' device and dtype (float64 here;
    complex states follow it as complex128); an explicit dtype wins."""
    mixer = mixer.double()
    for state, real, complex_ in ((mixer.init_state(BATCH), torch.float64, torch.complex128),
                                  (mixer.init_state(BATCH, dtype=torch.float32), torch.float32, torch.complex64)):
        for field in dataclasses.fields(state):
            value = getattr(state, field.name)
            if isinstance(value, torch.Tensor):
                expected = complex_ if value.is_complex() else real
                assert value.dtype == expected, f"{name}: init_state field {field.name} is {value.dtype}"
                assert value.device == next(mixer.parameters()).device
