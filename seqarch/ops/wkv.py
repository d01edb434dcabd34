"""The RWKV-6 ("Finch") wkv recurrence: linear attention with data-dependent per-channel decay.

Peng et al. (2024), "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
section 4 (the Finch time-mix). The signature and semantics follow flash-linear-attention's
`chunk_rwkv6` / `naive_recurrent_rwkv6`, so one can stand in for the other.

Legend: B batch, H heads, T length, K key/receptance head size, V value head size,
N chunks, C chunk size, S sub-chunks per chunk, E sub-chunk size (C = S * E).

Per head, with a matrix state S_t (K, V), receptance r_t, key k_t (K,), value v_t (V,), log-decay
w_t (K,) (decay exp(w_t) <= 1) and bonus u (K,) for the current token:

    o_t = scale * r_t (S_{t-1} + diag(u) k_t^T v_t)                                     (Finch eq. 17)
    S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t

Three forms compute it:

- `wkv6_ref`       the recurrence above, one token at a time (the reference; also the decode step).
- `wkv6_parallel`  o_t = r_t (sum_{s<t} diag(exp(b_{t-1} - b_s)) k_s^T v_s + ...) with all (t, s)
                   decays formed pairwise: O(T^2 K) memory, a second reference for short T.
- `wkv6`           the entry point, on the path `backend=` picks (`resolve_backend`):
    - "compiled": a C++ kernel (seqarch/ops/csrc/wkv6.cpp) running the recurrence itself, one task
      per (batch, head) on ATen's thread pool, the (K, V) state in a local buffer, every token's
      work fused in one pass over the state; backward walks time in reverse with the adjoint of
      the state, recomputing each chunk's states from checkpoints stored every C tokens. Built on
      first use and cached by torch.
    - "chunked": eager PyTorch (also what runs on CUDA): inside a chunk the pairwise sums become
      matrix products, between chunks the state is passed on.
    - "parallel": `wkv6_parallel`; "sequential": `wkv6_ref`.
    - "auto": "compiled" on CPU where the kernel builds, else "chunked", with a one-time notice.

Numerics of the chunked form. With b_i the cumulative log-decay inside a chunk, the weight of key j
for query i > j is exp(b_{i-1} - b_j) <= 1. Factoring it as exp(b_{i-1} - c) * exp(c - b_j) turns the
sums into matrix products, but stays bounded only when c lies between b_{i-1} and b_j: with decays of
-20 per step a reference point at the chunk start would ask for exp(+600). So each chunk is split
into sub-chunks of E tokens; for queries of sub-chunk I and keys of earlier sub-chunks, c is the
cumulative decay just before sub-chunk I (both factors <= 1, a matrix product), and within a
sub-chunk the E x E weights are formed pairwise, exactly. No exp of a positive number is ever
taken, in float32 or float64, for any w <= 0.
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
    describe_compiled_or_eager,
    renamed_keyword,
    run_checkpointed_kernel,
)

DEFAULT_CHUNK_SIZE = 32
DEFAULT_SUBCHUNK_SIZE = 8
Backend = Literal["auto", "compiled", "chunked", "parallel", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# -ffast-math lets the compiler vectorise the sums over V (reassociation) and exp over K.
KERNEL = CompiledKernel("seqarch_wkv6", os.path.join(os.path.dirname(__file__), "csrc", "wkv6.cpp"),
                        ("-march=native", "-ffast-math"))


def _check_inputs(r, k, v, w, u, initial_state) -> None:
    if r.ndim != 4 or k.shape != r.shape or w.shape != r.shape:
        raise ValueError(
            f"wkv6: r, k, w must share one shape (B, H, T, K), got r {tuple(r.shape)}, k {tuple(k.shape)}, "
            f"w {tuple(w.shape)}"
        )
    if v.ndim != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"wkv6: v must be (B, H, T, V) with (B, H, T) = {tuple(r.shape[:3])}, got {tuple(v.shape)}")
    if u.shape != (r.shape[1], r.shape[3]):
        raise ValueError(f"wkv6: u must be (H, K) = {(r.shape[1], r.shape[3])}, got {tuple(u.shape)}")
    expected_state = (r.shape[0], r.shape[1], r.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != expected_state:
        raise ValueError(f"wkv6: initial_state must be (B, H, K, V) = {expected_state}, "
                         f"got {tuple(initial_state.shape)}")


def _prepare(r, k, v, w, u, scale, initial_state):
    """Validate, cast to the compute dtype (at least float32), fold `scale` into r."""
    _check_inputs(r, k, v, w, u, initial_state)
    compute = torch.promote_types(r.dtype, torch.float32)
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    r, k, v, w, u = (t.to(compute) for t in (r, k, v, w, u))
    batch, heads, _, key_size = r.shape
    if initial_state is None:
        state = r.new_zeros(batch, heads, key_size, v.shape[-1])
    else:
        state = initial_state.to(compute)
    return r * scale, k, v, w, u, state


def _finish(out, state, dtype, output_final_state):
    return out.to(dtype), (state.to(dtype) if output_final_state else None)


def wkv6_step(r_t, k_t, v_t, w_t, u, state, scale: float | None = None):
    """One token of the recurrence: r_t, k_t, w_t (B, H, K), v_t (B, H, V), u (H, K),
    state (B, H, K, V) -> (o_t (B, H, V), new state). Computed in `state`'s dtype."""
    scale = r_t.shape[-1] ** -0.5 if scale is None else scale
    r_t, k_t, v_t, w_t = (t.to(state.dtype) for t in (r_t, k_t, v_t, w_t))
    kv = k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # (B, H, K, V)
    out = torch.einsum("bhk,bhkv->bhv", r_t * scale, state + u.to(state.dtype).unsqueeze(-1) * kv)
    return out, w_t.exp().unsqueeze(-1) * state + kv


