"""Short causal depthwise convolution, with the signatures of the `causal-conv1d` package.

Legend: B batch, D channels, L length, W kernel width.

    y[b, d, t] = act(bias[d] + sum_{w < W} weight[d, w] * x[b, d, t - (W - 1) + w])

with x zero before t = 0. `causal_conv1d_update` is the recurrent form for one or a few new tokens:
it continues from `conv_state` (B, D, S), S >= W - 1, the last inputs in time order or a circular
buffer (`cache_seqlens`), as the package's `causal_conv1d_update`, and returns the new state.

Paths (`backend=`, resolved by `resolve_backend`):
- "compiled": the C++ CPU kernel (seqarch/ops/csrc/causal_conv1d.cpp), forward and backward with
  the SiLU fused, in the channel-last layout (B, L, D) the mixers' projections produce; built on
  first use;
- "parallel": eager PyTorch ops (W shifted multiply-adds without autograd, one grouped F.conv1d
  with it);
- "auto" (default): the causal-conv1d package's CUDA kernel on a CUDA device where it imports (and
  no `initial_states` are given); on CPU "compiled" where the kernel builds; else "parallel", with
  a one-time notice.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange

from seqarch.backends import (
    CompiledKernel,
    check_backend,
    compiled_or_eager,
    cuda_kernels_usable,
    describe_compiled_or_eager,
    notify_once,
    renamed_keyword,
)

_ACTIVATIONS = (None, "silu", "swish")
Backend = Literal["auto", "compiled", "parallel"]
BACKENDS: tuple[str, ...] = get_args(Backend)
KERNEL = CompiledKernel("seqarch_causal_conv1d", os.path.join(os.path.dirname(__file__), "csrc", "causal_conv1d.cpp"),
                        ("-march=native", "-ffast-math"))


def resolve_backend(backend: str, device: torch.device | str, has_initial_states: bool = False) -> str:
    """The path `backend` runs on `device`: "cuda" (the causal-conv1d package), "compiled" or
    "parallel" (see the module docstring); an explicit "compiled" that cannot run raises."""
    check_backend("causal_conv1d", backend, BACKENDS)
    device = torch.device(device)
    if backend == "parallel":
        return backend
    if backend == "auto" and cuda_kernels_usable("causal_conv1d", device) and not has_initial_states:
        notify_once("causal_conv1d:cuda", "causal_conv1d runs the causal-conv1d package's CUDA kernel")
        return "cuda"
    return compiled_or_eager("causal_conv1d", backend, device, KERNEL, fallback="parallel")


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything."""
    check_backend("causal_conv1d", backend, BACKENDS)
    if backend == "auto" and cuda_kernels_usable("causal_conv1d", device):
        return "backend=auto: causal-conv1d CUDA kernel"
    return describe_compiled_or_eager(backend, device, KERNEL, "parallel")


