"""fftconv: the FFT path against the direct causal convolution, forward and backward, odd lengths."""

from __future__ import annotations

import pytest
import torch

from seqarch.ops.fftconv import fftconv, fftconv_ref
from tests.tolerance import assert_close


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
