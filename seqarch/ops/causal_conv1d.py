"""Short causal depthwise convolution, with the signatures of the `causal-conv1d` package.

Legend: B batch, D channels, L length, W kernel width.

    y[b, d, t] = act(bias[d] + sum_{w < W} weight[d, w] * x[b, d, t - (W - 1) + w])

with x zero before t = 0. `causal_conv1d_update` is the one-token recurrent form: it keeps the
last W - 1 inputs as `conv_state` (B, D, W - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

_ACTIVATIONS = (None, "silu", "swish")


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {_ACTIVATIONS}")
    return F.silu(y) if activation is not None else y


def _shifted_multiply_adds(x_padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x_padded (B, L + W - 1, D) channel-last -> (B, L, D): W multiply-adds of shifted rows."""
    width = weight.shape[-1]
    length = x_padded.shape[1] - width + 1
    y = x_padded[:, :length] * weight[:, 0]  # (B, L, D)
    for tap in range(1, width):
        y.addcmul_(x_padded[:, tap : tap + length], weight[:, tap])
    if bias is not None:
        y += bias
    return y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, initial_states: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, D, L), weight (D, W), bias (D,) -> (B, D, L). `initial_states` (B, D, W - 1) are the
    inputs before t = 0 (zeros when None).

    Without autograd: W shifted multiply-adds in the channel-last layout (B, L, D) (1.4-1.9x faster
    than F.conv1d on CPU); the result is then a (B, D, L) view of a contiguous (B, L, D) tensor.
    With autograd: one grouped F.conv1d, whose CPU backward beat every shifted multiply-add
    backward we measured (docs/mixers/mamba.md)."""
    width = weight.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, initial_states)
    )
    if not needs_grad:
        x_last = rearrange(x, "b d l -> b l d")
        if initial_states is None:
            x_padded = F.pad(x_last, (0, 0, width - 1, 0))
        else:
            x_padded = torch.cat([rearrange(initial_states.to(x.dtype), "b d w -> b w d"), x_last], dim=1)
        y = rearrange(_shifted_multiply_adds(x_padded, weight, bias), "b l d -> b d l")
        return _activate(y, activation)
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