class _CompiledConv(torch.autograd.Function):
    """x (B, D, L) any strides, weight (D, W), bias (D,) or None, initial_states (B, D, W - 1) or None
    -> y (B, D, L), a view of a contiguous (B, L, D) tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, silu):
        ctx.save_for_backward(x, weight, bias, initial_states)
        ctx.silu = silu
        return KERNEL.load().forward(x, weight, bias, initial_states, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, initial_states = ctx.saved_tensors
        dx, dweight, dbias, dinitial = KERNEL.load().backward(x, weight, bias, initial_states, ctx.silu, dy)
        return (dx, dweight, dbias if bias is not None else None,
                dinitial if initial_states is not None else None, None)


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
                  activation: str | None = None, initial_states: torch.Tensor | None = None,
                  backend: Backend = "auto", *, path: str | None = None) -> torch.Tensor:
    """x (B, D, L), weight (D, W), bias (D,) -> (B, D, L). `initial_states` (B, D, W - 1) are the
    inputs before t = 0 (zeros when None). `path=` is the deprecated name of `backend=` (its
    "eager" is now "parallel").

    "compiled" (the default on CPU, float32 and float64; other dtypes run "parallel"): the fused C++
    kernel, forward and backward; the result is a (B, D, L) view of a contiguous (B, L, D) tensor.
    "parallel", without autograd: W shifted
    multiply-adds in the channel-last layout (B, L, D) (1.4-1.9x faster than F.conv1d on CPU);
    with autograd: one grouped F.conv1d (docs/mixers/mamba.md). "cuda" (auto on a CUDA device):
    the causal-conv1d package's `causal_conv1d_fn`."""
    backend = renamed_keyword("causal_conv1d", backend, "path", path, {"eager": "parallel"})
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {_ACTIVATIONS}")
    check_backend("causal_conv1d", backend, BACKENDS)
    # The compiled kernel is for float32 / float64; other dtypes on CPU run "parallel" without asking it.
    kernel_dtype = x.dtype in (torch.float32, torch.float64) or x.device.type == "cuda"
    chosen = resolve_backend(backend, x.device, initial_states is not None) if kernel_dtype else "parallel"
    if chosen == "cuda":
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x, weight, bias, activation=activation)
    if chosen == "compiled":
        in_dtype = [t.to(x.dtype) if t is not None else None for t in (weight, bias, initial_states)]
        return _CompiledConv.apply(x, *in_dtype, activation is not None)
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
                         bias: torch.Tensor | None = None, activation: str | None = None,
                         cache_seqlens: torch.Tensor | None = None, conv_state_indices: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens x (B, D) or (B, D, L) continuing from conv_state (B, D, S), S >= W - 1 ->
    (y (B, D) or (B, D, L), new conv_state (B, D, S)), with the causal-conv1d package's semantics:

    - cache_seqlens None: conv_state holds the last S inputs in time order (the newest last); the
      convolution reads its last W - 1 columns, and the new state is the last S columns of
      [conv_state, x].
    - cache_seqlens (B,) int: conv_state is a circular buffer; sequence b's last inputs sit at
      columns (cache_seqlens[b] - k) mod S, k = 1 .. W - 1, and x is written at columns
      (cache_seqlens[b] + t) mod S.
    - conv_state_indices (B,) int: conv_state is (N, D, S) with N cache lines, and sequence b uses line
      conv_state_indices[b] (continuous batching); the returned state is the whole (N, D, S) tensor.
      A negative index marks a padding slot, as in the package's kernel: that sequence's outputs are
      zero (no bias, no activation) and no cache line is read or written for it. An index >= N raises.

    Several tokens (L > 1, e.g. draft tokens in speculative decoding) give L outputs, each the
    convolution of its own window. The package updates `conv_state` in place and returns only y;
    here conv_state is left unchanged and the new state is returned, so states stay values that
    prefill / step can pass along. Computed in weight's dtype, y returned in x's dtype, the new state
    in conv_state's dtype.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {_ACTIVATIONS}")
    single = x.ndim == 2
    x = x.unsqueeze(-1) if single else x  # (B, D, L)
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    padding = None
    if conv_state_indices is None:
        states = conv_state  # (B, D, S)
    else:
        lines, padding = _cache_lines(conv_state_indices, batch, conv_state.shape[0], conv_state.device)
        states = conv_state.new_zeros((batch, *conv_state.shape[1:]))  # padding slots read no line
        states[~padding] = conv_state[lines[~padding]]
    state_len = states.shape[-1]
    if weight.shape != (dim, width) or states.shape[:2] != (batch, dim) or state_len < width - 1:
        raise ValueError(f"causal_conv1d_update: need x (B, D[, L]), conv_state (B, D, S) with S >= W - 1 and "
                         f"weight (D, W); got x {tuple(x.shape)}, conv_state {tuple(states.shape)} (after "
                         f"conv_state_indices), weight {tuple(weight.shape)}")
    if cache_seqlens is None:
        history = states[..., state_len - (width - 1):]  # (B, D, W - 1)
        new_states = torch.cat([states, x.to(states.dtype)], dim=-1)[..., seqlen:]  # the last S inputs
    else:
        start = cache_seqlens.long().to(x.device)[:, None]  # (B, 1)
        read = torch.remainder(torch.arange(-(width - 1), 0, device=x.device) + start, max(state_len, 1))
        history = states.gather(2, read[:, None].expand(-1, dim, -1))  # (B, D, W - 1)
        kept = min(seqlen, state_len)  # only the last S tokens survive in the buffer; write each column once
        write = torch.remainder(torch.arange(seqlen - kept, seqlen, device=x.device) + start, max(state_len, 1))
        new_states = states.scatter(2, write[:, None].expand(-1, dim, -1), x[..., seqlen - kept:].to(states.dtype))
    window = torch.cat([history.to(x.dtype), x], dim=-1).to(weight.dtype)  # (B, D, W - 1 + L)
    y = window[..., :seqlen] * weight[:, :1]
    for tap in range(1, width):
        y = y + window[..., tap : tap + seqlen] * weight[:, tap : tap + 1]
    if bias is not None:
        y = y + bias[:, None]
    y = _activate(y, activation).to(x.dtype)
    if padding is not None:
        y = y.masked_fill(padding[:, None, None], 0)
        new_states = conv_state.index_copy(0, lines[~padding], new_states[~padding])
    return (y.squeeze(-1) if single else y), new_states


