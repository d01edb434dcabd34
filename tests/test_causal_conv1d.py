"""causal_conv1d and causal_conv1d_update: both backends (the compiled kernel and the parallel PyTorch
ops) against the reference loop over taps, forward and backward, odd lengths, with and without history."""

from __future__ import annotations

import pytest
import torch

import seqarch.ops.causal_conv1d as conv_module
from seqarch.ops.causal_conv1d import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from tests.compiled import compiled
from tests.tolerance import assert_close

CONV_BACKENDS = [compiled("compiled"), "parallel"]


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*inputs)
    # randn(shape), not randn_like: the latter fills in memory order, so it would hand a channel-last
    # result a different cotangent than a contiguous one.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype))
    return out, [t.grad for t in inputs if t is not None]


@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("length", [1, 7, 63])
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_causal_conv1d_matches_reference(backend, length, activation, dtype, with_history):
    x = torch.randn(2, 6, length, dtype=dtype)
    weight = torch.randn(6, 4, dtype=dtype)
    bias = torch.randn(6, dtype=dtype)
    history = torch.randn(2, 6, 3, dtype=dtype) if with_history else None
    out, g = grads(lambda a, w, b, h: causal_conv1d(a, w, b, activation, h, backend=backend), x, weight, bias, history)
    out_ref, g_ref = grads(lambda a, w, b, h: causal_conv1d_ref(a, w, b, activation, h), x, weight, bias, history)
    assert_close(out, out_ref, "causal_conv1d output")
    for name, a, b in zip(("dx", "dweight", "dbias", "dinitial_states"), g, g_ref, strict=False):
        assert_close(a, b, f"causal_conv1d {name}")


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_causal_conv1d_channel_last_input_without_bias(backend, width):
    """The mixers pass a (B, D, L) view of a (B, L, D) projection; no bias; other widths."""
    x = torch.randn(2, 37, 10, dtype=torch.float64)[..., :6].transpose(1, 2)  # (B, D, L) view, L = 37
    weight = torch.randn(6, width, dtype=torch.float64)
    history = torch.randn(2, 6, width - 1, dtype=torch.float64)
    out, g = grads(lambda a, w, h: causal_conv1d(a, w, None, "silu", h, backend=backend), x, weight, history)
    out_ref, g_ref = grads(lambda a, w, h: causal_conv1d_ref(a, w, None, "silu", h), x, weight, history)
    assert_close(out, out_ref, "causal_conv1d output")
    for name, a, b in zip(("dx", "dweight", "dinitial_states"), g, g_ref, strict=True):
        assert_close(a, b, f"causal_conv1d {name}")
    with torch.no_grad():  # parallel: the inference path (shifted multiply-adds)
        out = causal_conv1d(x, weight, None, "silu", history, backend=backend)
    assert_close(out, out_ref, "causal_conv1d no-grad output")


