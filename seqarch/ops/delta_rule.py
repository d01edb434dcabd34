"""The delta rule and the gated delta rule: the chunked WY / UT-transform path and its sequential reference.

Yang, Wang, Zhang, Shen and Kim (2024), "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (the chunked WY / UT form, Section 3), and Yang, Kautz and Hatamizadeh (2025),
"Gated Delta Networks: Improving Mamba2 with Delta Rule" (the gate, Section 3). The signatures,
layout and semantics are those of flash-linear-attention's `chunk_delta_rule` /
`chunk_gated_delta_rule`, so either can stand in for the other.

Legend: B batch, T length, H heads, K key / query head dim, V value head dim, C chunk length,
N chunks (= ceil(T / C)). q, k: (B, T, H, K); v: (B, T, H, V); beta, g: (B, T, H); state (B, H, K, V).

Per head, with the state S (K, V), a log-gate g_t <= 0 (alpha_t = exp(g_t); alpha = 1 without a gate),
a learning rate beta_t and the query scaled by `scale` (K^-0.5 by default):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T q_t

(the paper writes the transposed state, S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
o_t = S_t q_t). Equivalently S_t = alpha_t S_{t-1} + k_t u_t^T with the "pseudo-value"
u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t): each step writes v_t over what the state recalls for k_t.

The chunked path. Inside a chunk, with gamma_i the cumulative log-gate from the chunk's start
(inclusive) and Gamma[i, j] = exp(gamma_i - gamma_j) for j <= i (0 above the diagonal), the
pseudo-values of the chunk solve one unit lower-triangular system (the UT transform):

    (I + tril(diag(beta) (K K^T o Gamma), -1)) [U | W] = [diag(beta) V | diag(beta exp(gamma)) K]
    u = U - W S_0                                   S_0: the state entering the chunk
    O = (Q o exp(gamma)) S_0 + (Q K^T o Gamma) u
    S_C = exp(gamma_C) S_0 + (K o exp(gamma_C - gamma))^T u

Everything except S_0 is known for all chunks at once, so it is computed in batched matrix
products; the chunk-to-chunk pass is the affine map S_{n+1} = M_n S_n + D_n with
M_n = exp(gamma_C) I - (K o exp(gamma_C - gamma))^T W and D_n = (K o exp(gamma_C - gamma))^T U,
one (K x K) @ (K x V) product per chunk, and the outputs are O = O_intra + (Q o exp(gamma) - A W) S_n
with A = Q K^T o Gamma, again batched over chunks.

The compiled path (backend "compiled"; seqarch/ops/csrc/delta_rule.cpp) runs the recurrence itself in
C++, one task per (batch, head) on ATen's thread pool with S in a local buffer, two passes over S per
token (r = S^T k and S^T q, then S = alpha S + k u^T), in the op's (B, T, H, .) layout without copies;
its backward walks time in reverse with the adjoint of the state, recomputing each chunk's states from
checkpoints stored every C tokens by the forward. One kernel serves both ops (g absent = alpha 1).
"auto" picks it on CPU where it builds, else the chunked path, with a one-time notice.

Numerics: every exponent is a segment sum of log-gates over a range inside one chunk, accumulated
directly from the g_t (never the difference of two long cumulative sums), and the entries above the
diagonal are set to -inf before exp. So with g_t <= 0 exp only sees numbers <= 0: a gate of -20 per
step over any length underflows to 0 instead of overflowing, and neither the forward nor the
gradient (exp(-inf) = 0 times a finite number) produces inf or NaN. Lengths that are not a multiple
of C are padded with k = v = q = 0, beta = 0 and g = 0 (the identity transition), which leaves the
final state unchanged. Half-precision inputs are computed in float32.
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
    notify_once,
    run_checkpointed_kernel,
)

Backend = Literal["auto", "compiled", "chunked", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# C of the chunked path (measured on CPU at T = 4096, H = 12, K = V = 64, docs/mixers/deltanet.md) and
# the checkpoint interval of the compiled backward.
DEFAULT_CHUNK_SIZE = 64
# -ffast-math lets the compiler vectorise the sums over V (reassociation), as for wkv6.
KERNEL = CompiledKernel("seqarch_delta_rule", os.path.join(os.path.dirname(__file__), "csrc", "delta_rule.cpp"),
                        ("-march=native", "-ffast-math"))


def resolve_backend(backend: str, device: torch.device | str, op: str = "delta_rule") -> str:
    """The path that runs for `backend` on `device`: "compiled" (the C++ CPU kernel), "chunked"
    (PyTorch matrix products) or "sequential" (the reference loop over time). "auto" on CPU builds
    the compiled kernel if needed (once, cached) and falls back to "chunked" with a one-time notice
    saying why; on other devices it is "chunked"; an explicit "compiled" that cannot run raises.
    `op` names the op in messages ("delta_rule" or "gated_delta_rule")."""
    check_backend(op, backend, BACKENDS)
    device = torch.device(device)  # a bad device name fails here, as in the other ops
    if backend in ("chunked", "sequential"):
        return backend
    return compiled_or_eager(op, backend, device, KERNEL)


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything (for `seqarch list`)."""
    check_backend("delta_rule", backend, BACKENDS)
    return describe_compiled_or_eager(backend, device, KERNEL, "chunked WY/UT")


