"""Mamba-2's SSD scan (state-space duality): the chunked parallel algorithm and its sequential reference.

Dao and Gu (2024), "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", Section 6 and Listing 1. The signature and semantics are those of
mamba-ssm's `mamba_chunk_scan_combined`, so either can stand in for the other.

Legend: B batch, L length, H heads, P head dim, G groups of B/C (head h reads group h // R),
R heads per group (= H / G), N state size, Q chunk length, K chunks (= ceil(L / Q)).

Per head, with a scalar decay A < 0 and a step dt_t >= 0 (eq. (2) of the paper, A_t = exp(dt_t A)):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          h_t: (P, N)
    y_t = h_t C_t + D x_t,       then y_t *= silu(z_t) when z is given

Unrolled, y = (M x) with the semiseparable matrix M[t, s] = C_t^T B_s dt_s exp(sum_{s < j <= t} dt_j A)
for s <= t. The chunked algorithm splits M into Q x Q blocks:

    1. diagonal blocks: the quadratic form (C B^T o exp(segsum(dt A))) (dt x) inside each chunk
    2. each chunk's own final state  S_k = sum_s exp(sum_{s < j <= end} dt_j A) dt_s x_s B_s^T
    3. state passing between chunks  S_k <- exp(sum_{j in chunk k} dt_j A) S_{k-1} + S_k, in blocks of
       ~sqrt(K) chunks (`pass_states`), so its cost is O(L sqrt(L / Q)) instead of Listing 1's O(L^2 / Q)
    4. off-diagonal blocks: the state entering chunk k read out by C, decayed to each position.

Numerics: every exponent is a segment sum of dt A <= 0 taken from cumulative sums, and the entries
above the diagonal are masked to -inf before exp, so exp only ever sees non-positive numbers and
neither it nor its gradient overflows. Within a chunk the segment sums are differences of the
chunk-local cumulative sum (as mamba-ssm's kernels do; the rounding error is eps times one chunk's
total decay). Across chunks, where totals of the whole sequence would be differenced, segment sums
are accumulated directly from the masked chunk totals (the "stable segsum" of Listing 1).
Layouts: the products with B and C run on x's own (B, L, H, P) layout, which for G = 1 needs no
copy; only the eager path's per-head (Q, Q) blocks use a head-major copy of dt x.
Lengths that are not a multiple of Q are padded with dt = 0 (decay 1, no input), which leaves the
final state unchanged.

Paths (`ssd(..., backend=)`, resolved by `resolve_backend`):
- "compiled" (`ssd_compiled`): the same four steps, with steps 1 and 3 in a C++ CPU kernel
  (seqarch/ops/csrc/ssd.cpp, forward and backward; built on first use): the diagonal blocks one
  (chunk, head) at a time in cache, written straight into x's layout (no (Q, Q) decay tensor, no
  head-major copy), and the state passing as the plain recurrence over chunks, one streaming pass
  (no blocks needed: it is not a chain of synchronised PyTorch calls); float32 and float64, other
  dtypes run "chunked";
- "chunked" (`ssd_chunked`): the algorithm above in PyTorch;
- "sequential": `ssd_ref`, the recurrence one step at a time (the reference);
- "auto": mamba-ssm's Triton kernel `mamba_chunk_scan_combined` on a CUDA device where mamba-ssm
  imports; on CPU "compiled" where the kernel builds, else "chunked", with a one-time notice.
"""

from __future__ import annotations

import math
import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.autograd.function import once_differentiable

from seqarch.backends import (
    CompiledKernel,
    check_backend,
    compiled_or_eager,
    cuda_kernels_usable,
    describe_compiled_or_eager,
    notify_once,
)

