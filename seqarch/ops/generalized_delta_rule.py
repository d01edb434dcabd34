"""The generalized delta rule with a diagonal-plus-rank-one transition (RWKV-7 "Goose").

Peng et al. (2025), "RWKV-7 'Goose' with Expressive Dynamic State Evolution", section 3; the chunked
form is the DPLR / WY form of Yang et al. (2024), "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length", extended to a diagonal decay. Signature, layout and semantics follow
flash-linear-attention's `chunk_dplr_delta_rule` (and its `dplr_recurrence` reference), so one can
stand in for the other.

Legend: B batch, T length, H heads, K key size, V value size, N chunks, C chunk size,
S sub-chunks per chunk, E sub-chunk size (C = S * E).

Per head, with a state S_t (K, V), query q_t, key k_t, a_t, b_t, log-decay gk_t <= 0 (all (K,)),
value v_t (V,):

    sa_t = a_t^T S_{t-1}                                   (V,)  what the rank-one term reads
    S_t  = diag(exp(gk_t)) S_{t-1} + b_t sa_t + k_t v_t^T  = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t  = scale * S_t^T q_t                               (V,)  (the state after token t)

RWKV-7 uses a = -kappa_hat, b = kappa_hat * a_in (kappa_hat the L2-normalised key, a_in the
in-context learning rate), gk = -exp(-0.5) * sigmoid(.) and scale = 1. RWKV-LM's own kernels hold
the transpose (V, K) of this state.

Forms:

- `generalized_delta_rule_ref`  the recurrence above, one token at a time (the reference).
- `generalized_delta_rule_step` one token (decoding; also the reference's body).
- `generalized_delta_rule`      backend "compiled" (the C++ CPU kernel seqarch/ops/csrc/generalized_delta_rule.cpp,
                                built on first use: the recurrence itself, one fused pass over time per (batch,
                                head) with the state in cache, backward from checkpoints every C tokens),
                                "chunked" (the eager chunked form below) or "sequential"; "auto" is "compiled"
                                on CPU where it builds, else "chunked".

The chunked form. Inside a chunk with entering state S_0 and cumulative log-decay G_t (through
token t, G_{t-1} before it; G <= 0 and non-increasing):

    SA = (I - A_ab)^-1 (A_ak V + (a * exp(G_{t-1})) S_0)                   the rank-one reads, (C, V)
    O  = (q * exp(G_t)) S_0 + A_qk V + A_qb SA
    S_C = exp(G_C) S_0 + (k * exp(G_C - G_j))^T V + (b * exp(G_C - G_j))^T SA

with A_xy[t, j] = sum_d x_t[d] y_j[d] exp(P_t[d] - G_j[d]) for j <= t (P = G, x = q) or j < t
(P = G_{t-1}, x = a). A_ab is strictly lower triangular, so I - A_ab is unit lower triangular and
the rank-one corrections of a whole chunk come from one triangular solve. Everything is matrix
products; across chunks only the reads of the entering state and the state update remain, two small
batched products per chunk.

Numerics. Every exponential taken is of a non-positive number. The pairwise factor
exp(P_t - G_j) is split at the start c_I of the query's sub-chunk I for keys j of earlier
sub-chunks J: exp(P_t - c_I) * exp(c_I - end_J) * exp(end_J - G_j), three factors <= 1, so those
blocks are matrix products of rescaled rows. Inside a sub-chunk the E x E factors are formed
pairwise from masked differences (lags 0 .. E-1). A reference point at the chunk start would
need exp(-G_j), e.g. exp(+640) for gk = -20 over 32 tokens; this form stays exact for any gk <= 0.
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
    run_checkpointed_kernel,
)

Backend = Literal["auto", "compiled", "chunked", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_CHUNK_SIZE = 32
DEFAULT_SUBCHUNK_SIZE = 8
# -ffast-math lets the compiler vectorise the sums over V (reassociation) and exp over K; where the CPU
# has AVX-512, 512-bit vectors run a 64-wide row in four instructions (GCC prefers 256 bits by default).
KERNEL = CompiledKernel("seqarch_generalized_delta_rule",
                        os.path.join(os.path.dirname(__file__), "csrc", "generalized_delta_rule.cpp"),
                        ("-march=native", "-mprefer-vector-width=512", "-ffast-math"))


def _check_inputs(q, k, v, a, b, gk, initial_state) -> None:
    if q.ndim != 4 or any(t.shape != q.shape for t in (k, a, b, gk)):
        shapes = ", ".join(f"{name} {tuple(t.shape)}"
                           for name, t in zip("q k a b gk".split(), (q, k, a, b, gk), strict=True))
        raise ValueError(f"generalized_delta_rule: q, k, a, b, gk must share one shape (B, T, H, K), got {shapes}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"generalized_delta_rule: v must be (B, T, H, V) with (B, T, H) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    expected = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"generalized_delta_rule: initial_state must be (B, H, K, V) = {expected}, "
                         f"got {tuple(initial_state.shape)}")


def _prepare(q, k, v, a, b, gk, scale, initial_state):
    """Validate; cast to the compute dtype (at least float32); fold `scale` into q; the initial state."""
    _check_inputs(q, k, v, a, b, gk, initial_state)
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, a, b, gk = (t.to(compute) for t in (q, k, v, a, b, gk))
    if initial_state is None:
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    else:
        state = initial_state.to(compute)
    return q * scale, k, v, a, b, gk, state


def _finish(out, state, dtype, output_final_state):
    return out.to(dtype), (state.to(dtype) if output_final_state else None)


def generalized_delta_rule_step(q_t, k_t, v_t, a_t, b_t, gk_t, state, scale: float | None = None,
                                backend: Backend = "sequential"):
    """One token: q_t, k_t, a_t, b_t, gk_t (B, H, K), v_t (B, H, V), state (B, H, K, V) ->
    (o_t (B, H, V), new state (B, H, K, V)). Computed in `state`'s dtype (at least float32 on the kernel).

    backend "sequential" (the default, and the reference's body) runs it in PyTorch; "auto" / "compiled"
    run the compiled kernel's forward on one token where `resolve_backend` picks it and no gradient is
    needed (decoding): at batch 1, H = 12, K = V = 64 that call costs about a quarter of the PyTorch
    step's six small ops (docs/mixers/rwkv7.md)."""
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    inputs = (q_t, k_t, v_t, a_t, b_t, gk_t)
    if backend != "sequential" and not (torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, state))):
        if resolve_backend(backend, q_t.device) == "compiled":
            dtype = torch.promote_types(state.dtype, torch.float32)
            tokens = [t.to(dtype).unsqueeze(1).contiguous() for t in inputs]  # (B, 1, H, K)
            out, final, _ = KERNEL.load().forward(*tokens, state.to(dtype).contiguous(), float(scale), 1, False)
            return out[:, 0].to(state.dtype), final.to(state.dtype)
    q_t, k_t, v_t, a_t, b_t, gk_t = (t.to(state.dtype) for t in inputs)
    read = torch.einsum("bhk,bhkv->bhv", a_t, state)  # sa_t = a_t^T S_{t-1}
    state = (gk_t.exp().unsqueeze(-1) * state + b_t.unsqueeze(-1) * read.unsqueeze(-2)
             + k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
    return torch.einsum("bhk,bhkv->bhv", q_t * scale, state), state


def generalized_delta_rule_ref(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False):
    """The recurrence of the module docstring, one token at a time (RWKV-7 paper, eq. 13-16).

    q, k, a, b, gk (B, T, H, K), v (B, T, H, V), initial_state (B, H, K, V) or None.
    Returns (o (B, T, H, V), final state (B, H, K, V) or None), in q's dtype.
    """
    dtype = q.dtype
    q, k, v, a, b, gk, state = _prepare(q, k, v, a, b, gk, scale, initial_state)
    outputs = []
    for t in range(q.shape[1]):
        out_t, state = generalized_delta_rule_step(q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], gk[:, t], state,
                                                   scale=1.0)
        outputs.append(out_t)
    out = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return _finish(out, state, dtype, output_final_state)


