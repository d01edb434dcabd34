"""Positional encodings: rotary position embedding (RoPE).

Legend: B batch, H heads, L length, E head dim.

RoPE (Su et al., 2021, "RoFormer", eq. 34) rotates each pair of channels (i, i + E/2) of a query or
key at position t by the angle t * inv_freq[i], inv_freq[i] = base^(-2i/E), so that q_s . k_t depends
on s - t only. We use the "rotate half" pairing of GPT-NeoX / Llama.
"""

from __future__ import annotations

import torch

ROPE_SCALING_TYPES: tuple[str, ...] = ()


def rope_frequencies(head_dim: int, base: float = 10000.0, max_position: int = 2048,
                     scaling: dict | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (E/2,) float32 and the attention scale factor (1.0 without scaling).

    `max_position` is the context length the model is trained for; scaled variants use it.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if scaling is not None:
        kind = scaling.get("type") if isinstance(scaling, dict) else scaling
        raise ValueError(f"unknown RoPE scaling {kind!r}; valid: None (no scaling)")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inv_freq = (1.0 / base**exponents).to(torch.float32)
    return inv_freq, 1.0


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (*positions.shape, E) for integer or real `positions`."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., E/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., E)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, E) by angles whose cos/sin are (L, E) (or broadcastable)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos + rotated_half * sin
