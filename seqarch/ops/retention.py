"""Retention (RetNet): a linear recurrence with a fixed per-head decay, in three equal forms.

Sun et al. (2023), "Retentive Network: A Successor to Transformer for Large Language Models",
section 2.1. Legend: B batch, H heads, T length, K query/key head dim, V value head dim,
C chunk length, N number of chunks; a state S is (B, H, K, V).

Per head, with decay γ in (0, 1) and scale s (applied to q; default K^-1/2):

    S_t = γ S_{t-1} + k_tᵀ v_t,    o_t = s q_t S_t                       recurrent (paper eq. 6)
    O = ((s Q Kᵀ) ⊙ D) V,   D_nm = γ^(n-m) for n >= m, else 0             parallel  (paper eq. 5)
    chunkwise (paper eq. 7): the parallel form inside each chunk of C tokens, the recurrence on S
    across chunks: S_[i] = γ^C S_[i-1] + Σ_j γ^(C-1-j) k_jᵀ v_j, and token j of chunk i adds
    s γ^(j+1) q_j S_[i-1].

An initial state S_{-1} (the state before token 0) adds s γ^(t+1) q_t S_{-1} to o_t; the final state
is S_{T-1} = γ^T S_{-1} + Σ_m γ^(T-1-m) k_mᵀ v_m. The scale multiplies q, not k (the paper scales k),
so the state holds unscaled kᵀv, as in flash-linear-attention's retention; outputs are identical.
No data-dependent normalisation is applied here: the RetNet layer (seqarch.mixers.retnet) applies
torchscale's decay-row and score normalisations and its per-head RMS norm on top, getting the score
row sums from this op as one extra value column of ones.

Every power of γ is formed as exp(n log γ) with n >= 0, so nothing overflows; the default decays
γ_h = 1 - 2^(-5-h) are built as log1p(-2^(-5-h)) in float64, exact for any head count.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from einops import rearrange

from seqarch.backends import check_backend, renamed_keyword

Backend = Literal["auto", "chunked", "parallel", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_OLD_MODES = {"chunkwise": "chunked", "recurrent": "sequential"}  # the deprecated `mode=` values

def default_log_decay(n_heads: int, device=None) -> torch.Tensor:
    """log γ_h for RetNet's multi-scale decays γ_h = 1 - 2^(-5-h), h = 0..H-1: (H,) float64."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64, device=device))))


