"""Causal long convolution through the FFT (as in S4 / H3 / Hyena).

Legend: B batch, D channels, L length.

    y[b, d, t] = sum_{s <= t} k[d, s] * u[b, d, t - s]  (+ D[d] * u[b, d, t])

Zero-padding both signals to 2L makes the circular convolution of the rFFT equal the linear one
on the first L outputs, so the cost is O(B D L log L) instead of O(B D L^2).
"""

from __future__ import annotations

import torch


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, D, L), k (D, Lk) with Lk <= L (a shorter filter is zero beyond its end),
    D (D,) optional skip -> y (B, D, L) in u's dtype. Computed in at least float32."""
    seqlen = u.shape[-1]
    if k.shape[-1] > seqlen:
        k = k[..., :seqlen]
    fft_size = 2 * seqlen
    compute_dtype = torch.promote_types(u.dtype, torch.float32)
    u_f = torch.fft.rfft(u.to(compute_dtype), n=fft_size)
    k_f = torch.fft.rfft(k.to(compute_dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size)[..., :seqlen]
    if D is not None:
        y = y + u * D.unsqueeze(-1)
    return y.to(u.dtype)


def fftconv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Direct O(L^2) causal convolution: the definition above, one lag at a time."""
    seqlen = u.shape[-1]
    y = torch.zeros_like(u)
    for lag in range(min(seqlen, k.shape[-1])):
        y[..., lag:] = y[..., lag:] + k[:, lag, None] * u[..., : seqlen - lag]
    if D is not None:
        y = y + u * D.unsqueeze(-1)
    return y