def generalized_delta_rule(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False,
                           backend: Backend = "auto", *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           subchunk_size: int = DEFAULT_SUBCHUNK_SIZE):
    """The generalized delta rule on the path `backend` selects (module docstring).

    Args:
        q, k (B, T, H, K): queries (RWKV-7's receptance r) and keys.
        v (B, T, H, V): values.
        a, b (B, T, H, K): the rank-one transition b_t a_t^T (RWKV-7: a = -kappa_hat, b = kappa_hat * a_in).
        gk (B, T, H, K): log-decay, gk <= 0.
        scale: multiplies q; None means K^-0.5 (as flash-linear-attention; RWKV-7 uses 1.0).
        initial_state (B, H, K, V) or None (zeros).
        output_final_state: return the state after the last token.
        backend: "auto", "compiled" (the C++ CPU kernel), "chunked" or "sequential" (the reference loop);
            "auto" is "compiled" on CPU where the kernel builds, else "chunked" (`resolve_backend`).
        chunk_size, subchunk_size: C and E of the chunked form (E divides C); C is also the checkpoint
            interval of the compiled backward.

    Returns:
        (o (B, T, H, V), final state (B, H, K, V) or None), in q's dtype; computed in at least float32.
        Chunked: O(T (C + K) (K + V)) time, O(T (C + K + V) + (T / C) K (K + V)) memory per head.
        Compiled: O(T K V) time, O(T (K + V) + (T / C) K V) memory per head (checkpoints only when a
        gradient is needed).
    """
    if chunk_size < 1 or subchunk_size < 1 or chunk_size % subchunk_size:
        raise ValueError(f"generalized_delta_rule: chunk_size ({chunk_size}) must be a positive multiple of "
                         f"subchunk_size ({subchunk_size})")
    _check_inputs(q, k, v, a, b, gk, initial_state)
    chosen = resolve_backend(backend, q.device)
    if chosen == "compiled":
        return _compiled(q, k, v, a, b, gk, scale, initial_state, output_final_state, chunk_size)
    if chosen == "sequential":
        return generalized_delta_rule_ref(q, k, v, a, b, gk, scale, initial_state, output_final_state)
    return _chunked(q, k, v, a, b, gk, scale, initial_state, output_final_state, chunk_size, subchunk_size)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The path `backend` runs on `device`: "compiled", "chunked" or "sequential". "auto" on CPU builds
    the compiled kernel if needed and falls back to "chunked" with a one-time notice saying why; on other
    devices it is "chunked"; an explicit "compiled" that cannot run raises."""
    check_backend("generalized_delta_rule", backend, BACKENDS)
    if backend in ("chunked", "sequential"):
        return backend
    return compiled_or_eager("generalized_delta_rule", backend, torch.device(device), KERNEL)


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything."""
    check_backend("generalized_delta_rule", backend, BACKENDS)
    return describe_compiled_or_eager(backend, device, KERNEL, "eager chunked DPLR")


