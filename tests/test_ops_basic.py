"""fftconv and causal_conv1d: fast paths vs reference, forward and backward, odd lengths; causal_conv1d
on both of its paths (the compiled kernel and the eager PyTorch ops)."""

from __future__ import annotations

import pytest
import torch

from seqarch.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from seqarch.ops.fftconv import fftconv, fftconv_ref
from tests.tolerance import assert_close

CONV_PATHS = ["compiled", "eager"]


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*inputs)
    # randn(shape), not randn_like: the latter fills in memory order, so it would hand a channel-last
    # result a different cotangent than a contiguous one.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype))
    return out, [t.grad for t in inputs if t is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("length", "filter_length"), [(1, 1), (7, 7), (63, 20), (257, 257)])
def test_fftconv_matches_direct_convolution(length, filter_length, dtype):
    u = torch.randn(2, 5, length, dtype=dtype)
    k = torch.randn(5, filter_length, dtype=dtype) / filter_length**0.5
    D = torch.randn(5, dtype=dtype)
    out, g = grads(fftconv, u, k, D)
    out_ref, g_ref = grads(fftconv_ref, u, k, D)
    assert_close(out, out_ref, "fftconv output")
    for name, a, b in zip(("du", "dk", "dD"), g, g_ref, strict=True):
        assert_close(a, b, f"fftconv {name}")


@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("length", [1, 7, 63])
@pytest.mark.parametrize("path", CONV_PATHS)
def test_causal_conv1d_matches_reference(path, length, activation, dtype, with_history):
    x = torch.randn(2, 6, length, dtype=dtype)
    weight = torch.randn(6, 4, dtype=dtype)
    bias = torch.randn(6, dtype=dtype)
    history = torch.randn(2, 6, 3, dtype=dtype) if with_history else None
    out, g = grads(lambda a, w, b, h: causal_conv1d(a, w, b, activation, h, path=path), x, weight, bias, history)
    out_ref, g_ref = grads(lambda a, w, b, h: causal_conv1d_ref(a, w, b, activation, h), x, weight, bias, history)
    assert_close(out, out_ref, "causal_conv1d output")
    for name, a, b in zip(("dx", "dweight", "dbias", "dinitial_states"), g, g_ref, strict=False):
        assert_close(a, b, f"causal_conv1d {name}")


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("path", CONV_PATHS)
def test_causal_conv1d_channel_last_input_without_bias(path, width):
    """The mixers pass a (B, D, L) view of a (B, L, D) projection; no bias; other widths."""
    x = torch.randn(2, 37, 10, dtype=torch.float64)[..., :6].transpose(1, 2)  # (B, D, L) view, L = 37
    weight = torch.randn(6, width, dtype=torch.float64)
    history = torch.randn(2, 6, width - 1, dtype=torch.float64)
    out, g = grads(lambda a, w, h: causal_conv1d(a, w, None, "silu", h, path=path), x, weight, history)
    out_ref, g_ref = grads(lambda a, w, h: causal_conv1d_ref(a, w, None, "silu", h), x, weight, history)
    assert_close(out, out_ref, "causal_conv1d output")
    for name, a, b in zip(("dx", "dweight", "dinitial_states"), g, g_ref, strict=True):
        assert_close(a, b, f"causal_conv1d {name}")
    with torch.no_grad():  # eager: the inference path (shifted multiply-adds)
        out = causal_conv1d(x, weight, None, "silu", history, path=path)
    assert_close(out, out_ref, "causal_conv1d no-grad output")


@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("length", [1, 7, 63])
@pytest.mark.parametrize("path", CONV_PATHS)
def test_causal_conv1d_inference_path_matches_reference(path, length, with_history):
    x = torch.randn(2, 6, length, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    history = torch.randn(2, 6, 3, dtype=torch.float64) if with_history else None
    with torch.no_grad():
        out = causal_conv1d(x, weight, bias, "silu", history, path=path)
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


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), activation="relu")


def test_causal_conv1d_bad_path_is_named():
    x, weight = torch.randn(1, 3, 5), torch.randn(3, 4)
    with pytest.raises(ValueError, match="causal_conv1d: path='fast'; valid: 'auto', 'compiled', 'eager'"):
        causal_conv1d(x, weight, path="fast")
