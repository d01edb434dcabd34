"""Mamba-3's scan: exponential-trapezoidal SSM with data-dependent rotations, SISO or MIMO rank R.

Lahoti, Li, Chen, Wang, Bick, Kolter, Dao and Gu (2026), "Mamba-3: Improved Sequence Modeling using
State Space Principles" (arXiv 2603.15569). The semantics are those of mamba-ssm's Mamba-3 kernels
(`mamba3_siso_combined`, `mamba3_mimo`, and the step function): the same recurrence, rotation
layouts, state tuple and order of operations, so a checkpoint computes the same function.

Legend: B batch, L length, H heads, P head dim, G groups of B/C (head h reads group h // (H / G)),
R MIMO rank (R = 1 is SISO), N state size, S rotation angles (S <= N / 2), Q chunk length,
K chunks (= ceil(L / Q)).

Per head, with dt_t >= 0, a data-dependent A_t < 0, a trapezoid weight lam_t in [0, 1] and an
angular velocity w_t (S,) (the paper's eq. for the exponential-trapezoidal rule with the complex
transition written as rotations of B and C by the cumulative angle):

    theta_t = theta_{t-1} + dt_t w_t                        cumulative rotation angles (S,)
    k_t,r   = Rot(theta_t) (B_t,r + B_bias_r)               q_t,r = Rot(theta_t) (C_t,r + C_bias_r)
    v_t,r   = x_t * mimo_x_r                                (v_t = x_t when SISO)
    alpha_t = exp(dt_t A_t),  beta_t = (1 - lam_t) dt_t alpha_t,  gamma_t = lam_t dt_t
    h_t     = alpha_t h_{t-1} + beta_t sum_r v_{t-1,r} k_{t-1,r}^T + gamma_t sum_r v_t,r k_t,r^T     (P, N)
    y_t,r   = h_t q_t,r + D v_t,r,   y_t,r *= silu(z_t * mimo_z_r),   y_t = sum_r mimo_o_r * y_t,r

lam_t = 1 drops the previous-input term and leaves Mamba-2's Euler rule (seqarch/ops/ssd.py); the
rotation is the real form of a complex diagonal transition exp(dt_t (A_t + i w_t)) on pairs of state
channels. The recurrent state is (theta, h, k_{t-1}, x_{t-1}), as mamba-ssm's (angle, ssm, K, V).

The chunked path: since the input s enters at step s with weight gamma_s and at step s + 1 with
weight beta_{s+1} = alpha_{s+1} (1 - lam_{s+1}) dt_{s+1}, unrolling gives

    h_t = sum_{s <= t} exp(cum_t - cum_s) c_{t,s} sum_r v_s,r k_s,r^T,    cum_t = sum_{j <= t} dt_j A_j
    c_{t,s} = gamma_s + (1 - lam_{s+1}) dt_{s+1}   for s < t,    c_{t,t} = gamma_t,

i.e. Mamba-2's SSD with the column scale gamma_s + next_s and one modified diagonal: one
semiseparable matrix with a modified mask. The algorithm is SSD's (Listing 1): diagonal blocks as
masked matrix products inside each chunk, per-chunk states, state passing between chunks (the
recurrence over chunk states, in two levels), and the entering state read out by C; the skip D x is
the diagonal of the block product. Exponentials only see non-positive segment sums of dt A (masked
to -inf above the diagonal before exp). MIMO flattens (time, rank) into the rows of each chunk. The
per-head biases and the rotations are applied to B and C inside the scan (real cos / sin on
contiguous blocks of pairs: the SISO layout's adjacent pairs are first reordered to the (i, i + N /
2) layout, which the products over channels do not see); the cumulative angles are summed in float64
and wrapped to [0, 2 pi), so long sequences keep their angles exact to float32 rounding. Both the
scan and the angles are `torch.autograd.Function`s whose backward is written out (`_ChunkedScan`,
`_CumulativeAngles`); tests hold them to the sequential reference and to finite differences.
"""

from __future__ import annotations

import math
import os
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.autograd.function import once_differentiable

from seqarch.backends import (
    CompiledKernel,
    check_backend,
    compiled_or_eager,
    describe_compiled_or_eager,
    notify_once,
)
from seqarch.ops.ssd import DEFAULT_CHUNK_SIZE