# --- the compiled path (KERNEL, built on first use) ---------------------------------------------
def _compiled(q, k, v, a, b, gk, scale, initial_state, output_final_state, chunk_size):
    """Cast to the compute dtype (at least float32), make contiguous, run the kernel, cast back."""
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, a, b, gk = (t.to(compute).contiguous() for t in (q, k, v, a, b, gk))
    if initial_state is not None:
        initial_state = initial_state.to(compute).contiguous()
    out, state = run_checkpointed_kernel(KERNEL, (q, k, v, a, b, gk), initial_state, scale, chunk_size)
    return _finish(out, state, dtype, output_final_state)


# --- the chunked form ----------------------------------------------------------------------------
def _shift_right(cumulative: torch.Tensor) -> torch.Tensor:
    """Exclusive from inclusive cumulative sums along dim -2 (b_{i-1}, with b_{-1} = 0)."""
    return F.pad(cumulative[..., :-1, :], (0, 0, 1, 0))


def _chunked(q, k, v, a, b, gk, scale, initial_state, output_final_state, chunk_size, subchunk_size):
    dtype = q.dtype
    q, k, v, a, b, gk, state = _prepare(q, k, v, a, b, gk, scale, initial_state)
    length = q.shape[1]
    if length == 0:
        return _finish(v.new_zeros(v.shape), state, dtype, output_final_state)
    chunk_size = min(chunk_size, -(-length // subchunk_size) * subchunk_size)  # short inputs: one chunk
    pad = -length % chunk_size
    if pad:  # at the end: k = v = a = b = 0 adds and reads nothing; gk = 0 leaves the state undecayed
        q, k, v, a, b, gk = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v, a, b, gk))
    subchunks = chunk_size // subchunk_size
    split = "b (n s e) h d -> b h n s e d"
    q, k, v, a, b, gk = (rearrange(t, split, s=subchunks, e=subchunk_size) for t in (q, k, v, a, b, gk))

    # Cumulative log-decays, each from the nearest start (sub-chunk, then chunk), so the exponents of
    # the largest factors carry the rounding of one sub-chunk's sum.
    local = gk.cumsum(dim=4)  # G through token i, from its sub-chunk start, (B, H, N, S, E, K)
    local_before = _shift_right(local)  # ... through token i - 1
    sub_total = local[:, :, :, :, -1]  # (B, H, N, S, K)
    through = sub_total.cumsum(dim=3)  # from the chunk start through the end of sub-chunk J
    before = _shift_right(through)  # ... before sub-chunk I

    queries = torch.stack([q, a])  # the two query kinds: q reads S_t (through i), a reads S_{t-1} (before i)
    query_decay = torch.stack([local, local_before])
    keys = torch.stack([k, b])  # (2, B, H, N, S, E, K)
    # Rows rescaled by factors <= 1, shared by the scores and the chunk-level products:
    scaled_queries = queries * query_decay.exp()  # x_t exp(P_t - c_I), c_I the start of sub-chunk I
    scaled_keys = keys * (sub_total.unsqueeze(4) - local).exp()  # y_j exp(end_J - G_j)
    scores = _intra_chunk_scores(queries, query_decay, keys, scaled_queries, scaled_keys, local, through, before)
    (a_qk, a_qb), (a_ak, a_ab) = scores  # (B, H, N, C, C) each

    # Chunk-level rows: x_t exp(P_t) from the chunk start, and y_j exp(G_C - G_j) to its end, each a product
    # of factors <= 1. G_C - G_j is split as (the later sub-chunks' decay) + (the decay after j in its own
    # sub-chunk): exactly 0 for the last token, and the largest factors carry one sub-chunk's rounding.
    later = F.pad(sub_total.flip(3).cumsum(3).flip(3)[:, :, :, 1:], (0, 0, 0, 1))  # (B, H, N, S, K)
    to_chunk = "x b h n s e d -> x b h n (s e) d"
    chunk_queries = rearrange(scaled_queries * before.exp().unsqueeze(4), to_chunk)  # (2, B, H, N, C, K)
    keys_to_end = rearrange(scaled_keys * later.exp().unsqueeze(4), to_chunk)
    v = rearrange(v, "b h n s e d -> b h n (s e) d")
    total = through[:, :, :, -1]  # G_C, (B, H, N, K)

    # The rank-one reads of the chunk, SA = U + W_t S_0 with U = T A_ak V, W_t = T (a exp(G_{t-1})) and
    # T = (I - A_ab)^-1 from one unit-lower-triangular solve (C right-hand sides: cheaper than solving
    # for the V + K columns, which LAPACK would also want copied to column-major order).
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    inverse = torch.linalg.solve_triangular(eye - a_ab, eye.expand_as(a_ab), upper=False, unitriangular=True)
    u = inverse @ (a_ak @ v)  # (B, H, N, C, V)
    w_t = inverse @ chunk_queries[1]  # (B, H, N, C, K)

    # Across chunks, one chunk at a time: its reads SA = U + W_t S_n, then
    # S_{n+1} = exp(G_C) S_n + K~^T V + B~^T SA with K~ = k exp(G_C - G_j), B~ = b exp(G_C - G_j).
    b_end = keys_to_end[1].transpose(-1, -2)  # (B, H, N, K, C)
    update = keys_to_end[0].transpose(-1, -2) @ v  # (B, H, N, K, V)
    chunk_decay = total.exp().unsqueeze(-1)  # (B, H, N, K, 1)
    entering, reads = [], []
    state = state.flatten(0, 1)  # (B H, K, V)
    # unbind, not indexing: the backward of one unbind is one stack (indexing would scatter per chunk).
    per_chunk = (t.flatten(0, 1).unbind(1) for t in (u, w_t, b_end, update, chunk_decay))
    for chunk_u, chunk_w, chunk_b, chunk_update, decay in zip(*per_chunk, strict=True):
        entering.append(state)
        read = torch.baddbmm(chunk_u, chunk_w, state)  # (B H, C, V)
        reads.append(read)
        state = torch.baddbmm(torch.addcmul(chunk_update, decay, state), chunk_b, read)
    entering = torch.stack(entering, dim=1).view(*u.shape[:3], *state.shape[-2:])  # (B, H, N, K, V)
    reads = torch.stack(reads, dim=1).view_as(u)  # SA, (B, H, N, C, V)
    state = state.view(*u.shape[:2], *state.shape[-2:])

    out = chunk_queries[0] @ entering + a_qk @ v + a_qb @ reads
    out = rearrange(out, "b h n c d -> b (n c) h d")[:, :length]
    return _finish(out, state, dtype, output_final_state)


