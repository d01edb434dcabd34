"""SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer"), as in Llama."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_size(d_model: int, ratio: float = 8 / 3, multiple_of: int = 8) -> int:
    """Hidden width ~ ratio * d_model rounded up to a multiple (8/3 keeps the parameter count of a
    4x GELU MLP)."""
    hidden = int(ratio * d_model)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """(..., D) -> (..., D): W_down(silu(W_gate x) * W_up x).

    `hidden` sets the width exactly (a checkpoint's `intermediate_size`); None takes `ratio * d_model`
    rounded up to a multiple of 8. `bias` adds biases to the three projections (HF Llama's `mlp_bias`)."""

    def __init__(self, d_model: int, ratio: float = 8 / 3, hidden: int | None = None, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if hidden is not None and hidden < 1:
            raise ValueError(f"SwiGLU hidden width must be >= 1, got {hidden}")
        hidden = swiglu_hidden_size(d_model, ratio) if hidden is None else hidden
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias, device=device, dtype=dtype)  # [gate; up]
        self.down = nn.Linear(hidden, d_model, bias=bias, device=device, dtype=dtype)
        self.down._is_residual_projection = True  # scaled by 1/sqrt(depth) in the model init (GPT-2's fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
