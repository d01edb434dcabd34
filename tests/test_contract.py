"""The mixer contract, checked for every registered mixer (see seqarch/mixers/base.py).

A mixer is covered here the moment it registers: the parameters come from `list_mixers()`, each
built with its default config at width 64. tests/contract_checks.py holds the checks, so a
mixer's own tests can apply them to its variants.
"""

from __future__ import annotations

import pytest
import torch

from seqarch import build_block, build_mixer, list_mixers
from tests.contract_checks import (
    BATCH,
    check_causal,
    check_empty_sequence_raises,
    check_gradients,
    check_init_state_follows_parameters,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
    check_state_mismatch_raises,
    run_steps,
)
from tests.tolerance import assert_close

WIDTH = 64
MIXERS = list_mixers()


def make(name: str, dtype=torch.float32):
    return build_mixer(name, d_model=WIDTH).to(dtype)


@pytest.mark.parametrize("length", [1, 7, 63, 257])
@pytest.mark.parametrize("name", MIXERS)
def test_forward_prefill_step_agree(name, length):
    check_paths_agree(make(name), length, name)


@pytest.mark.parametrize("split", [(1, 6), (13, 9), (63, 2)])
@pytest.mark.parametrize("name", MIXERS)
def test_prefill_then_continue(name, split):
    check_prefill_then_continue(make(name), *split, name)


@pytest.mark.parametrize("name", MIXERS)
def test_float64_paths_agree(name):
    check_paths_agree(make(name, torch.float64), 33, f"{name} float64", dtype=torch.float64)


@pytest.mark.parametrize("name", MIXERS)
def test_causal(name):
    check_causal(make(name), name)


@pytest.mark.parametrize("name", MIXERS)
def test_every_parameter_gets_a_gradient(name):
    check_gradients(make(name), name)


@pytest.mark.parametrize("name", MIXERS)
def test_state_bytes(name):
    check_state_bytes(make(name), name)


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


@pytest.mark.parametrize("name", MIXERS)
def test_state_of_another_batch_size_or_type_is_refused(name):
    check_state_mismatch_raises(make(name), name)


@pytest.mark.parametrize("name", MIXERS)
def test_empty_sequence_is_refused(name):
    check_empty_sequence_raises(make(name), name)


@pytest.mark.parametrize("name", MIXERS)
def test_init_state_takes_the_parameters_dtype(name):
    check_init_state_follows_parameters(make(name), name)


@pytest.mark.parametrize("name", MIXERS)
def test_accounting_is_declared(name):
    """The contract's accounting: flops_per_token and describe_paths answer without running anything."""
    mixer = build_mixer(name, d_model=WIDTH, device="meta")
    flops = mixer.flops_per_token(128)
    assert isinstance(flops, int) and flops > 0
    assert isinstance(mixer.describe_paths("cpu"), str) and mixer.describe_paths("cpu")
