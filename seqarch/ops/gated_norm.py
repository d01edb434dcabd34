"""Gated group RMSNorm: RMSNorm(x * silu(z)) per group of channels, times a learned weight.

The output norm of the Mamba-2 block (Dao and Gu (2024), Section 7: "an extra normalization layer
... before the final output projection"), as mamba-ssm's `RMSNormGated` / `rmsnorm_fn` with
`norm_before_gate=False`: the gate is applied first, then each group of `group_size` channels is
normalised on its own (mamba-ssm's `group_size = d_ssm // ngroups`), so a checkpoint trained with G
groups behaves the same here.

Legend: ... leading dimensions, E channels, G groups of C = E / G channels.

    g   = x * silu(z)                                   (x alone when z is None)
    out = g / sqrt(mean_C(g^2) + eps) * weight          per group of C channels

Paths (`gated_rms_norm(..., backend=)`, resolved by `resolve_backend`):
- "compiled": a C++ CPU kernel (seqarch/ops/csrc/gated_norm.cpp), forward and a hand-written
  backward, each one pass over the rows that reads x and z where they lie (z may be a column slice
  of a projection's output: no copy); built on first use;
- "eager": PyTorch ops (`F.rms_norm` on the gated input), differentiated by autograd;
- "auto" (default): "compiled" on CPU for float32 / float64 where the kernel builds, else "eager",
  with a one-time notice.
`gated_rms_norm_ref` is the definition written out, the reference both paths are tested against.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange

from seqarch.backends import CompiledKernel, check_backend, compiled_or_eager, describe_compiled_or_eager

Backend = Literal["auto", "compiled", "eager"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# -ffast-math lets the compiler vectorise the sums of squares (reassociation) and the sigmoid.
KERNEL = CompiledKernel("seqarch_gated_norm", os.path.join(os.path.dirname(__file__), "csrc", "gated_norm.cpp"),
                        ("-march=native", "-ffast-math"))


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The path `backend` runs on `device`: "compiled" or "eager" (see the module docstring); an
    explicit "compiled" that cannot run raises."""
    check_backend("gated_rms_norm", backend, BACKENDS)
    if backend == "eager":
        return backend
    return compiled_or_eager("gated_rms_norm", backend, torch.device(device), KERNEL, fallback="eager")


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything."""
    check_backend("gated_rms_norm", backend, BACKENDS)
    return describe_compiled_or_eager(backend, device, KERNEL, "eager")


def _check_inputs(x, z, weight, group_size) -> int:
    """The number of groups, after checking the shapes."""
    channels = x.shape[-1]
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if weight.shape != (channels,):
        raise ValueError(f"gated_rms_norm: weight must have shape ({channels},), got {tuple(weight.shape)}")
    size = channels if group_size is None else group_size
    if size < 1 or channels % size:
        raise ValueError(f"gated_rms_norm: group_size must divide the {channels} channels, got {group_size}")
    return channels // size


def gated_rms_norm_ref(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-5,
                       group_size: int | None = None) -> torch.Tensor:
    """The definition: g = x * silu(z), each group of C channels divided by sqrt(mean(g^2) + eps), times weight."""
    groups = _check_inputs(x, z, weight, group_size)
    gated = x if z is None else x * (z * torch.sigmoid(z))
    gated = rearrange(gated, "... (g c) -> ... g c", g=groups)
    normed = gated / torch.sqrt(gated.pow(2).mean(dim=-1, keepdim=True) + eps)
    return rearrange(normed, "... g c -> ... (g c)") * weight


def _eager(x, z, weight, eps, groups):
    gated = x if z is None else x * F.silu(z)
    gated = rearrange(gated, "... (g c) -> ... g c", g=groups)
    normed = F.rms_norm(gated, (gated.shape[-1],), eps=eps)
    return rearrange(normed, "... g c -> ... (g c)") * weight


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., E) -> (R, E) with contiguous channels, a view where the strides allow."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _CompiledGatedNorm(torch.autograd.Function):
    """x (R, E), z (R, E) or None, weight (E,) -> out (R, E); the kernel saves 1 / rms per row and group."""

    @staticmethod
    def forward(ctx, x, z, weight, eps, groups):
        out, rstd = KERNEL.load().forward(x, z, weight, eps, groups)
        ctx.save_for_backward(x, z, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, z, weight, rstd = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dx, dz, dweight = KERNEL.load().backward(x, z, weight, rstd, dout)
        return dx, (dz if z is not None else None), dweight, None, None


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-5,
                   group_size: int | None = None, backend: Backend = "auto") -> torch.Tensor:
    """RMSNorm(x * silu(z)) over groups of `group_size` channels (all E when None), times weight.

    x (..., E), z (..., E) or None, weight (E,) -> (..., E) in x's dtype. `backend` is "auto",
    "compiled" or "eager" (module docstring); the kernel runs float32 and float64, other dtypes the
    eager path.
    """
    groups = _check_inputs(x, z, weight, group_size)
    check_backend("gated_rms_norm", backend, BACKENDS)
    kernel_dtype = x.dtype in (torch.float32, torch.float64) and (z is None or z.dtype == x.dtype)
    if backend == "compiled" and not kernel_dtype:
        raise ValueError(f"gated_rms_norm: backend='compiled' runs float32 and float64 (x and z alike), got "
                         f"{x.dtype} and {None if z is None else z.dtype}")
    chosen = resolve_backend(backend, x.device) if kernel_dtype else "eager"
    if chosen == "eager":
        return _eager(x, z, weight, eps, groups)
    out = _CompiledGatedNorm.apply(_rows(x), None if z is None else _rows(z), weight.to(x.dtype), float(eps), groups)
    return out.view(x.shape)