Backend = Literal["auto", "compiled", "chunked", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# Measured on CPU at L = 4096, 48 heads of 32 x 64 (docs/mixers/mamba2.md): 32 and 64 are within
# noise for the op, 128 and 256 are slower.
DEFAULT_CHUNK_SIZE = 64
KERNEL = CompiledKernel("seqarch_ssd", os.path.join(os.path.dirname(__file__), "csrc", "ssd.cpp"), ("-march=native",))


def _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states) -> None:
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be (B, L, H, P), got shape {tuple(x.shape)}")
    batch, length, heads, headdim = x.shape
    if B.ndim != 4 or B.shape[:2] != (batch, length) or C.shape != B.shape:
        raise ValueError(f"ssd: B and C must both be (B, L, G, N) = ({batch}, {length}, G, N), "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    groups, dstate = B.shape[2:]
    if heads % groups:
        raise ValueError(f"ssd: the number of heads H={heads} must be a multiple of the groups G={groups}")
    expected = {
        "dt": (dt, [(batch, length, heads)]),
        "A": (A, [(heads,)]),
        "D": (D, [(heads,), (heads, headdim)]),
        "z": (z, [(batch, length, heads, headdim)]),
        "dt_bias": (dt_bias, [(heads,)]),
        "initial_states": (initial_states, [(batch, heads, headdim, dstate)]),
    }
    for name, (tensor, shapes) in expected.items():
        if tensor is not None and tuple(tensor.shape) not in shapes:
            valid = " or ".join(str(shape) for shape in shapes)
            raise ValueError(f"ssd: {name} must have shape {valid}, got {tuple(tensor.shape)}")


def _discretize(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    if dt_bias is not None:
        dt = dt + dt_bias
    return F.softplus(dt) if dt_softplus else dt


def _skip_and_gate(y, x, D, z):
    """y += D x (D per head or per head channel), then y *= silu(z)."""
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y


def segsum_stable(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T) with out[..., t, s] = sum_{s < j <= t} a_j for t >= s, -inf above
    the diagonal. Each segment is accumulated from the masked inputs themselves, never as a
    difference of two long cumulative sums (Listing 1's `segsum`)."""
    size = a.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=a.device)
    terms = repeat(a, "... t -> ... t s", s=size).masked_fill(~ones.tril(-1), 0)  # a_t where t > s
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(0), float("-inf"))


def _intra_chunk_decay(cum: torch.Tensor) -> torch.Tensor:
    """cum (..., Q) -> exp(cum_q - cum_s) for s <= q, 0 above the diagonal: (..., Q, Q)."""
    chunk = cum.shape[-1]
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=cum.device).triu(1)
    # Masked before exp, so exp only sees segment sums <= 0; in place, as these (Q x Q)-per-head
    # tensors are the largest of the op.
    return (cum[..., :, None] - cum[..., None, :]).masked_fill_(above, float("-inf")).exp_()


class _DiagonalBlocks(torch.autograd.Function):
    """y = (decay o C B^T) (dt x) in every chunk and head, decay = exp(segsum(dt A)).

    Head-major: cum (B, G, R, K, Q) chunk-local cumsum of dt A, scores (B, G, 1, K, Q, Q) = C B^T
    (shared by the R heads of a group), X (B, G, R, K, Q, P) = dt x -> (B, G, R, K, Q, P). The
    backward is written out so that it makes four passes over the (Q, Q) blocks instead of the eight
    of autograd's chain: dW = dy X^T, dscores = sum_R dW o decay, dsegment = dW o decay o scores,
    dcum = row - column sums.
    """

    @staticmethod
    def forward(ctx, cum, scores, X):
        decay = _intra_chunk_decay(cum)
        ctx.save_for_backward(decay, scores, X)
        return torch.matmul(decay * scores, X)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        decay, scores, X = ctx.saved_tensors
        weights = decay * scores
        dX = torch.matmul(weights.transpose(-1, -2), dy)
        d_weights = torch.matmul(dy, X.transpose(-1, -2)).mul_(decay)
        d_scores = d_weights.sum(dim=2, keepdim=True)
        d_segment = d_weights.mul_(scores)
        d_cum = d_segment.sum(dim=-1) - d_segment.sum(dim=-2)
        return d_cum, d_scores, dX