def _cache_lines(conv_state_indices: torch.Tensor, batch: int, n_lines: int, device) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """(cache line per sequence (B,) long, padding mask (B,) bool: the negative indices)."""
    if conv_state_indices.dtype.is_floating_point or conv_state_indices.is_complex() or \
            tuple(conv_state_indices.shape) != (batch,):
        raise ValueError(f"causal_conv1d_update: conv_state_indices must be an integer tensor of shape ({batch},), "
                         f"got {conv_state_indices.dtype} {tuple(conv_state_indices.shape)}")
    lines = conv_state_indices.long().to(device)
    if bool((lines >= n_lines).any()):
        raise ValueError(f"causal_conv1d_update: conv_state_indices {lines.tolist()} name a cache line >= the "
                         f"{n_lines} lines of conv_state (negative indices mark padding slots)")
    return lines, lines < 0


def causal_conv1d_update_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, activation: str | None = None,
                             cache_seqlens: torch.Tensor | None = None,
                             conv_state_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_conv1d_update` as a loop over sequences and tokens: unroll each state into its inputs in
    time order (oldest first; a circular buffer starts at column cache_seqlens mod S), append each token,
    y_t = act(bias + sum_w weight[:, w] * input[t - (W - 1) + w]), then write the tokens back one by one.
    A negative conv_state_indices entry (a padding slot) gives zeros and touches no cache line."""
    single = x.ndim == 2
    x = x.unsqueeze(-1) if single else x
    width, state_len = weight.shape[-1], conv_state.shape[-1]
    new_state = conv_state.clone()
    rows = list(range(x.shape[0])) if conv_state_indices is None else [int(i) for i in conv_state_indices]
    outputs = []
    for b, row in enumerate(rows):
        if row < 0:  # a padding slot: zero outputs, no cache line touched
            outputs.append(torch.zeros(x.shape[1:], dtype=x.dtype))
            continue
        buffer = new_state[row]  # (D, S), written in place below
        head = 0 if cache_seqlens is None else int(cache_seqlens[b]) % state_len  # column of the oldest input
        inputs = [buffer[:, (head + k) % state_len].clone() for k in range(state_len)]  # oldest first
        ys = []
        for t in range(x.shape[-1]):
            inputs.append(x[b, :, t].to(conv_state.dtype))
            y_t = sum(weight[:, w] * inputs[len(inputs) - width + w].to(weight.dtype) for w in range(width))
            ys.append(y_t + (bias if bias is not None else 0))
            if cache_seqlens is None and state_len:  # shift left by one, the token enters at the end
                buffer.copy_(torch.stack(inputs[-state_len:], dim=-1))
            elif state_len:
                buffer[:, (int(cache_seqlens[b]) + t) % state_len] = inputs[-1]
        outputs.append(_activate(torch.stack(ys, dim=-1), activation).to(x.dtype))
    y = torch.stack(outputs)
    return (y.squeeze(-1) if single else y), new_state