@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("length", [1, 7, 63])
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_causal_conv1d_inference_path_matches_reference(backend, length, with_history):
    x = torch.randn(2, 6, length, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    history = torch.randn(2, 6, 3, dtype=torch.float64) if with_history else None
    with torch.no_grad():
        out = causal_conv1d(x, weight, bias, "silu", history, backend=backend)
    assert_close(out, causal_conv1d_ref(x, weight, bias, "silu", history), "causal_conv1d no-grad output")


def test_causal_conv1d_update_steps_the_convolution():
    x = torch.randn(2, 6, 11)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    expected = causal_conv1d(x, weight, bias, "silu")
    state = torch.zeros(2, 6, 3)
    outputs = []
    for t in range(x.shape[-1]):
        y, state = causal_conv1d_update(x[..., t], state, weight, bias, "silu")
        outputs.append(y)
    assert_close(torch.stack(outputs, -1), expected, "causal_conv1d_update")
    assert_close(state, x[..., -3:], "conv_state holds the last W-1 inputs")


@pytest.mark.parametrize("length", [1, 3, 9])
def test_causal_conv1d_update_rolling_buffer_and_several_tokens(length):
    """conv_state longer than W - 1 (S = 7 > 3) and L new tokens at once, as the causal-conv1d package."""
    x = torch.randn(2, 6, length, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    state = torch.randn(2, 6, 7, dtype=torch.float64)
    before = state.clone()
    y, new_state = causal_conv1d_update(x, state, weight, bias, "silu")
    y_ref, state_ref = causal_conv1d_update_ref(x, state, weight, bias, "silu")
    assert_close(y, y_ref, f"update L={length} vs loop reference")
    assert_close(new_state, state_ref, f"update L={length} new state vs loop reference")
    # Independently: the full convolution from the last W - 1 inputs, and the last S inputs as the state.
    assert_close(y, causal_conv1d_ref(x, weight, bias, "silu", state[..., -3:]), "update vs causal_conv1d")
    assert_close(new_state, torch.cat([state, x], -1)[..., -7:], "new state = the last S inputs")
    assert torch.equal(state, before), "conv_state must not be modified (the new state is returned)"
    y_one, _ = causal_conv1d_update(x[..., 0], state, weight, bias, "silu")
    assert y_one.shape == (2, 6) and torch.allclose(y_one, y[..., 0])


def test_causal_conv1d_update_in_chunks_equals_the_convolution():
    x = torch.randn(2, 6, 11, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    state, outputs = torch.zeros(2, 6, 5, dtype=torch.float64), []
    for start, stop in ((0, 1), (1, 5), (5, 11)):
        y, state = causal_conv1d_update(x[..., start:stop], state, weight, bias)
        outputs.append(y)
    assert_close(torch.cat(outputs, -1), causal_conv1d_ref(x, weight, bias), "update in chunks of 1, 4, 6")


@pytest.mark.parametrize("length", [1, 3, 9])
def test_causal_conv1d_update_circular_buffer(length):
    """cache_seqlens: sequence b's buffer holds its inputs from column cache_seqlens[b] mod S on."""
    x = torch.randn(3, 6, length, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    state = torch.randn(3, 6, 7, dtype=torch.float64)
    seqlens = torch.tensor([0, 5, 23], dtype=torch.int32)  # 23 wraps around the 7 columns
    y, new_state = causal_conv1d_update(x, state, weight, bias, "silu", cache_seqlens=seqlens)
    y_ref, state_ref = causal_conv1d_update_ref(x, state, weight, bias, "silu", cache_seqlens=seqlens)
    assert_close(y, y_ref, f"circular update L={length} vs loop reference")
    assert_close(new_state, state_ref, f"circular update L={length} new state vs loop reference")
    for b, start in enumerate(seqlens.tolist()):  # unrolled to time order, it is the linear buffer
        in_order = state[b : b + 1].roll(-start, dims=-1)
        y_linear, state_linear = causal_conv1d_update(x[b : b + 1], in_order, weight, bias, "silu")
        assert_close(y[b : b + 1], y_linear, f"circular buffer b={b} vs the same inputs in time order")
        assert_close(new_state[b : b + 1].roll(-(start + length), dims=-1), state_linear,
                     f"circular buffer b={b}: new state in time order")


def test_causal_conv1d_update_conv_state_indices():
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    weight = torch.randn(6, 4, dtype=torch.float64)
    cache = torch.randn(5, 6, 3, dtype=torch.float64)
    indices = torch.tensor([4, 0, 2])
    y, new_cache = causal_conv1d_update(x, cache, weight, conv_state_indices=indices)
    y_ref, cache_ref = causal_conv1d_update_ref(x, cache, weight, conv_state_indices=indices)
    assert_close(y, y_ref, "update with conv_state_indices vs loop reference")
    assert_close(new_cache, cache_ref, "cache lines after the update vs loop reference")
    assert torch.equal(new_cache[[1, 3]], cache[[1, 3]]), "unused cache lines stay as they were"
    assert_close(y, causal_conv1d_update(x, cache[indices], weight)[0], "indices select the cache lines")


@pytest.mark.parametrize("cache_seqlens", [None, torch.tensor([5, 1, 2, 7])])
@pytest.mark.parametrize("length", [1, 3])
def test_causal_conv1d_update_negative_indices_are_padding_slots(length, cache_seqlens):
    """As the package's kernel: a sequence whose cache line index is negative gets zero outputs (no bias, no
    activation) and no line is read or written for it; the other sequences are as without it."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, length, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    cache = torch.randn(5, 6, 3, generator=generator, dtype=torch.float64)
    indices = torch.tensor([3, -1, 0, -7], dtype=torch.int32)
    y, new_cache = causal_conv1d_update(x, cache, weight, bias, "silu", cache_seqlens, indices)
    y_ref, cache_ref = causal_conv1d_update_ref(x, cache, weight, bias, "silu", cache_seqlens, indices)
    assert_close(y, y_ref, "update with padding slots vs loop reference")
    assert_close(new_cache, cache_ref, "cache after the update with padding slots vs loop reference")
    assert torch.equal(y[[1, 3]], torch.zeros_like(y[[1, 3]])), "padding slots output zeros"
    assert torch.equal(new_cache[[1, 2, 4]], cache[[1, 2, 4]]), "unnamed lines stay (-1 is not Python's last line)"
    kept = [0, 2]
    seqlens = None if cache_seqlens is None else cache_seqlens[kept]
    y_kept, cache_kept = causal_conv1d_update(x[kept], cache, weight, bias, "silu", seqlens, indices[kept])
    assert_close(y[kept], y_kept, "real sequences are as without the padding slots")
    assert torch.equal(new_cache, cache_kept)
    with pytest.raises(ValueError, match="cache line >= the 5 lines"):
        causal_conv1d_update(x, cache, weight, conv_state_indices=torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        causal_conv1d_update(x, cache, weight, conv_state_indices=torch.tensor([0, 1]))


def test_causal_conv1d_update_bad_shapes_are_named():
    with pytest.raises(ValueError, match="S >= W - 1"):
        causal_conv1d_update(torch.randn(2, 6), torch.randn(2, 6, 2), torch.randn(6, 4))


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), activation="relu")


def test_causal_conv1d_bad_backend_is_named():
    x, weight = torch.randn(1, 3, 5), torch.randn(3, 4)
    with pytest.raises(ValueError, match="causal_conv1d: backend='fast'; valid: 'auto', 'compiled', 'parallel'"):
        causal_conv1d(x, weight, backend="fast")


def test_old_path_keyword_and_eager_value_still_work_with_a_deprecation_warning():
    x, weight = torch.randn(1, 3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="causal_conv1d: the keyword path= is deprecated.*backend='parallel'"):
        out = causal_conv1d(x, weight, path="eager")
    assert_close(out, causal_conv1d_ref(x, weight), "path='eager' output")


def test_half_precision_runs_the_parallel_path_without_asking_for_the_kernel(monkeypatch):
    """The compiled kernel is for float32 / float64: bfloat16 never resolves (so never builds) it."""
    monkeypatch.setattr(conv_module, "resolve_backend", lambda *args: pytest.fail("resolved for bfloat16"))
    x, weight = torch.randn(1, 3, 5), torch.randn(3, 4)
    out = causal_conv1d(x.bfloat16(), weight.bfloat16(), activation="silu")
    assert_close(out.float(), causal_conv1d_ref(x.bfloat16(), weight.bfloat16(), activation="silu").float(),
                 "bfloat16 output", dtype=torch.bfloat16)