def _intra_chunk_scores(queries, query_decay, keys, scaled_queries, scaled_keys, local, through, before):
    """A[x, y][t, j] = sum_d x_t[d] y_j[d] exp(P_t[d] - G_j[d]) within each chunk, for the query kinds
    x (q with P = G through t, j <= t; a with P = G before t, j < t) and key kinds y (k, b).

    queries, query_decay, keys (2, B, H, N, S, E, K) (query_decay holds P from the sub-chunk start), and
    scaled_queries = queries exp(query_decay), scaled_keys = keys exp(end of sub-chunk - G);
    local (B, H, N, S, E, K) holds G from the sub-chunk start, through / before (B, H, N, S, K) the
    chunk-level G at the end / start of each sub-chunk. Returns (2, 2, B, H, N, C, C).
    """
    subchunks, subchunk_size = local.shape[3], local.shape[4]
    # Within a sub-chunk: exact pairwise factors, one lag d = t - j at a time (no upper-triangle work).
    # Lag 0 has factor exp(0) = 1 and only q reads it (a reads the state before its own token).
    diagonal = torch.zeros(2, 2, *local.shape[:-1], subchunk_size, dtype=local.dtype, device=local.device)
    positions = torch.arange(subchunk_size, device=local.device)
    diagonal[0, :, ..., positions, positions] = (queries[0].unsqueeze(0) * keys).sum(-1)
    for lag in range(1, subchunk_size):
        decay = (query_decay[..., lag:, :] - local[..., : subchunk_size - lag, :]).exp()  # (2, .., E - d, K)
        weighted = (queries[..., lag:, :] * decay).unsqueeze(1)  # (2, 1, .., E - d, K)
        lag_scores = (weighted * keys[..., : subchunk_size - lag, :].unsqueeze(0)).sum(-1)  # (2, 2, .., E - d)
        diagonal[..., positions[lag:], positions[: subchunk_size - lag]] = lag_scores

    # Earlier sub-chunks J < I of the same chunk: rescaled rows, three factors <= 1, matrix products with
    # both query kinds stacked as rows and both key kinds as columns.
    scaled_queries = rearrange(scaled_queries, "x b h n s e d -> b h n s (x e) d")
    blocks = [diagonal]
    for index in range(1, subchunks):
        gap = (before[:, :, :, index : index + 1] - through[:, :, :, :index]).exp()  # c_I - end_J, (B,H,N,I,K)
        earlier = rearrange(scaled_keys[:, :, :, :, :index] * gap.unsqueeze(-2), "y b h n s e d -> b h n (y s e) d")
        scores = scaled_queries[:, :, :, index] @ earlier.transpose(-1, -2)  # (B, H, N, 2E, 2 I E)
        blocks.append(rearrange(scores, "b h n (x e) (y s f) -> x y b h n s e f", x=2, y=2, s=index))
    rows = []
    for index in range(subchunks):
        row = []
        if index:
            row.append(rearrange(blocks[index], "x y b h n s e f -> x y b h n e (s f)"))
        row.append(diagonal[:, :, :, :, :, index])
        row.append(diagonal.new_zeros(*diagonal.shape[:5], subchunk_size, (subchunks - index - 1) * subchunk_size))
        rows.append(torch.cat(row, dim=-1))
    return torch.cat(rows, dim=-2)