Backend = Literal["auto", "compiled", "chunked", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# The chunk-local products of the chunked path in C++ (seqarch/ops/csrc/mamba3.cpp).
KERNEL = CompiledKernel("seqarch_mamba3", os.path.join(os.path.dirname(__file__), "csrc", "mamba3.cpp"),
                        ("-march=native",))
Rotary = Literal["pairwise", "halves"]
TWO_PI = 2 * math.pi


class Mamba3ScanState(NamedTuple):
    """The recurrent state of the scan (mamba-ssm's (angle, ssm, K, V) tuple)."""

    angle: torch.Tensor  # (B, H, S) cumulative rotation angles, in [0, 2 pi)
    ssm: torch.Tensor  # (B, H, P, N)
    k: torch.Tensor  # (B, R, H, N) the previous token's rotated, biased B
    x: torch.Tensor  # (B, H, P) the previous token's input (before the MIMO up-projection)


def resolve_backend(backend: Backend, device: torch.device | str = "cpu") -> str:
    """The path that runs for `backend` on `device`: "compiled" (the chunked algorithm with its
    chunk-local products in C++), "chunked" (all PyTorch) or "sequential" (the reference loop).
    "auto" on CPU builds the compiled kernel if needed (once, cached) and falls back to "chunked"
    with a one-time notice saying why; on other devices it is "chunked" (mamba-ssm's Mamba-3 kernels
    are Triton / TileLang / CuTe only); an explicit "compiled" that cannot run raises."""
    check_backend("mamba3_scan", backend, BACKENDS)
    device = torch.device(device)
    if backend in ("chunked", "sequential"):
        return backend
    return compiled_or_eager("mamba3_scan", backend, device, KERNEL)


def describe_backend(backend: Backend, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything (for `seqarch list`)."""
    check_backend("mamba3_scan", backend, BACKENDS)
    return describe_compiled_or_eager(backend, device, KERNEL, "chunked SSD-style")


# --- shared pieces ------------------------------------------------------------------------------
def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """theta mod 2 pi, in [0, 2 pi) (gradient 1, as the floor is piecewise constant)."""
    return theta - TWO_PI * torch.floor(theta / TWO_PI)


def rotate(t: torch.Tensor, theta: torch.Tensor, rotary: Rotary = "pairwise") -> torch.Tensor:
    """Rotate pairs of the last dim of t (..., N) by theta (..., S), S <= N / 2; other channels pass.

    "pairwise" pairs channels (2i, 2i + 1) (mamba-ssm's SISO layout); "halves" pairs (i, i + N / 2)
    (its MIMO kernels' layout). Pair i turns by theta_i for i < S."""
    size, angles = t.shape[-1], theta.shape[-1]
    pairs_are_complex = t.stride(-1) == 1 and t.storage_offset() % 2 == 0 and all(
        stride % 2 == 0 for stride in t.stride()[:-1])
    if rotary == "pairwise" and pairs_are_complex:
        # Adjacent pairs viewed as complex numbers: one complex product (and one in the backward)
        # instead of the real form's slices, products and re-assembly.
        turned = torch.view_as_complex(t[..., : 2 * angles].unflatten(-1, (angles, 2)))
        turned = torch.view_as_real(turned * torch.polar(torch.ones_like(theta), theta)).flatten(-2)
        return torch.cat([turned, t[..., 2 * angles :]], dim=-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    if rotary == "pairwise":
        pairs = t[..., : 2 * angles].unflatten(-1, (angles, 2))
        first, second = pairs[..., 0], pairs[..., 1]
        turned = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)
        return torch.cat([turned, t[..., 2 * angles :]], dim=-1)
    half = size // 2
    first, second = t[..., :angles], t[..., half : half + angles]
    return torch.cat([first * cos - second * sin, t[..., angles:half],
                      first * sin + second * cos, t[..., half + angles :]], dim=-1)


def _check_inputs(x, dt, A, B, C, trap, angles, initial_state, rotary) -> None:
    if x.ndim != 4:
        raise ValueError(f"mamba3_scan: x must be (B, L, H, P), got shape {tuple(x.shape)}")
    batch, length, heads, _ = x.shape
    if length < 1:
        raise ValueError("mamba3_scan: needs at least one time step")
    if B.ndim not in (4, 5) or B.shape[:2] != (batch, length) or C.shape != B.shape:
        raise ValueError(f"mamba3_scan: B and C must both be (B, L, G, N) or (B, L, R, G, N) with (B, L) = "
                         f"({batch}, {length}), got {tuple(B.shape)} and {tuple(C.shape)}")
    groups, dstate = B.shape[-2:]
    if heads % groups:
        raise ValueError(f"mamba3_scan: H={heads} heads are not a multiple of G={groups} groups")
    for name, tensor in (("dt", dt), ("trap", trap)):
        if tuple(tensor.shape) != (batch, length, heads):
            raise ValueError(f"mamba3_scan: {name} must be (B, L, H) = {(batch, length, heads)}, "
                             f"got {tuple(tensor.shape)}")
    if tuple(A.shape) not in ((batch, length, heads), (heads,)):
        raise ValueError(f"mamba3_scan: A must be (B, L, H) or (H,), got {tuple(A.shape)}")
    if angles.ndim != 4 or angles.shape[:3] != (batch, length, heads) or 2 * angles.shape[-1] > dstate:
        raise ValueError(f"mamba3_scan: angles must be (B, L, H, S) with S <= N / 2 = {dstate // 2}, "
                         f"got {tuple(angles.shape)}")
    if rotary not in ("pairwise", "halves"):
        raise ValueError(f"mamba3_scan: rotary={rotary!r}; valid: 'pairwise', 'halves'")
    if initial_state is not None and len(initial_state) != 4:
        raise ValueError("mamba3_scan: initial_state must be (angle, ssm, k, x)")


class _Prepared(NamedTuple):
    x: torch.Tensor  # (B, L, H, P)
    v: torch.Tensor  # (B, L, R, H, P)
    k: torch.Tensor  # (B, L, R, H, N), biased, not yet rotated
    q: torch.Tensor  # (B, L, R, H, N)
    zr: torch.Tensor | None  # (B, L, R, H, P)
    A: torch.Tensor  # (B, L, H)


def _prepare(x, A, B, C, z, B_bias, C_bias, mimo_x, mimo_z) -> _Prepared:
    """Bring B/C to heads and rank (B, L, R, H, N) with biases, and x, z to rank (B, L, R, H, P)."""
    heads = x.shape[2]
    if B.ndim == 4:
        B, C = B[:, :, None], C[:, :, None]
    groups = B.shape[3]
    k = repeat(B, "b l r g n -> b l r (g e) n", e=heads // groups)
    q = repeat(C, "b l r g n -> b l r (g e) n", e=heads // groups)
    if B_bias is not None:
        k = k + rearrange(B_bias, "h r n -> r h n")
    if C_bias is not None:
        q = q + rearrange(C_bias, "h r n -> r h n")
    v = x[:, :, None] if mimo_x is None else torch.einsum("blhp,hrp->blrhp", x, mimo_x)
    zr = None
    if z is not None:
        zr = z[:, :, None] if mimo_z is None else torch.einsum("blhp,hrp->blrhp", z, mimo_z)
    if A.ndim == 1:
        A = A.expand(*x.shape[:3])
    return _Prepared(x, v, k, q, zr, A)


def _output(y, v, D, zr, mimo_o):
    """y (B, ..., R, H, P) += D v, *= silu(z_r), then contracted over R with mimo_o (or squeezed at R = 1)."""
    if D is not None:
        y = y + v * (D[:, None] if D.ndim == 1 else D)
    if zr is not None:
        y = y * F.silu(zr)
    if mimo_o is not None:
        return torch.einsum("...rhp,hrp->...hp", y, mimo_o)
    return y.squeeze(-3) if y.shape[-3] == 1 else y


def _zero_state(x, k, angles) -> Mamba3ScanState:
    batch, _, heads, headdim = x.shape
    rank, dstate = k.shape[2], k.shape[-1]
    return Mamba3ScanState(angle=x.new_zeros(batch, heads, angles.shape[-1]),
                           ssm=x.new_zeros(batch, heads, headdim, dstate),
                           k=x.new_zeros(batch, rank, heads, dstate), x=x.new_zeros(batch, heads, headdim))


# --- the recurrence, one step -------------------------------------------------------------------
def _step(prep_t, v_prev_scale, dt_t, A_t, trap_t, angles_t, state: Mamba3ScanState, rotary):
    """One step of the recurrence on prepared tensors at time t (no output transform).

    prep_t: (x (B, H, P), v (B, R, H, P), k, q (B, R, H, N)); v_prev_scale maps the previous x to
    its rank-R values. Returns (y_r (B, R, H, P), new state)."""
    x_t, v_t, k_t, q_t = prep_t
    theta = wrap_angle(state.angle + angles_t * dt_t[..., None])  # (B, H, S)
    k_t = rotate(k_t, theta[:, None], rotary)
    q_t = rotate(q_t, theta[:, None], rotary)
    alpha = torch.exp(dt_t * A_t)  # (B, H)
    beta = (1 - trap_t) * dt_t * alpha
    gamma = trap_t * dt_t
    previous = torch.einsum("brhp,brhn->bhpn", v_prev_scale(state.x), state.k)
    current = torch.einsum("brhp,brhn->bhpn", v_t, k_t)
    h = alpha[..., None, None] * state.ssm + beta[..., None, None] * previous + gamma[..., None, None] * current
    y = torch.einsum("bhpn,brhn->brhp", h, q_t)
    return y, Mamba3ScanState(angle=theta, ssm=h, k=k_t, x=x_t)


def _v_of(mimo_x):
    if mimo_x is None:
        return lambda x_prev: x_prev[:, None]
    return lambda x_prev: torch.einsum("bhp,hrp->brhp", x_prev, mimo_x)


def mamba3_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                trap: torch.Tensor, angles: torch.Tensor, state: Mamba3ScanState, D: torch.Tensor | None = None,
                z: torch.Tensor | None = None, B_bias: torch.Tensor | None = None,
                C_bias: torch.Tensor | None = None, mimo_x: torch.Tensor | None = None,
                mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
                rotary: Rotary = "pairwise") -> tuple[torch.Tensor, Mamba3ScanState]:
    """One decoding step: the tensors of `mamba3_scan` without the L axis -> (y_t, new state)."""
    prep = _prepare(x[:, None], A[:, None] if A.ndim == 2 else A, B[:, None], C[:, None],
                    None if z is None else z[:, None], B_bias, C_bias, mimo_x, mimo_z)
    y, state = _step((x, prep.v[:, 0], prep.k[:, 0], prep.q[:, 0]), _v_of(mimo_x), dt, prep.A[:, 0], trap,
                     angles, state, rotary)
    zr = None if prep.zr is None else prep.zr[:, 0]
    return _output(y, prep.v[:, 0], D, zr, mimo_o), state


def mamba3_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    trap: torch.Tensor, angles: torch.Tensor, D: torch.Tensor | None = None,
                    z: torch.Tensor | None = None, B_bias: torch.Tensor | None = None,
                    C_bias: torch.Tensor | None = None, mimo_x: torch.Tensor | None = None,
                    mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
                    rotary: Rotary = "pairwise", initial_state: Mamba3ScanState | None = None,
                    output_final_state: bool = False):
    """The recurrence of the module docstring, one time step at a time (shapes as `mamba3_scan`)."""
    _check_inputs(x, dt, A, B, C, trap, angles, initial_state, rotary)
    prep = _prepare(x, A, B, C, z, B_bias, C_bias, mimo_x, mimo_z)
    state = _zero_state(x, prep.k, angles) if initial_state is None else Mamba3ScanState(*initial_state)
    v_prev = _v_of(mimo_x)
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = _step((x[:, t], prep.v[:, t], prep.k[:, t], prep.q[:, t]), v_prev, dt[:, t], prep.A[:, t],
                           trap[:, t], angles[:, t], state, rotary)
        outputs.append(y_t)
    y = _output(torch.stack(outputs, dim=1), prep.v, D, prep.zr, mimo_o)
    return y, (state if output_final_state else None)


# --- the chunked path ---------------------------------------------------------------------------
class _CumulativeAngles(torch.autograd.Function):
    """theta_t = wrap(theta_0 + sum_{j <= t} dt_j w_j), summed in float64, head-major.

    angles (B, L, H, S), dt (B, L, H), angle0 (B, H, S) or None -> theta (B, H, L, S) in the dtype of
    angles, in [0, 2 pi). The wrap has gradient 1, so the backward is the reversed cumulative sum of
    d theta (in the input dtype), times dt for the angles and times the angles for dt."""

    @staticmethod
    def forward(ctx, angles, dt, angle0):
        batch, length, heads, count = angles.shape
        dt_h, angles_h = rearrange(dt, "b l h -> b h l 1"), rearrange(angles, "b l h s -> b h l s")
        theta = torch.empty(batch, heads, length, count, dtype=torch.float64, device=angles.device)
        torch.mul(dt_h.double(), angles_h.double(), out=theta).cumsum_(dim=2)
        if angle0 is not None:
            theta += angle0.double()[:, :, None]
        theta.sub_(torch.floor_(theta / TWO_PI), alpha=TWO_PI)
        ctx.save_for_backward(angles_h, dt_h)
        ctx.has_angle0 = angle0 is not None
        return theta.to(angles.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_theta):
        angles_h, dt_h = ctx.saved_tensors
        d_steps = d_theta.flip(2).cumsum(2).flip(2)  # sum over t' >= t
        d_angles = rearrange(d_steps * dt_h, "b h l s -> b l h s")
        d_dt = rearrange((d_steps * angles_h).sum(-1), "b h l -> b l h")
        return d_angles, d_dt, (d_steps[:, :, 0] if ctx.has_angle0 else None)


def _halves(t: torch.Tensor, angles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the two members of each rotated pair of t (..., N) in the "halves" layout: (..., S) each."""
    half = t.shape[-1] // 2
    return t[..., :angles], t[..., half : half + angles]


def _turn_(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the pairs (i, i + N / 2) of t in place by the angles whose cos and sin (..., S) are
    given (pass -sin to turn back)."""
    first, second = _halves(t, cos.shape[-1])
    turned = (first * cos).addcmul_(second, sin, value=-1)
    second.mul_(cos).addcmul_(first, sin)
    first.copy_(turned)


def _pairwise_as_halves(dstate: int, angles: int, device) -> torch.Tensor:
    """The channel order that moves the pairs (2i, 2i + 1), i < S, to (i, i + N / 2), the other
    channels keeping their order in the free places. The scan only sees products of q and k over
    channels, so it may run in any channel order; in this one the pairs are contiguous blocks."""
    half, rest = dstate // 2, torch.arange(2 * angles, dstate, device=device)
    evens, odds = torch.arange(0, 2 * angles, 2, device=device), torch.arange(1, 2 * angles, 2, device=device)
    return torch.cat([evens, rest[: half - angles], odds, rest[half - angles :]])


def _per_head(M: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """B or C (B, L, R, G, N) plus the per-head bias (H, R, N) -> a new (B, H, L, R, N) tensor, written
    head-major by the broadcast itself."""
    groups = M.shape[3]
    M = rearrange(M, "b l r g n -> b g 1 l r n")
    if bias is None:
        return repeat(M, "b g 1 l r n -> b (g e) l r n", e=heads // groups).contiguous()
    return (M + rearrange(bias, "(g e) r n -> 1 g e 1 r n", g=groups)).flatten(1, 2)


def _per_group(dM: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of `_per_head`'s broadcast: (B, H, L, R, N) summed over the heads of each group
    -> (B, L, R, G, N)."""
    return rearrange(dM.unflatten(1, (groups, -1)).sum(2), "b g l r n -> b l r g n")


def _time_masks(chunk: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the Q R rows (time, rank) of a chunk: `later` [i, j] when row i's time is after row j's,
    `same` when the times are equal."""
    time = torch.arange(chunk, device=device).repeat_interleave(rank)
    return time[:, None] > time[None, :], time[:, None] == time[None, :]


def _add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b over the leading (batch) dims, accumulated by the matrix product itself."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


def _linear_scan(x: torch.Tensor, a: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """h[c] = a[c] h[c - 1] + x[c] from h[-1] = h0 (or, reversed, h[c] = a[c] h[c + 1] + x[c] from
    h[K] = h0) over the K chunks of x (B, H, K, P, N), a (B, H, K, 1, 1); h0 (B, H, P, N) or None (zero).

    In two levels, so that about 2 sqrt(K) whole-tensor steps run instead of K small ones (each step
    is a parallel region; on a loaded machine a few large ones are much cheaper than many small
    ones): the recurrence inside groups of g chunks from a zero start, all groups at once; the
    groups' entering states one group after another; then each group's entering state, decayed,
    added to its chunks. Every term is a product of decays in (0, 1], so nothing is divided."""
    chunks = x.shape[2]
    size = max(g for g in range(1, chunks + 1) if chunks % g == 0 and g * g <= chunks)
    xs, decays = x.unflatten(2, (-1, size)), a.unflatten(2, (-1, size))  # (B, H, G, g, P, N), (B, H, G, g, 1, 1)
    order = list(range(size - 1, -1, -1) if reverse else range(size))
    local = torch.empty_like(xs)
    local[:, :, :, order[0]] = xs[:, :, :, order[0]]
    for previous, i in zip(order, order[1:], strict=False):
        torch.addcmul(xs[:, :, :, i], local[:, :, :, previous], decays[:, :, :, i], out=local[:, :, :, i])
    decay = decays[..., 0, 0]  # (B, H, G, g)
    from_entry = decay.flip(-1).cumprod(-1).flip(-1) if reverse else decay.cumprod(-1)  # decay from the group's entry
    through = from_entry[..., order[-1], None, None]  # (B, H, G, 1, 1) across a whole group
    ends = local[:, :, :, order[-1]]  # (B, H, G, P, N) each group's last state from a zero start
    entry = torch.empty_like(ends)
    state = torch.zeros_like(ends[:, :, 0]) if h0 is None else h0
    for group in (range(entry.shape[2] - 1, -1, -1) if reverse else range(entry.shape[2])):
        entry[:, :, group] = state
        state = torch.addcmul(ends[:, :, group], state, through[:, :, group])
    local += from_entry[..., None, None] * entry[:, :, :, None]
    return local.flatten(2, 3)


def _rotated(B, C, B_bias, C_bias, theta, heads):
    """k, q (B, H, Lq, R, N): B, C per head with their biases, turned by theta (B, H, Lq, S) in the
    "halves" layout; and the cos, sin (B, H, Lq, 1, S) of theta for the backward."""
    cos, sin = torch.cos(theta)[:, :, :, None], torch.sin(theta)[:, :, :, None]
    k, q = _per_head(B, B_bias, heads), _per_head(C, C_bias, heads)
    _turn_(k, cos, sin)
    _turn_(q, cos, sin)
    return k, q, cos, sin


def _rotation_backward(dk, dq, k, q, cos, sin, groups, B_bias, C_bias):
    """The adjoint of `_rotated` from dL/dk, dL/dq (overwritten): d theta from the rotated pairs, then
    dk, dq turned back and summed to the groups and biases -> (dB, dC, dB_bias, dC_bias, d theta)."""
    angles = cos.shape[-1]
    d_theta = torch.zeros_like(cos[:, :, :, 0])  # (B, H, Lq, S)
    for grad, rotated in ((dk, k), (dq, q)):
        first, second = _halves(rotated, angles)
        d_first, d_second = _halves(grad, angles)
        d_theta += (d_second * first - d_first * second).sum(-2)
        _turn_(grad, cos, -sin)
    dB, dC = _per_group(dk, groups), _per_group(dq, groups)
    dB_bias = None if B_bias is None else dk.sum((0, 2))
    dC_bias = None if C_bias is None else dq.sum((0, 2))
    return dB, dC, dB_bias, dC_bias, d_theta


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan with B/C biases and rotations inside, and its backward written out.

    Rows are (time, rank) pairs, M = Q R per chunk. Inputs: B, C (B, Lq, R, G, N) with Lq a multiple
    of Q; B_bias, C_bias (H, R, N) or None; theta (B, H, Lq, S) cumulative angles; v (B, H, Lq, R, P);
    per row of every chunk (B, H, K, M): cum (chunk-local cumulative dt A), scale (gamma_s +
    (1 - lam_{s+1}) dt_{s+1}) and current (gamma_t); initial (B, H, P, N) or None, the state entering
    the first chunk. Returns y (B, H, K, M, P), the final state (B, H, P, N) and the rotated, biased
    B of time `length` - 1 (B, H, R, N).

    Forward per chunk (module docstring): W = (q k^T) o (exp(cum_i - cum_j) scale_j [later] +
    current_i [same time]), y = W v + exp(cum_i) q h_in^T, chunk state (v o exp(cum_end - cum_j)
    scale_j)^T k, and the states passed from chunk to chunk by the recurrence itself (`_linear_scan`,
    instead of a (K+1)^2 decay matrix). The backward runs the same products transposed and
    the state passing in reverse, and turns dk, dq back through the rotations (d theta from the
    rotated pairs), so no (B, H, L, N) intermediate of autograd's chain is kept or re-made.
    """

    @staticmethod
    def forward(ctx, B, C, B_bias, C_bias, theta, v, cum, scale, current, initial, D, heads, chunk, length):
        batch, length_q, rank, groups, dstate = B.shape
        headdim, n_chunks, rows = v.shape[-1], length_q // chunk, chunk * rank
        k, q, cos, sin = _rotated(B, C, B_bias, C_bias, theta, heads)
        kc, qc = (t.view(batch, heads, n_chunks, rows, dstate) for t in (k, q))
        vc = v.reshape(batch, heads, n_chunks, rows, headdim)

        # 1. Diagonal blocks. seg = exp(cum_i - cum_j) on strictly later rows, 0 elsewhere (masked
        #    before exp, so exp only sees segment sums <= 0).
        later, same = _time_masks(chunk, rank, cum.device)
        seg = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~later, float("-inf")).exp_()  # (B, H, K, M, M)
        weights = seg * scale[..., None, :]
        if rank == 1:
            weights.diagonal(dim1=-2, dim2=-1).copy_(current)
        else:
            weights = torch.where(same, current[..., :, None], weights)
        scores = torch.matmul(qc, kc.transpose(-1, -2))
        mixing = scores * weights
        if D is not None:  # the skip D v is the diagonal of the same product
            mixing.diagonal(dim1=-2, dim2=-1).add_(D[:, None, None])
        y = torch.matmul(mixing, vc)  # (B, H, K, M, P)

        # 2. Each chunk's state from its own inputs, as seen at the chunk's end.
        decay_end = torch.exp(cum[..., -1:] - cum)  # (B, H, K, M)
        weighted = vc * (decay_end * scale)[..., None]  # (B, H, K, M, P)
        chunk_states = torch.matmul(weighted.transpose(-1, -2), kc)  # (B, H, K, P, N)

        # 3. State passing: entering[c + 1] = exp(cum_end[c]) entering[c] + chunk_states[c].
        totals = torch.exp(cum[..., -1])[..., None, None]  # (B, H, K, 1, 1)
        after = _linear_scan(chunk_states, totals, initial, reverse=False)  # the state after each chunk
        first = torch.zeros_like(after[:, :, :1]) if initial is None else initial[:, :, None]
        entering = torch.cat([first, after[:, :, :-1]], dim=2)
        final = after[:, :, -1].clone()

        # 4. The entering state read out by q, decayed to each row.
        y_in = torch.matmul(qc, entering.transpose(-1, -2)).mul_(torch.exp(cum)[..., None])
        y += y_in
        k_last = k[:, :, length - 1].clone()

        ctx.save_for_backward(k, q, vc, weighted, cum, scale, seg, weights, scores, mixing, decay_end, entering,
                              totals, y_in, cos, sin, B_bias, C_bias)
        ctx.sizes = (heads, groups, chunk, rank, length, initial is not None, D is not None)
        return y, final, k_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dfinal, dk_last):
        (k, q, vc, weighted, cum, scale, seg, weights, scores, mixing, decay_end, entering, totals, y_in, cos, sin,
         B_bias, C_bias) = ctx.saved_tensors
        heads, groups, chunk, rank, length, has_initial, has_skip = ctx.sizes
        dy = dy.contiguous()  # it arrives in the (B, L, R, H, P) order of the output
        kc, qc = (t.view(vc.shape[:-1] + t.shape[-1:]) for t in (k, q))

        # 4. Read-out of the entering states: y_in = exp(cum_i) q_i h_in^T.
        d_cum = (dy * y_in).sum(-1)  # (B, H, K, M)
        dy_in = dy * torch.exp(cum)[..., None]
        dq = torch.matmul(dy_in, entering)  # (B, H, K, M, N)
        d_entering = torch.matmul(dy_in.transpose(-1, -2), qc)  # (B, H, K, P, N)

        # 3. State passing in reverse: the whole gradient of entering[c] is d_entering[c] + total_c times
        #    that of entering[c + 1] (entering[K] = the final state).
        d_whole = _linear_scan(d_entering, totals, dfinal, reverse=True)
        d_initial = d_whole[:, :, 0] if has_initial else None
        d_after = torch.cat([d_whole[:, :, 1:], dfinal[:, :, None]], dim=2)  # d(state after chunk c)
        d_totals = torch.matmul(d_after.flatten(-2)[..., None, :], entering.flatten(-2)[..., :, None])  # (..., 1, 1)
        d_cum[..., -1] += (d_totals * totals)[..., 0, 0]

        # 2. Chunk states = (v o to_end)^T k.
        to_end = decay_end * scale
        d_vw = torch.matmul(kc, d_after.transpose(-1, -2))  # (B, H, K, M, P)
        dk = torch.matmul(weighted, d_after)  # (B, H, K, M, N)
        dv = d_vw * to_end[..., None]
        d_to_end = (d_vw * vc).sum(-1)  # (B, H, K, M)
        d_scale = d_to_end * decay_end
        d_log_end = d_to_end * to_end
        d_cum -= d_log_end
        d_cum[..., -1] += d_log_end.sum(-1)

        # 1. Diagonal blocks: y = mixing v, mixing = scores o weights + D on the diagonal.
        d_w = torch.matmul(dy, vc.transpose(-1, -2))  # (B, H, K, M, M)
        _add_product_(dv, mixing.transpose(-1, -2), dy)
        dD = d_w.diagonal(dim1=-2, dim2=-1).sum((0, 2, 3)) if has_skip else None
        d_scores = d_w * weights
        _add_product_(dq, d_scores, kc)
        _add_product_(dk, d_scores.transpose(-1, -2), qc)
        d_weights = d_w.mul_(scores)
        if rank == 1:
            d_current = d_weights.diagonal(dim1=-2, dim2=-1).clone()
        else:
            d_current = (d_weights * _time_masks(chunk, rank, cum.device)[1]).sum(-1)
        d_seg = d_weights.mul_(seg)  # zero off the strictly later rows, as seg is
        d_scale += d_seg.sum(-2)
        d_log_seg = d_seg.mul_(scale[..., None, :])
        d_cum += d_log_seg.sum(-1) - d_log_seg.sum(-2)

        dk, dq = dk.view_as(k), dq.view_as(q)
        dk[:, :, length - 1] += dk_last
        dB, dC, dB_bias, dC_bias, d_theta = _rotation_backward(dk, dq, k, q, cos, sin, groups, B_bias, C_bias)
        dv = dv.view(vc.shape[:2] + (-1, rank, vc.shape[-1]))
        return dB, dC, dB_bias, dC_bias, d_theta, dv, d_cum, d_scale, d_current, d_initial, dD, None, None, None


class _CompiledScan(torch.autograd.Function):
    """`_ChunkedScan` in the C++ kernel (seqarch/ops/csrc/mamba3.cpp), with v and y in the op's
    (B, Lq, R, H, P) order instead of head-major. One task per (batch, head) walks its chunks in
    order with the state in a local buffer, building each chunk's rotated, biased k and q from B, C,
    the biases and cos / sin of theta, so no (B, H, L, N) tensor is made and no (B, H, K, M, M) or
    (B, H, K, P, N) intermediate except the entering states kept for the backward. The backward
    walks the chunks in reverse and returns the gradients of B, C (summed over the heads of a group
    in per-thread buffers), the biases, theta, v, cum, scale, current, the initial state and D."""

    @staticmethod
    def forward(ctx, B, C, B_bias, C_bias, theta, v, cum, scale, current, initial, D, heads, chunk, length):
        dtype = v.dtype
        B, C, theta, cum, scale, current = (t.to(dtype).contiguous() for t in (B, C, theta, cum, scale, current))
        B_bias, C_bias, initial, D = (None if t is None else t.to(dtype).contiguous()
                                      for t in (B_bias, C_bias, initial, D))
        if v.stride(-1) != 1 or v.shape[2] > 1:  # the kernel takes SISO's x as it comes (P contiguous)
            v = v.contiguous()
        cos, sin = torch.cos(theta), torch.sin(theta)
        store = any(ctx.needs_input_grad)
        y, final, k_last, entering = KERNEL.load().forward(B, C, B_bias, C_bias, cos, sin, v, cum, scale, current,
                                                           initial, D, length - 1, store)
        if store:
            ctx.save_for_backward(B, C, B_bias, C_bias, cos, sin, v, cum, scale, current, D, entering)
        ctx.sizes = (length, initial is not None)
        return y, final, k_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dfinal, dk_last):
        B, C, B_bias, C_bias, cos, sin, v, cum, scale, current, D, entering = ctx.saved_tensors
        length, has_initial = ctx.sizes
        (dB, dC, dB_bias, dC_bias, d_theta, dv, d_cum, d_scale, d_current, d_initial,
         dD) = KERNEL.load().backward(B, C, B_bias, C_bias, cos, sin, v, cum, scale, current, D, length - 1, entering,
                                      dy.contiguous(), dfinal.contiguous(), dk_last.contiguous())
        return (dB, dC, None if B_bias is None else dB_bias.sum(0), None if C_bias is None else dC_bias.sum(0), d_theta,
                dv, d_cum, d_scale, d_current, d_initial if has_initial else None, None if D is None else dD.sum(0),
                None, None, None)


def _chunked(x, dt, A, B, C, trap, angles, D, B_bias, C_bias, mimo_x, rotary, initial_state, chunk_size,
             compiled=False):
    """Returns y (B, L, R, H, P) with the skip D v (D of shape (H,) or None) before the gate and
    down-projection, and the final state."""
    batch, length, heads, headdim = x.shape
    if B.ndim == 4:
        B, C = B[:, :, None], C[:, :, None]
    rank = B.shape[2]
    chunk = min(chunk_size, length)
    pad = (-length) % chunk

    angle0 = None if initial_state is None else initial_state.angle
    theta_h = _CumulativeAngles.apply(angles, dt, angle0)  # (B, H, L, S)
    if compiled:  # the kernel reads v in the op's order, (B, L, R, H, P)
        v = x[:, :, None] if mimo_x is None else torch.einsum("blhp,hrp->blrhp", x, mimo_x)
    elif mimo_x is None:
        v = rearrange(x, "b l h p -> b h l 1 p")
    else:
        v = torch.einsum("blhp,hrp->bhlrp", x, mimo_x)
    dt_h, trap_h = rearrange(dt, "b l h -> b h l"), rearrange(trap, "b l h -> b h l")
    current = trap_h * dt_h  # gamma_t
    following = F.pad(((1 - trap_h) * dt_h)[..., 1:], (0, 1))  # (1 - lam_{t+1}) dt_{t+1}, 0 after the end
    scale = current + following  # the weight of input s in every later state
    dA = dt_h * (rearrange(A, "b l h -> b h l") if A.ndim == 3 else A[:, None])
    if pad:
        # dt = 0 on the padding: decay 1, weight 0, so the final state is untouched.
        B, C = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (B, C))
        v = F.pad(v, (0, 0, 0, 0, 0, 0, 0, pad) if compiled else (0, 0, 0, 0, 0, pad))
        theta_h = F.pad(theta_h, (0, 0, 0, pad))
        dA, scale, current = (F.pad(t, (0, pad)) for t in (dA, scale, current))
    cum = dA.unflatten(-1, (-1, chunk)).cumsum(dim=-1)  # (B, H, K, Q)
    scale_c, current_c = scale.unflatten(-1, (-1, chunk)), current.unflatten(-1, (-1, chunk))
    if rank > 1:
        cum, scale_c, current_c = (t.repeat_interleave(rank, dim=-1) for t in (cum, scale_c, current_c))

    # The state entering the first chunk carries the previous token's trapezoid term,
    # (1 - lam_1) dt_1 sum_r v_0,r k_0,r^T, which the first step adds.
    initial = None
    if initial_state is not None:
        previous = torch.einsum("brhp,brhn->bhpn", _v_of(mimo_x)(initial_state.x.to(x.dtype)), initial_state.k)
        first = ((1 - trap[:, 0]) * dt[:, 0])[..., None, None]
        initial = initial_state.ssm.to(x.dtype) + first * previous
    if rotary == "pairwise":
        order = _pairwise_as_halves(B.shape[-1], angles.shape[-1], x.device)
        B, C = B[..., order], C[..., order]
        B_bias, C_bias, initial = (None if t is None else t[..., order] for t in (B_bias, C_bias, initial))
    scan = _CompiledScan if compiled else _ChunkedScan
    y, final, k_last = scan.apply(B, C, B_bias, C_bias, theta_h, v, cum, scale_c, current_c, initial, D,
                                          heads, chunk, length)
    if rotary == "pairwise":
        inverse = torch.argsort(order)
        final, k_last = final[..., inverse], k_last[..., inverse]
    if not compiled:
        y = rearrange(y, "b h c (q r) p -> b (c q) r h p", r=rank)
    y = y[:, :length]
    last = Mamba3ScanState(angle=theta_h[:, :, length - 1], ssm=final, k=rearrange(k_last, "b h r n -> b r h n"),
                           x=x[:, -1])
    return y, last


def mamba3_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                trap: torch.Tensor, angles: torch.Tensor, D: torch.Tensor | None = None,
                z: torch.Tensor | None = None, B_bias: torch.Tensor | None = None,
                C_bias: torch.Tensor | None = None, mimo_x: torch.Tensor | None = None,
                mimo_z: torch.Tensor | None = None, mimo_o: torch.Tensor | None = None,
                rotary: Rotary = "pairwise", initial_state: Mamba3ScanState | None = None,
                output_final_state: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                backend: Backend = "auto"):
    """The Mamba-3 scan.

    Args:
        x: (B, L, H, P) inputs.
        dt: (B, L, H) steps, >= 0 (mamba-ssm's DT = softplus(dd_dt + dt_bias)).
        A: (B, L, H) or (H,) decay rates, < 0 (ADT = A * dt is the log-decay).
        B, C: (B, L, G, N) (SISO) or (B, L, R, G, N) input and output maps.
        trap: (B, L, H) trapezoid weights lam in [0, 1] (mamba-ssm's sigmoid(trap)).
        angles: (B, L, H, S) angular velocities (mamba-ssm's tanh(angle_proj) * pi); the step turns
            the state by dt * angles.
        D: (H,) skip; z: (B, L, H, P) gate (silu); B_bias, C_bias: (H, R, N).
        mimo_x, mimo_z, mimo_o: (H, R, P) MIMO up-projections of x and z and down-projection of y.
        rotary: "pairwise" (SISO layout) or "halves" (MIMO layout); see `rotate`.
        initial_state: a `Mamba3ScanState` (angle (B, H, S), ssm (B, H, P, N), k (B, R, H, N), x (B, H, P)).
        output_final_state: also return the final state.
        chunk_size: Q of the chunked path.
        backend: "auto" | "compiled" | "chunked" | "sequential" (see `resolve_backend`).

    Returns:
        (y, final state or None); y is (B, L, H, P), or (B, L, R, H, P) when R > 1 and mimo_o is None.
    """
    path = resolve_backend(backend, x.device)
    if path == "compiled" and x.dtype not in (torch.float32, torch.float64):
        if backend == "compiled":
            raise ValueError(f"mamba3_scan: backend='compiled' takes float32 or float64 inputs, got {x.dtype}")
        path = "chunked"
    notify_once(f"mamba3_scan-{path}-{x.device.type}", f"mamba3_scan runs the {path} path on {x.device.type}")
    arguments = {"D": D, "z": z, "B_bias": B_bias, "C_bias": C_bias, "mimo_x": mimo_x, "mimo_z": mimo_z,
                 "mimo_o": mimo_o, "rotary": rotary, "initial_state": initial_state,
                 "output_final_state": output_final_state}
    if path == "sequential":
        return mamba3_scan_ref(x, dt, A, B, C, trap, angles, **arguments)
    _check_inputs(x, dt, A, B, C, trap, angles, initial_state, rotary)
    if chunk_size < 1:
        raise ValueError(f"mamba3_scan: chunk_size must be >= 1, got {chunk_size}")
    state = None if initial_state is None else Mamba3ScanState(*initial_state)
    skip = D if D is not None and D.ndim == 1 else None  # (H,) is added inside the scan, (H, P) after it
    y, final = _chunked(x, dt, A, B, C, trap, angles, skip, B_bias, C_bias, mimo_x, rotary, state, chunk_size,
                        compiled=path == "compiled")
    v, rest = None, None
    if skip is None and D is not None:
        v, rest = (x[:, :, None] if mimo_x is None else torch.einsum("blhp,hrp->blrhp", x, mimo_x)), D
    zr = None
    if z is not None:
        zr = z[:, :, None] if mimo_z is None else torch.einsum("blhp,hrp->blrhp", z, mimo_z)
    return _output(y, v, rest, zr, mimo_o), (final if output_final_state else None)