def wkv6_ref(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False):
    """The Finch recurrence (eq. 17), one token at a time.

    r, k, w (B, H, T, K), v (B, H, T, V), u (H, K), initial_state (B, H, K, V) or None.
    Returns (o (B, H, T, V), final state (B, H, K, V) or None), in r's dtype.
    """
    dtype = r.dtype
    r, k, v, w, u, state = _prepare(r, k, v, w, u, scale, initial_state)
    outputs = []
    for t in range(r.shape[2]):
        out_t, state = wkv6_step(r[:, :, t], k[:, :, t], v[:, :, t], w[:, :, t], u, state, scale=1.0)
        outputs.append(out_t)
    out = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return _finish(out, state, dtype, output_final_state)


def wkv6_parallel(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False):
    """The recurrence unrolled, every (query t, key s) decay formed pairwise: O(T^2 K) memory.

    With b_t = sum_{j<=t} w_j,
        o_t = r_t diag(exp(b_{t-1})) S_0 + sum_{s<t} (r_t . exp(b_{t-1} - b_s) . k_s) v_s + (r_t . u . k_t) v_t
        S_T = diag(exp(b_{T-1})) S_0 + sum_s diag(exp(b_{T-1} - b_s)) k_s^T v_s
    Same arguments and returns as `wkv6_ref`.
    """
    dtype = r.dtype
    r, k, v, w, u, state = _prepare(r, k, v, w, u, scale, initial_state)
    length = r.shape[2]
    cumulative = w.cumsum(dim=2)  # b_t, (B, H, T, K)
    before = _shift_right(cumulative)  # b_{t-1}
    earlier = torch.ones(length, length, dtype=torch.bool, device=r.device).tril(-1)  # (t, s): s < t
    exponent = (before.unsqueeze(3) - cumulative.unsqueeze(2)).masked_fill(~earlier[..., None], float("-inf"))
    scores = torch.einsum("bhtk,bhsk,bhtsk->bhts", r, k, exponent.exp())
    scores = scores + torch.diag_embed(torch.einsum("bhtk,hk,bhtk->bht", r, u, k))
    out = scores @ v + (r * before.exp()) @ state
    if output_final_state:
        total = cumulative[:, :, -1:] if length else torch.zeros_like(state[..., 0]).unsqueeze(2)
        state = total.squeeze(2).exp().unsqueeze(-1) * state + (k * (total - cumulative).exp()).transpose(-1, -2) @ v
    return _finish(out, state, dtype, output_final_state)


def wkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False,
         chunk_size: int = DEFAULT_CHUNK_SIZE, subchunk_size: int = DEFAULT_SUBCHUNK_SIZE, *,
         backend: Backend = "auto", path: str | None = None):
    """wkv6; arguments and returns as `wkv6_ref`, on the path `backend` picks (module docstring;
    `path=` is the deprecated name of `backend=`).

    r, k, w (B, H, T, K) with w the log-decay (w <= 0), v (B, H, T, V), u (H, K) the bonus of the
    current token, scale (default K^-0.5, as flash-linear-attention; RWKV-6 itself uses 1.0),
    initial_state (B, H, K, V). `chunk_size` (C) is the checkpoint interval of the compiled
    backward (O(B H (T / C) K V) memory) and the chunk of the eager path; `subchunk_size` (E, a
    divisor of C) is the eager path's sub-chunk. `backend` is "auto", "compiled", "chunked",
    "parallel" (`wkv6_parallel`) or "sequential" (`wkv6_ref`).
    Compiled: O(T K V) time, O(T (K + V) + (T / C) K V) memory. Chunked: O(T (C + E) K + T K V)
    time, O(T (C / 2 + E) K + T K V / C) memory. Both exact for any w <= 0.
    """
    if chunk_size < 1 or subchunk_size < 1 or chunk_size % subchunk_size:
        raise ValueError(f"wkv6: chunk_size ({chunk_size}) must be a positive multiple of subchunk_size "
                         f"({subchunk_size})")
    backend = renamed_keyword("wkv6", backend, "path", path)
    _check_inputs(r, k, v, w, u, initial_state)
    chosen = resolve_backend(backend, r.device)
    if chosen == "compiled":
        return _wkv6_compiled(r, k, v, w, u, scale, initial_state, output_final_state, chunk_size)
    if chosen in ("parallel", "sequential"):
        op = wkv6_parallel if chosen == "parallel" else wkv6_ref
        return op(r, k, v, w, u, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    return _wkv6_chunked(r, k, v, w, u, scale, initial_state, output_final_state, chunk_size, subchunk_size)


def _wkv6_chunked(r, k, v, w, u, scale, initial_state, output_final_state, chunk_size, subchunk_size):
    """The eager chunked path (module docstring, "Numerics of the chunked form")."""
    dtype = r.dtype
    r, k, v, w, u, state = _prepare(r, k, v, w, u, scale, initial_state)
    length = r.shape[2]
    if length == 0:
        return _finish(v.new_zeros(v.shape), state, dtype, output_final_state)
    pad = -length % chunk_size
    if pad:  # at the end: k = v = 0 adds nothing to the state and w = 0 leaves it undecayed
        r, k, v, w = (F.pad(t, (0, 0, 0, pad)) for t in (r, k, v, w))
    split = "b h (n s e) d -> b h n s e d"
    r, k, v, w = (rearrange(t, split, e=subchunk_size, s=chunk_size // subchunk_size) for t in (r, k, v, w))

    # Cumulative log-decays, each summed from the nearest start, so that the exponents of the largest
    # weights (near 0) carry the rounding of one sub-chunk's decay, not a chunk's, and are exactly 0
    # where nothing lies between.
    local = w.cumsum(dim=4)  # from the sub-chunk start through token i, (B, H, N, S, E, K)
    local_before = _shift_right(local)  # ... through token i - 1: bitwise the neighbour's (cum - w would round)
    subchunk_decay = local[:, :, :, :, -1]  # (B, H, N, S, K)
    through = subchunk_decay.cumsum(dim=3)  # from the chunk start through the end of sub-chunk J
    before = _shift_right(through)  # ... before sub-chunk I
    queries = r * local_before.exp()  # r_i exp(b_{i-1} - c_I), c_I the decay before sub-chunk I
    keys_to_end = k * (subchunk_decay.unsqueeze(4) - local).exp()  # k_j exp(end of J - b_j)

    out = _intra_chunk(queries, keys_to_end, r, k, v, u, local, local_before, through, before)

    # Each chunk's own contribution to the state at its end; the states entering the chunks; their readout.
    to_chunk_end = (through[:, :, :, -1:] - through).exp()  # (B, H, N, S, K)
    chunk_keys = rearrange(keys_to_end * to_chunk_end.unsqueeze(4), "b h n s e d -> b h n (s e) d")
    chunk_states = chunk_keys.transpose(-1, -2) @ rearrange(v, "b h n s e d -> b h n (s e) d")  # (B, H, N, K, V)
    decay = through[:, :, :, -1].exp().unsqueeze(-1)  # (B, H, N, K, 1)
    entering = []
    # unbind, not indexing: the backward of one unbind is one stack, while the backward of each
    # chunk_states[:, :, n] would scatter into a full-size zero tensor (quadratic in T).
    for chunk_state, chunk_decay in zip(chunk_states.unbind(2), decay.unbind(2), strict=True):
        entering.append(state)
        state = torch.addcmul(chunk_state, chunk_decay, state)
    entering = torch.stack(entering, dim=2)  # (B, H, N, K, V)
    chunk_queries = rearrange(queries * before.exp().unsqueeze(4), "b h n s e d -> b h n (s e) d")
    out = rearrange(out, "b h n s e d -> b h n (s e) d") + chunk_queries @ entering
    out = rearrange(out, "b h n c d -> b h (n c) d")[:, :, :length]
    return _finish(out, state, dtype, output_final_state)


def _shift_right(cumulative: torch.Tensor) -> torch.Tensor:
    """Exclusive from inclusive cumulative sums along dim -2: b_{i-1}, with b_{-1} = 0."""
    return F.pad(cumulative[..., :-1, :], (0, 0, 1, 0))


def _intra_chunk(queries, keys_to_end, r, k, v, u, local, local_before, through, before):
    """The sum over keys j <= i of the same chunk, all (B, H, N, S, E, *) -> (B, H, N, S, E, V).

    Earlier sub-chunks J < I: exp(b_{i-1} - b_j) = exp(b_{i-1} - c_I) exp(c_I - end of J) exp(end of J - b_j),
    three factors <= 1, so the sum is a matrix product. Same sub-chunk: exp(b_{i-1} - b_j) formed
    pairwise, exactly, for each lag d = i - j in 1..E-1 (slices, so no work on the upper triangle),
    and the bonus u on the diagonal d = 0.
    """
    subchunks, subchunk_size = r.shape[3], r.shape[4]
    pairs = torch.diag_embed(torch.einsum("bhnsik,hk,bhnsik->bhnsi", r, u, k))  # (B, H, N, S, E, E)
    for lag in range(1, subchunk_size):
        decay = (local_before[:, :, :, :, lag:] - local[:, :, :, :, :-lag]).exp()  # (B, H, N, S, E - d, K)
        lag_scores = (r[:, :, :, :, lag:] * decay * k[:, :, :, :, :-lag]).sum(-1)
        pairs = pairs + torch.diag_embed(lag_scores, offset=-lag)
    out = pairs @ v
    outputs = [out[:, :, :, 0]]
    for index in range(1, subchunks):
        gap = (before[:, :, :, index : index + 1] - through[:, :, :, :index]).exp()  # c_I - end of J, (.., I, K)
        keys = rearrange(keys_to_end[:, :, :, :index] * gap.unsqueeze(4), "b h n s e d -> b h n (s e) d")
        values = rearrange(v[:, :, :, :index], "b h n s e d -> b h n (s e) d")
        scores = queries[:, :, :, index] @ keys.transpose(-1, -2)  # (B, H, N, E, I E)
        outputs.append(out[:, :, :, index] + scores @ values)
    return torch.stack(outputs, dim=3)


# --- the compiled path (KERNEL, built on first use) ---------------------------------------------
def _wkv6_compiled(r, k, v, w, u, scale, initial_state, output_final_state, chunk_size):
    """Cast to the compute dtype (at least float32), make contiguous, run the kernel, cast back."""
    dtype = r.dtype
    compute = torch.promote_types(dtype, torch.float32)
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    r, k, v, w, u = (t.to(compute).contiguous() for t in (r, k, v, w, u))
    if initial_state is not None:
        initial_state = initial_state.to(compute).contiguous()
    out, state = run_checkpointed_kernel(KERNEL, (r, k, v, w, u), initial_state, scale, chunk_size)
    return _finish(out, state, dtype, output_final_state)


# --- dispatch -----------------------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The path `backend` runs on `device`: "compiled", "chunked", "parallel" or "sequential".
    "auto" on CPU builds the compiled kernel if needed and falls back to "chunked" with a one-time
    notice saying why; on other devices it is "chunked"; an explicit "compiled" that cannot run
    raises."""
    check_backend("wkv6", backend, BACKENDS)
    if backend in ("chunked", "parallel", "sequential"):
        return backend
    return compiled_or_eager("wkv6", backend, torch.device(device), KERNEL)


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything."""
    check_backend("wkv6", backend, BACKENDS)
    return describe_compiled_or_eager(backend, device, KERNEL, "eager chunked")


# Earlier name, kept as an alias for one release (CHANGELOG.md): the backend switch was `path`.
resolve_path = resolve_backend