def _check_inputs(q, k, v, g, beta, initial_state, what: str) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{what}: q and k must both be (B, T, H, K), got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, length, heads, dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (batch, length, heads):
        raise ValueError(f"{what}: v must be (B, T, H, V) = ({batch}, {length}, {heads}, V), got {tuple(v.shape)}")
    for name, tensor in (("beta", beta), ("g", g)):
        if tensor is not None and tuple(tensor.shape) != (batch, length, heads):
            raise ValueError(f"{what}: {name} must be (B, T, H) = {(batch, length, heads)}, got {tuple(tensor.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, heads, dk, v.shape[-1]):
        raise ValueError(f"{what}: initial_state must be (B, H, K, V) = {(batch, heads, dk, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


# --- the sequential reference ---------------------------------------------------------------------------
def gated_delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                          beta: torch.Tensor, state: torch.Tensor, scale: float | None = None):
    """One step of the recurrence: q, k (B, H, K), v (B, H, V), g and beta (B, H), state (B, H, K, V)
    -> (o (B, H, V), new state (B, H, K, V)). `g` None means alpha = 1 (the plain delta rule).

        S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)
    """
    dtype = _compute_dtype(q, k, v, g, beta, state)
    q, k, v, beta, state = (t.to(dtype) for t in (q, k, v, beta, state))
    if g is not None:
        state = state * torch.exp(g.to(dtype))[..., None, None]
    recalled = torch.einsum("bhk,bhkv->bhv", k, state)  # what the state returns for k_t
    state = state + torch.einsum("bhk,bhv->bhkv", k, beta[..., None] * (v - recalled))
    o = torch.einsum("bhk,bhkv->bhv", q * _scale(q, scale), state)
    return o, state


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
                    scale: float | None = None):
    """`gated_delta_rule_step` with alpha = 1."""
    return gated_delta_rule_step(q, k, v, None, beta, state, scale)


def gated_delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                         beta: torch.Tensor, scale: float | None = None, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False):
    """The gated delta rule one time step at a time (Gated DeltaNet, eq. (10); shapes as `gated_delta_rule`):

        S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   alpha_t = exp(g_t),   o_t = S_t^T q_t
    """
    _check_inputs(q, k, v, g, beta, initial_state, "gated_delta_rule_ref")
    batch, length, heads, dk = q.shape
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype
    q_scaled = q.to(dtype) * _scale(q, scale)
    k, v, beta = k.to(dtype), v.to(dtype), beta.to(dtype)
    if initial_state is None:
        S = q_scaled.new_zeros(batch, heads, dk, v.shape[-1])
    else:
        S = initial_state.to(dtype)
    outputs = []
    for t in range(length):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t, :, None, None]
        if g is not None:
            S = torch.exp(g[:, t].to(dtype))[..., None, None] * S
        # (I - beta k k^T) S + beta k v^T, written as S + beta k (v - S^T k)^T: the same matrix, without
        # forming the (K x K) product k k^T.
        recalled = torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + b_t * torch.einsum("bhk,bhv->bhkv", k_t, v_t - recalled)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_scaled[:, t], S))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o.to(out_dtype), (S if output_final_state else None)


def delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float | None = None,
                   initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """The delta rule one time step at a time (DeltaNet): S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""
    return gated_delta_rule_ref(q, k, v, None, beta, scale, initial_state, output_final_state)


# --- the chunked path -----------------------------------------------------------------------------------
def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """g (..., C) -> (..., C, C) with out[..., i, j] = sum_{j < s <= i} g_s for j <= i and -inf above the
    diagonal. Each sum is accumulated from the g_s themselves, so its rounding error is relative to
    the sum, not to a long cumulative total."""
    size = g.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=g.device)
    terms = g[..., :, None].expand(*g.shape, size).masked_fill(~ones.tril(-1), 0)  # g_i where i > j
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(0), float("-inf"))


def _invert_unit_lower(N: torch.Tensor, block: int = 16) -> torch.Tensor:
    """(I + N)^{-1} for N (..., c, c) strictly lower triangular, without autograd.

    Forward substitution by blocks: the diagonal blocks (up to `block` rows) are inverted row by row
    (row i of the inverse is e_i - N[i, :i] times the rows above it), all blocks of every chunk and
    head at once; then each block row of the inverse below them is -T_bb N[b, :b] T[:b, :b], one
    matrix product per block row. torch.linalg.solve_triangular on many small systems is many times
    slower on CPU."""
    size = N.shape[-1]
    T = torch.zeros_like(N)
    T.diagonal(dim1=-2, dim2=-1).fill_(1)
    starts = list(range(0, size, block))
    for start in starts:  # the diagonal blocks, row by row
        for i in range(start + 1, min(start + block, size)):
            T[..., i : i + 1, start:i] = -torch.matmul(N[..., i : i + 1, start:i], T[..., start:i, start:i])
    for start in starts[1:]:  # the blocks below the diagonal, block row by block row
        stop = min(start + block, size)
        below = torch.matmul(N[..., start:stop, :start], T[..., :start, :start])
        T[..., start:stop, :start] = -torch.matmul(T[..., start:stop, start:stop], below)
    return T


class _UnitLowerInverse(torch.autograd.Function):
    """T = (I + N)^{-1} for a strictly lower triangular N (..., c, c); the gradient of the inverse,
    dN = -T^T dT T^T, kept on the strictly lower triangle where N lives."""

    @staticmethod
    def forward(ctx, N):
        T = _invert_unit_lower(N.detach())
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT):
        (T,) = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return -torch.matmul(Tt, torch.matmul(dT, Tt)).tril_(-1)


def _chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    chunk = min(chunk_size, max(length, 1))
    pad = (-length) % chunk
    q, k, v, beta = (t.to(dtype) for t in (q, k, v, beta))
    q = q * scale
    if g is not None:
        g = g.to(dtype)
    if pad:
        # The identity transition on the padding: k = v = 0, beta = 0, g = 0 (alpha = 1).
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
        g = None if g is None else F.pad(g, (0, 0, 0, pad))
    # Chunk-major contiguous copies, so that every matmul below runs on contiguous batches.
    q, k, v = (rearrange(t, "b (n c) h d -> b h n c d", c=chunk).contiguous() for t in (q, k, v))
    beta = rearrange(beta, "b (n c) h -> b h n c", c=chunk)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()

    if g is None:
        decay = lower.to(dtype)  # Gamma = 1 on and below the diagonal
        k_start, k_end, q_start, chunk_decay = k, k, q, None
    else:
        g = rearrange(g, "b (n c) h -> b h n c", c=chunk)
        decay = torch.exp(_segment_sums(g))  # (B, H, N, C, C): Gamma, 0 above the diagonal
        from_start = torch.exp(g.cumsum(dim=-1))[..., None]  # exp(gamma_i), <= 1
        # exp(gamma_C - gamma_i) = exp(sum_{i < s < C} g_s): an exclusive reverse cumulative sum.
        reverse = g.flip(-1).cumsum(dim=-1).flip(-1)
        to_end = torch.exp(F.pad(reverse[..., 1:], (0, 1)))[..., None]
        chunk_decay = torch.exp(reverse[..., 0])  # exp(gamma_C), (B, H, N)
        k_start, k_end, q_start = k * from_start, k * to_end, q * from_start

    # K K^T and Q K^T in one product: [K; Q] K^T, (B, H, N, 2C, C), masked by Gamma.
    products = torch.matmul(torch.cat([k, q], dim=-2), k.transpose(-1, -2))
    kk, scores = (products * torch.cat([decay, decay], dim=-2)).split(chunk, dim=-2)
    # The UT transform: one unit lower-triangular system per chunk for U and W together.
    system = (kk * beta[..., None]).tril(-1)  # the strictly lower part; the unit diagonal is implied
    rhs = torch.cat([v, k_start], dim=-1) * beta[..., None]  # (B, H, N, C, V + K)
    solved = torch.matmul(_UnitLowerInverse.apply(system), rhs)  # [U | W]

    # A = Q K^T o Gamma (lower, incl. the diagonal) applied to [U | W]: the output from inside the chunk
    # and what the entering state subtracts; (K o exp(gamma_C - gamma))^T [U | W]: the chunk's update.
    out_intra, scores_w = torch.matmul(scores, solved).split([dv, dk], dim=-1)
    q_state = q_start - scores_w  # what reads the entering state, (B, H, N, C, K)
    D, M = torch.matmul(k_end.transpose(-1, -2), solved).split([dv, dk], dim=-1)  # (.., K, V), (.., K, K)
    identity = torch.eye(dk, dtype=dtype, device=q.device)
    M = (identity if chunk_decay is None else chunk_decay[..., None, None] * identity) - M

    # The chunk-to-chunk pass, S_{n+1} = M_n S_n + D_n: one (K x K) @ (K x V) product per chunk.
    M = rearrange(M, "b h n k j -> n (b h) k j").contiguous()
    D = rearrange(D, "b h n k v -> n (b h) k v").contiguous()
    S = q.new_zeros(batch * heads, dk, dv) if initial_state is None else initial_state.to(dtype).flatten(0, 1)
    entering = []
    for n in range(M.shape[0]):
        entering.append(S)
        S = torch.baddbmm(D[n], M[n], S)
    states = rearrange(torch.stack(entering), "n (b h) k v -> b h n k v", b=batch)
    o = out_intra + torch.matmul(q_state, states)
    o = rearrange(o, "b h n c d -> b (n c) h d")[:, :length]
    return o, (S.view(batch, heads, dk, dv) if output_final_state else None)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, backend: Backend = "auto",
                     chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The gated delta rule (as flash-linear-attention's `chunk_gated_delta_rule`).

    Args:
        q, k: (B, T, H, K) queries and keys (the layers L2-normalise them; the op does not).
        v: (B, T, H, V) values.
        g: (B, T, H) log-gates, alpha_t = exp(g_t) (<= 0 for a decay).
        beta: (B, T, H) learning rates (in (0, 1), or (0, 2) with negative eigenvalues).
        scale: multiplies q; None means K^-0.5.
        initial_state: (B, H, K, V) or None (zeros).
        output_final_state: also return the state after the last token.
        backend: "auto" | "compiled" | "chunked" | "sequential" (see `resolve_backend`).
        chunk_size: C of the chunked path; the checkpoint interval of the compiled backward
            (O(B H (T / C) K V) memory).

    Returns:
        o (B, T, H, V) in v's dtype, and the final state (B, H, K, V) (float32 or float64) or None.
    """
    _check_inputs(q, k, v, g, beta, initial_state, "gated_delta_rule")
    return _run("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state, backend, chunk_size)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float | None = None,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
               backend: Backend = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The delta rule (as flash-linear-attention's `chunk_delta_rule`): `gated_delta_rule` with alpha = 1.

    q, k (B, T, H, K), v (B, T, H, V), beta (B, T, H), initial_state (B, H, K, V) -> (o (B, T, H, V),
    final state (B, H, K, V) or None)."""
    _check_inputs(q, k, v, None, beta, initial_state, "delta_rule")
    return _run("delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state, backend, chunk_size)


def _run(op, q, k, v, g, beta, scale, initial_state, output_final_state, backend, chunk_size):
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    path = resolve_backend(backend, q.device, op)
    if path == "compiled":  # compiled_or_eager has said so
        return _compiled(q, k, v, g, beta, _scale(q, scale), initial_state, output_final_state, chunk_size)
    notify_once(f"{op}:{path}:{q.device.type}", f"{op} runs the {path} PyTorch path on {q.device.type}")
    if path == "sequential":
        return gated_delta_rule_ref(q, k, v, g, beta, scale, initial_state, output_final_state)
    o, final = _chunked(q, k, v, g, beta, _scale(q, scale), initial_state, output_final_state, chunk_size)
    return o.to(v.dtype), final


# --- the compiled path (KERNEL, built on first use) -----------------------------------------------------
def _compiled(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    """Cast to the compute dtype (at least float32), make contiguous, run the kernel, cast o back."""
    dtype, out_dtype = _compute_dtype(q, k, v, g, beta, initial_state), v.dtype
    q, k, v, beta = (t.to(dtype).contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.to(dtype).contiguous()
    if initial_state is not None:
        initial_state = initial_state.to(dtype).contiguous()
    o, final = run_checkpointed_kernel(KERNEL, (q, k, v, g, beta), initial_state, scale, chunk_size)
    return o.to(out_dtype), (final if output_final_state else None)