def _log_decay(decay: torch.Tensor | None, n_heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    if decay is None:
        return default_log_decay(n_heads, device).to(dtype)
    return torch.log(decay.to(device=device, dtype=torch.float64)).to(dtype)


def _powers(exponents: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """γ_h^n for integer exponents (...) -> (H, ...); negative exponents give 0 (outside the causal mask)."""
    shape = (-1,) + (1,) * exponents.ndim
    valid = exponents >= 0
    exponent = exponents.clamp(min=0).to(log_gamma.dtype)
    return torch.exp(exponent * log_gamma.reshape(shape)) * valid


def _check(q, k, v, decay, initial_state, backend, chunk_size) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"retention: q and k must both be (B, H, T, K), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"retention: v must be (B, H, T, V) with (B, H, T) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    batch, heads, _, key_dim = q.shape
    if decay is not None:
        if decay.shape != (heads,):
            raise ValueError(f"retention: decay must be (H,) = ({heads},), got {tuple(decay.shape)}")
        if not bool(((decay > 0) & (decay < 1)).all()):
            raise ValueError(f"retention: every decay must lie in (0, 1), got {decay.tolist()}")
    if initial_state is not None and initial_state.shape != (batch, heads, key_dim, v.shape[-1]):
        raise ValueError(f"retention: initial_state must be (B, H, K, V) = "
                         f"{(batch, heads, key_dim, v.shape[-1])}, got {tuple(initial_state.shape)}")
    check_backend("retention", backend, BACKENDS)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"retention: chunk_size must be a positive int, got {chunk_size!r}")


def _parallel(q, k, v, log_gamma, scale, initial_state, output_final_state):
    """Paper eq. (5) plus the initial state's decay into every position."""
    length = q.shape[2]
    t = torch.arange(length, device=q.device)
    mask = _powers(t[:, None] - t[None, :], log_gamma) * scale  # (H, T, T)
    out = (q @ k.transpose(-1, -2) * mask) @ v  # (B, H, T, V)
    if initial_state is not None:
        out = out + (q * (_powers(t + 1, log_gamma) * scale)[..., None]) @ initial_state
    final = None
    if output_final_state:
        final = (k * _powers(length - 1 - t, log_gamma)[..., None]).transpose(-1, -2) @ v  # (B, H, K, V)
        if initial_state is not None:
            final = final + torch.exp(length * log_gamma)[:, None, None] * initial_state
    return out, final


def _chunk_states(local: torch.Tensor, log_a: torch.Tensor, initial_state):
    """The state entering each chunk, P_i = a P_{i-1} + U_{i-1} with P_0 = S_{-1} (B, H, N, K, V), and
    the state after the last chunk, for chunk-local states U (B, H, N, K, V) and a = γ^C (H,).

    The recurrence across chunks is the paper's: one (B, H, K, V) multiply-add per chunk, N = T / C
    steps, which costs less than any product that mixes the N states at once (that costs N K V per chunk)."""
    batch, heads, _, key_dim, value_dim = local.shape
    a = torch.exp(log_a)[:, None, None]  # (H, 1, 1)
    state = local.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state
    entering = []
    for chunk_local in local.unbind(2):
        entering.append(state)
        state = torch.addcmul(chunk_local, a, state)
    return torch.stack(entering, dim=2), state


def _chunkwise(q, k, v, log_gamma, scale, chunk_size, initial_state):
    """Paper eq. (7) for T a multiple of C. Returns (out, final state)."""
    qc, kc, vc = (rearrange(x, "b h (n c) d -> b h n c d", c=chunk_size) for x in (q, k, v))
    j = torch.arange(chunk_size, device=q.device)
    inner_mask = (_powers(j[:, None] - j[None, :], log_gamma) * scale)[:, None]  # (H, 1, C, C)
    # The mask multiplies the fresh score tensor in place: its product's backward needs only the mask.
    inner = (qc @ kc.transpose(-1, -2)).mul_(inner_mask) @ vc  # (B, H, N, C, V)
    leaving = _powers(chunk_size - 1 - j, log_gamma)[:, None, :, None]  # (H, 1, C, 1)
    local = (kc * leaving).transpose(-1, -2) @ vc  # (B, H, N, K, V)
    entering, final = _chunk_states(local, chunk_size * log_gamma, initial_state)
    arriving = (_powers(j + 1, log_gamma) * scale)[:, None, :, None]  # (H, 1, C, 1)
    # out = inner + (q ⊙ arriving) @ entering, added in place (autograd keeps no copy of `inner`).
    flat = "b h n c d -> (b h n) c d"
    rearrange(inner, flat).baddbmm_(rearrange(qc * arriving, flat), rearrange(entering, flat))
    return rearrange(inner, "b h n c d -> b h (n c) d"), final


def _recurrent(q, k, v, log_gamma, scale, initial_state):
    """Paper eq. (6), one `retention_step` per token."""
    batch, heads, length, key_dim = q.shape
    state = initial_state
    if state is None:
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    gamma = torch.exp(log_gamma)
    outputs = []
    for t in range(length):
        out, state = _step(q[:, :, t] * scale, k[:, :, t], v[:, :, t], state, gamma)
        outputs.append(out)
    return torch.stack(outputs, dim=2), state


def _step(q_t, k_t, v_t, state, gamma):
    state = gamma[:, None, None] * state + k_t[..., :, None] * v_t[..., None, :]  # (B, H, K, V)
    return torch.einsum("bhk,bhkv->bhv", q_t, state), state


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
              scale: float | None = None, backend: Backend = "auto", chunk_size: int = 64,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False, *,
              mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retention of q, k (B, H, T, K) and v (B, H, T, V) with per-head decay γ (H,) in (0, 1)
    (default 1 - 2^(-5-h)) and scale on q (default K^-1/2).

    `backend` (`resolve_backend`) is "chunked" (chunks of `chunk_size`; a ragged tail runs the
    parallel form from the carried state), "parallel" (O(T^2) memory), "sequential" (a loop over
    tokens, for checks) or "auto" (= "chunked"). `mode=` is its deprecated name ("chunkwise" is
    "chunked", "recurrent" is "sequential").
    `initial_state` (B, H, K, V) is the state before token 0. Returns (o (B, H, T, V), final state
    (B, H, K, V) or None); computed in at least float32, returned in q's dtype.
    """
    backend = resolve_backend(renamed_keyword("retention", backend, "mode", mode, _OLD_MODES), q.device)
    _check(q, k, v, decay, initial_state, backend, chunk_size)
    in_dtype = q.dtype
    dtype = torch.promote_types(in_dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    log_gamma = _log_decay(decay, q.shape[1], dtype, q.device)
    state = None if initial_state is None else initial_state.to(dtype)
    if backend == "sequential":
        out, state = _recurrent(q, k, v, log_gamma, scale, state)
    elif backend == "parallel":
        out, state = _parallel(q, k, v, log_gamma, scale, state, output_final_state)
    else:
        length = q.shape[2]
        full = length - length % chunk_size
        pieces = []
        if full:
            piece, state = _chunkwise(q[:, :, :full], k[:, :, :full], v[:, :, :full], log_gamma, scale,
                                      chunk_size, state)
            pieces.append(piece)
        if full < length or not pieces:
            piece, state = _parallel(q[:, :, full:], k[:, :, full:], v[:, :, full:], log_gamma, scale, state,
                                     output_final_state)
            pieces.append(piece)
        out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    final = state.to(in_dtype) if output_final_state else None
    return out.to(in_dtype), final


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The path `backend` runs: "chunked", "parallel" or "sequential" ("auto" is "chunked" on every
    device: the fastest form at training lengths, exact like the others)."""
    check_backend("retention", backend, BACKENDS)
    return "chunked" if backend == "auto" else backend


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` picks, in words."""
    return f"backend={backend}: {resolve_backend(backend, device)} form (PyTorch)"


def retention_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, state: torch.Tensor,
                   decay: torch.Tensor | None = None, scale: float | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrent form (paper eq. 6): q_t, k_t (B, H, K), v_t (B, H, V), state
    (B, H, K, V) -> (o_t (B, H, V), new state), both in q_t's dtype (computed in >= float32)."""
    if q_t.ndim != 3 or k_t.shape != q_t.shape or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(f"retention_step: q_t, k_t must be (B, H, K) and v_t (B, H, V), got "
                         f"{tuple(q_t.shape)}, {tuple(k_t.shape)}, {tuple(v_t.shape)}")
    if state.shape != (*q_t.shape, v_t.shape[-1]):
        raise ValueError(f"retention_step: state must be (B, H, K, V) = {(*q_t.shape, v_t.shape[-1])}, "
                         f"got {tuple(state.shape)}")
    in_dtype = q_t.dtype
    dtype = torch.promote_types(in_dtype, torch.float32)
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    gamma = torch.exp(_log_decay(decay, q_t.shape[1], dtype, q_t.device))
    out, state = _step(q_t.to(dtype) * scale, k_t.to(dtype), v_t.to(dtype), state.to(dtype), gamma)
    return out.to(in_dtype), state.to(in_dtype)


def retention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain loop over tokens transcribing the paper's recurrent form (eq. 6):
    S_t = γ S_{t-1} + k_tᵀ v_t, o_t = s q_t S_t, in the inputs' dtype."""
    batch, heads, length, key_dim = q.shape
    scale = key_dim ** -0.5 if scale is None else scale
    if decay is None:
        decay = 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))
    gamma = decay.to(device=q.device, dtype=q.dtype)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for t in range(length):
        state = gamma[:, None, None] * state + torch.einsum("bhk,bhv->bhkv", k[:, :, t], v[:, :, t])
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outputs, dim=2), state if output_final_state else None
