"""Short causal depthwise convolution, with the signatures of the `causal-conv1d` package.

Legend: B batch, D channels, L length, W kernel width.

    y[b, d, t] = act(bias[d] + sum_{w < W} weight[d, w] * x[b, d, t - (W - 1) + w])

with x zero before t = 0. `causal_conv1d_update` is the one-token recurrent form: it keeps the
last W - 1 inputs as `conv_state` (B, D, W - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu", "swish")


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {_ACTIVATIONS}")
    return F.silu(y) if activation is not None else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, initial_states: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, D, L), weight (D, W), bias (D,) -> (B, D, L). `initial_states` (B, D, W - 1) are the
    inputs before t = 0 (zeros when None). One grouped conv1d call."""
    width = weight.shape[-1]
    if initial_states is None:
        x_padded = F.pad(x, (width - 1, 0))
    else:
        x_padded = torch.cat([initial_states.to(x.dtype), x], dim=-1)
    y = F.conv1d(x_padded, weight.unsqueeze(1), bias, groups=x.shape[1])
    return _activate(y, activation)


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None, initial_states: torch.Tensor | None = None) -> torch.Tensor:
    """The definition above as a loop over taps."""
    width = weight.shape[-1]
    seqlen = x.shape[-1]
    history = x.new_zeros(*x.shape[:2], width - 1) if initial_states is None else initial_states
    x_padded = torch.cat([history.to(x.dtype), x], dim=-1)
    y = torch.zeros_like(x)
    for tap in range(width):
        y = y + weight[:, tap, None] * x_padded[..., tap : tap + seqlen]
    if bias is not None:
        y = y + bias[:, None]
    return _activate(y, activation)


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None):
    """One token x (B, D) with conv_state (B, D, W - 1) -> (y (B, D), new conv_state).

    Unlike the CUDA package (which updates `conv_state` in place), the new state is returned,
    so states stay values that prefill / step can pass along.
    """
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (B, D, W)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation), window[..., 1:]