def pass_states(chunk_states: torch.Tensor, totals: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Step 3, the state entering every chunk: S_0 = initial, S_{k+1} = exp(totals_k) S_k + chunk_states_k.

    chunk_states (B, K, H, S) (S the flattened (P, N) state), totals (B, K, H) each chunk's sum of
    dt A (<= 0), initial (B, H, S) -> (B, H, K + 1, S), S_0 .. S_K (S_K the final state).

    Listing 1 takes all K + 1 states in one product with the (K + 1) x (K + 1) matrix of decays
    between chunks, which costs O(K^2) per state entry and dominates at long L; one chunk at a time
    costs K small operations, each a thread synchronisation. In between, two levels: the K + 1
    entries in blocks of T ~ sqrt(K + 1), the same product inside every block (T x T), then across the
    block ends (J x J, J = number of blocks), and each block's entering carry decayed to its positions:
    O(sqrt K) per entry, a fixed number of operations.
    """
    batch, chunks, heads, size = chunk_states.shape
    count = chunks + 1
    block = math.isqrt(count - 1) + 1  # T >= sqrt(K + 1)
    blocks = -(-count // block)  # J
    pad = blocks * block - count
    # Entry m receives the decay of chunk m - 1 (none for the initial state); the padding neither
    # decays nor adds anything.
    entries = torch.cat([initial[:, :, None], rearrange(chunk_states, "b k h s -> b h k s"),
                         initial.new_zeros(batch, heads, pad, size)], dim=2)
    logs = rearrange(F.pad(rearrange(totals, "b k h -> b h k"), (1, pad)), "b h (j t) -> b h j t", t=block)
    entries = rearrange(entries, "b h (j t) s -> b h j t s", t=block)
    local = torch.matmul(torch.exp(segsum_stable(logs)), entries)  # (B, H, J, T, S): from inside the block
    ends = torch.matmul(torch.exp(segsum_stable(logs.sum(dim=-1))), local[:, :, :, -1])  # (B, H, J, S)
    carry = F.pad(ends[:, :, :-1], (0, 0, 1, 0))  # the state entering block j: the end of block j - 1
    states = torch.addcmul(local, torch.exp(logs.cumsum(dim=-1))[..., None], carry[:, :, :, None])
    return rearrange(states, "b h j t s -> b h (j t) s")[:, :, :count]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The path `backend` runs on `device`: "cuda" (mamba-ssm's kernel), "compiled", "chunked" or
    "sequential". "auto" takes the CUDA kernel only on a CUDA device where mamba-ssm imports; on CPU
    "compiled" where the C++ kernel builds, else "chunked" with a one-time notice; an explicit choice
    is kept (an explicit "compiled" that cannot run raises)."""
    check_backend("ssd", backend, BACKENDS)
    if backend in ("chunked", "sequential"):
        return backend
    device = torch.device(device)
    if backend == "auto" and cuda_kernels_usable("mamba_ssm", device):
        notify_once(f"ssd:cuda:{device.type}", f"ssd runs the cuda path on {device.type}")
        return "cuda"
    return compiled_or_eager("ssd", backend, device, KERNEL)


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything."""
    check_backend("ssd", backend, BACKENDS)
    if backend == "auto" and cuda_kernels_usable("mamba_ssm", device):
        return "backend=auto: mamba-ssm CUDA kernel"
    if backend in ("chunked", "sequential"):
        return f"backend={backend}: " + {"chunked": "chunked SSD (PyTorch)",
                                         "sequential": "sequential reference"}[backend]
    return describe_compiled_or_eager(backend, device, KERNEL, "chunked SSD")


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk_size: int = DEFAULT_CHUNK_SIZE, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
        dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
        dt_softplus: bool = False, return_final_states: bool = False, *, backend: Backend = "auto"):
    """The SSD scan, on the path `backend` picks (module docstring); mamba-ssm's
    `mamba_chunk_scan_combined` signature.

    x (B, L, H, P), dt (B, L, H), A (H,), B and C (B, L, G, N), D (H,) or (H, P), z (B, L, H, P),
    dt_bias (H,), initial_states (B, H, P, N). dt <- softplus(dt + dt_bias) when dt_softplus.
    Returns y (B, L, H, P), and the final state (B, H, P, N) when return_final_states.
    """
    arguments = {"D": D, "z": z, "dt_bias": dt_bias, "initial_states": initial_states, "dt_softplus": dt_softplus,
                 "return_final_states": return_final_states}
    chosen = resolve_backend(backend, x.device)
    if chosen == "cuda":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, **arguments)
    if chosen == "sequential":
        return ssd_ref(x, dt, A, B, C, **arguments)
    if chosen == "compiled" and x.dtype in (torch.float32, torch.float64):
        return ssd_compiled(x, dt, A, B, C, chunk_size, **arguments)
    return ssd_chunked(x, dt, A, B, C, chunk_size, **arguments)


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int = DEFAULT_CHUNK_SIZE, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                dt_softplus: bool = False, return_final_states: bool = False):
    """The chunked SSD scan in PyTorch (the module docstring's four steps); arguments as `ssd`."""
    return _chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states,
                    compiled=False)


def ssd_compiled(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                 dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                 dt_softplus: bool = False, return_final_states: bool = False):
    """The chunked SSD scan with steps 1 and 3 in the C++ kernel (float32 / float64); arguments as `ssd`."""
    return _chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states,
                    compiled=True)


