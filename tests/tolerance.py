"""One tolerance helper for the whole suite, keyed by dtype."""

from __future__ import annotations

import torch

# Error allowed relative to the largest magnitude of the expected tensor.
RELATIVE_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, dtype: torch.dtype | None = None,
                 tolerance: float | None = None) -> None:
    """Assert max|actual - expected| <= tol * max(max|expected|, 1e-6), naming the tensor and
    printing the max absolute and relative error on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.is_complex():  # compare (real, imag) pairs; the tolerance follows the real precision
        actual, expected = torch.view_as_real(actual.resolve_conj()), torch.view_as_real(expected.resolve_conj())
    dtype = dtype or expected.dtype
    tol = tolerance if tolerance is not None else RELATIVE_TOLERANCE[dtype]
    actual64, expected64 = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(actual64).all(), f"{name}: non-finite values"
    scale = max(expected64.abs().max().item(), 1e-6) if expected64.numel() else 1.0
    error = (actual64 - expected64).abs().max().item() if expected64.numel() else 0.0
    assert error <= tol * scale, (
        f"{name}: max abs error {error:.3e}, relative {error / scale:.3e} > tolerance {tol:.1e} "
        f"(scale {scale:.3e}, dtype {dtype})"
    )