def _diagonal_blocks_eager(x, dt, cum, scores, groups):
    """Step 1 in PyTorch: x (B, T, H, P), dt (B, T, H), cum (B, K, Q, H), scores (B, K, G, Q, Q)
    -> y (B, K, Q, H, P)."""
    chunk = cum.shape[2]
    X = rearrange(x * dt[..., None], "b (k q) (g r) p -> b g r k q p", q=chunk, g=groups).contiguous()
    cum_heads = rearrange(cum, "b k q (g r) -> b g r k q", g=groups).contiguous()  # so decay is head-major too
    y = _DiagonalBlocks.apply(cum_heads, rearrange(scores, "b k g q s -> b g 1 k q s"), X)
    return rearrange(y, "b g r k q p -> b k q (g r) p")


class _CompiledChunkOutput(torch.autograd.Function):
    """Steps 1 and 4 and the skip in the C++ kernel (seqarch/ops/csrc/ssd.cpp): x (B, T, H, P) (channels
    contiguous), dt (B, T, H), cum (B, K, Q, H), scores (B, K, G, Q, Q) as `_diagonal_blocks_eager`, and
    optionally y_off (B, K, G, Q, R P) (step 4's C read-out of the entering states) and D (H, P):
    -> y (B, T, H, P) = diagonal blocks + exp(cum) y_off + D x, written once in x's layout."""

    @staticmethod
    def forward(ctx, x, dt, cum, scores, y_off, D):
        chunk = cum.shape[2]
        ctx.save_for_backward(x, dt, cum, scores, y_off, D)
        return KERNEL.load().blocks_forward(x, dt, cum, scores, chunk, y_off, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, dt, cum, scores, y_off, D = ctx.saved_tensors
        return tuple(KERNEL.load().blocks_backward(x, dt, cum, scores, dy.contiguous(), cum.shape[2], y_off, D))


def _pass_states_eager(chunk_states, totals, initial):
    """Step 3 in PyTorch: chunk_states (B, K, H, S), totals (B, K, H), initial (B, H, S) or None ->
    the states entering chunks 0 .. K (the last the final state), (B, K + 1, H, S)."""
    if initial is None:
        initial = chunk_states.new_zeros(chunk_states.shape[0], *chunk_states.shape[2:])
    return rearrange(pass_states(chunk_states, totals, initial), "b h k s -> b k h s")


class _CompiledStatePassing(torch.autograd.Function):
    """Step 3 in the C++ kernel (seqarch/ops/csrc/ssd.cpp): arguments as `_pass_states_eager`; one streaming
    pass over the states per chunk, written in the layout the read-out by C takes."""

    @staticmethod
    def forward(ctx, chunk_states, totals, initial):
        totals = totals.contiguous()
        states = KERNEL.load().states_forward(chunk_states.contiguous(), totals, initial)
        ctx.save_for_backward(totals, states)
        ctx.has_initial = initial is not None
        return states

    @staticmethod
    @once_differentiable
    def backward(ctx, dstates):
        totals, states = ctx.saved_tensors
        grads, dtotals = KERNEL.load().states_backward(totals, states, dstates.contiguous())
        return grads[:, 1:], dtotals, (grads[:, 0] if ctx.has_initial else None)


def _chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states, compiled):
    _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be >= 1, got {chunk_size}")
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2:]
    dt = _discretize(dt, dt_bias, dt_softplus)
    chunk = min(chunk_size, length)
    pad = (-length) % chunk
    if pad:
        # dt = 0 on the padding: decay exp(0) = 1 and no input, so the final state is untouched.
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    if compiled:  # the kernel reads x's rows where they lie, but needs its channels contiguous
        x = x if x.stride(-1) == 1 else x.contiguous()
        dt = dt.contiguous()

    # dt x stays in x's own (B, L, H, P) = (B, K, Q, G, R P) layout for the products with B and C, whose
    # (Q, N) blocks all R heads of a group share.
    cum = rearrange(dt * A, "b (k q) h -> b k q h", q=chunk).cumsum(dim=2)  # (B, K, Q, H)
    dt_c = rearrange(dt, "b (k q) (g r) -> b k q g r 1", q=chunk, g=groups)
    x_c = rearrange(x, "b (k q) (g r) p -> b k q g r p", q=chunk, g=groups)
    Bc = rearrange(B, "b (k q) g n -> b k q g n", q=chunk)
    Cc = rearrange(C, "b (k q) g n -> b k q g n", q=chunk)

    # 1. Diagonal blocks: masked decay times C B^T, applied to dt x (compiled: computed with step 4, below).
    scores = torch.einsum("bkqgn,bksgn->bkgqs", Cc, Bc)  # (B, K, G, Q, Q)
    if not compiled:
        y = _diagonal_blocks_eager(x, dt, cum, scores, groups)  # (B, K, Q, H, P)

    # 2. Each chunk's final state from its own inputs: x scaled by dt and the decay to the chunk's end.
    to_end = torch.exp(cum[:, :, -1:] - cum)  # (B, K, Q, H)
    x_end = x_c * (dt_c * rearrange(to_end, "b k q (g r) -> b k q g r 1", g=groups))
    # (R P, Q) @ (Q, N) per chunk and group; for G = 1 neither operand is copied.
    chunk_states = torch.matmul(rearrange(x_end, "b k q g r p -> b k g (r p) q"),
                                rearrange(Bc, "b k q g n -> b k g q n"))  # (B, K, G, R P, N)

    # 3. State passing: the state entering chunk k, k = 0 .. K (K = the final state), (B, K + 1, H, P N).
    initial = None if initial_states is None else rearrange(initial_states.to(x.dtype), "b h p n -> b h (p n)")
    passing = _CompiledStatePassing.apply if compiled else _pass_states_eager
    states = passing(rearrange(chunk_states, "b k g (r p) n -> b k (g r) (p n)", p=headdim), cum[:, :, -1], initial)
    entering = rearrange(states[:, :-1], "b k (g r) (p n) -> b k g (r p) n", g=groups, n=dstate)

    # 4. Off-diagonal blocks: the entering state read out by C, decayed to each position; plus the skip D x.
    y_off = torch.matmul(rearrange(Cc, "b k q g n -> b k g q n"), entering.transpose(-1, -2))  # (B, K, G, Q, R P)
    if compiled:
        skip = None if D is None else (D[:, None] if D.ndim == 1 else D).to(x.dtype).expand(heads, headdim).contiguous()
        y = _CompiledChunkOutput.apply(x, dt, cum, scores.contiguous(), y_off.contiguous(), skip)[:, :length]
    else:
        y_off = rearrange(y_off, "b k g q (r p) -> b k q (g r) p", p=headdim)
        y = rearrange((y_off * torch.exp(cum)[..., None]).add_(y), "b k q h p -> b (k q) h p")[:, :length]
        if D is not None:
            y = y.addcmul_(x[:, :length], D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    if return_final_states:
        return y, rearrange(states[:, -1], "b h (p n) -> b h p n", n=dstate)
    return y


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
             dt_bias: torch.Tensor | None = None, dt_softplus: bool = False):
    """One step of the recurrence: x (B, H, P), dt (B, H), B and C (B, G, N), state (B, H, P, N)
    -> (y (B, H, P), new state (B, H, P, N))."""
    heads_per_group = x.shape[1] // B.shape[1]
    dt = _discretize(dt, dt_bias, dt_softplus)
    B_h = repeat(B, "b g n -> b (g r) n", r=heads_per_group)
    C_h = repeat(C, "b g n -> b (g r) n", r=heads_per_group)
    decay = torch.exp(dt * A)[..., None, None]  # (B, H, 1, 1)
    state = decay * state + (dt[..., None] * x)[..., None] * B_h[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C_h)
    return _skip_and_gate(y, x, D, z), state


def ssd_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None = None, z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
            initial_states: torch.Tensor | None = None, dt_softplus: bool = False,
            return_final_states: bool = False):
    """The recurrence of the paper's eq. (2) one time step at a time (shapes as `ssd`):

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t,   y_t *= silu(z_t)
    """
    _check_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    batch, length, heads, headdim = x.shape
    groups, dstate = B.shape[2:]
    dt = _discretize(dt, dt_bias, dt_softplus)
    B_h = repeat(B, "b l g n -> b l (g r) n", r=heads // groups)
    C_h = repeat(C, "b l g n -> b l (g r) n", r=heads // groups)
    h = x.new_zeros(batch, heads, headdim, dstate) if initial_states is None else initial_states.to(x.dtype)
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # (B, H)
        h = decay[:, :, None, None] * h + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], B_h[:, t])
        outputs.append(torch.einsum("bhpn,bhn->bhp", h, C_h[:, t]))
    y = _skip_and_gate(torch.stack(outputs, dim=1), x, D, z)
    if return_final_states:
        return y, h
    return y
