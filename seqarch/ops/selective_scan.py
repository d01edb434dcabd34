"""Selective scan: the input-dependent diagonal SSM of Mamba-1, with mamba-ssm's signature.

Gu & Dao (2023), "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", Algorithm 2,
eq. (2a)-(2b) with the discretisation of Section 3.5 (zero-order hold for A, Euler for B).

Legend: B batch, D channels, L length, N state size, G groups of channels sharing B and C
(channel d reads group d // (D / G)), K chunk length.

    dt_t = softplus(delta_t + delta_bias)        (softplus and bias optional)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t u_t B_t   (B, D, N), h_{-1} = initial_state or 0
    y_t  = sum_n C_t,n h_t,n + D u_t
    out  = y * SiLU(z)                            (gate optional)

Paths (`backend=`, resolved by `resolve_backend`):
- "compiled": a C++ kernel (seqarch/ops/csrc/selective_scan.cpp), state in a local array, one
  task per (batch, channel) on ATen's thread pool, built on first use and cached by torch.
  delta_bias, softplus, the D skip and the SiLU(z) gate are fused into the kernel, forward and
  backward. Backward walks time in reverse, recomputing states from checkpoints every K steps.
- "chunked": eager PyTorch over chunks of K steps. Inside a chunk, a Hillis-Steele scan of
  (decay, input) pairs (log2 K passes); across chunks, the state is carried. Decays are only
  ever exp(dt A) and their products, so nothing exponentiates a positive cumulative sum. Backward
  is the same scan run in reverse on the adjoint, from the stored chunk-boundary states.
- "sequential": `selective_scan_ref`, the oracle: a loop over time steps.
- "auto": mamba-ssm's CUDA kernel on a CUDA device where it imports (and no initial state is
  given: it has no such argument); on CPU the compiled kernel where it builds, else "chunked".

Both fast paths hold O(B D L + B D K N) memory, plus O(B D (L / K) N) of checkpoints kept for
backward; neither forms a (B, D, L, N) tensor. Inputs in bfloat16 / float16 compute in float32.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from seqarch.backends import (
    CompiledKernel,
    check_backend,
    compiled_or_eager,
    cuda_kernels_usable,
    describe_compiled_or_eager,
    notify_once,
    renamed_keyword,
)

Backend = Literal["auto", "compiled", "chunked", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)
CHUNK_SIZE = 64  # steps between state checkpoints; the chunk of the eager path
# -ffast-math lets GCC vectorise the libm calls left in the kernel (log in softplus) with glibc's libmvec.
KERNEL = CompiledKernel("seqarch_selective_scan", os.path.join(os.path.dirname(__file__), "csrc", "selective_scan.cpp"),
                        ("-march=native", "-ffast-math"))


# --- checks -------------------------------------------------------------------------------------
def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, backend) -> None:
    check_backend("selective_scan", backend, BACKENDS)
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must be (B, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; A must be real (D, N)")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (D, N) with D={dim}, got {tuple(A.shape)}")
    state = A.shape[1]
    for name, mat in (("B", B), ("C", C)):
        if mat.is_complex():
            raise ValueError(f"selective_scan: complex {name} is not supported")
        shape_ok = mat.ndim == 3 and mat.shape == (batch, state, length) or (
            mat.ndim == 4 and mat.shape[0] == batch and mat.shape[2:] == (state, length)
        )
        if not shape_ok:
            raise ValueError(
                f"selective_scan: {name} must be (B, N, L) = {(batch, state, length)} or (B, G, N, L), "
                f"got {tuple(mat.shape)}"
            )
        if mat.ndim == 4 and dim % mat.shape[1]:
            raise ValueError(f"selective_scan: {name} has {mat.shape[1]} groups, which do not divide D={dim}")
    groups = {mat.shape[1] if mat.ndim == 4 else 1 for mat in (B, C)}
    if len(groups) > 1:
        raise ValueError(f"selective_scan: B and C must have the same number of groups, got {sorted(groups)}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be ({dim},), got {tuple(vec.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (batch, dim, state):
        raise ValueError(
            f"selective_scan: initial_state must be (B, D, N) = {(batch, dim, state)}, "
            f"got {tuple(initial_state.shape)}"
        )


# --- the reference ------------------------------------------------------------------------------
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, *, initial_state=None):
    """The oracle: Gu & Dao (2023) Algorithm 2 / eq. (2a)-(2b), one time step at a time.

    u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or (B, G, N, L); D, delta_bias (D,);
    initial_state (B, D, N). Returns out (B, D, L) in u's dtype, and with `return_last_state`
    also h_{L-1} (B, D, N) in the compute dtype (float32, or float64 for float64 inputs).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, "sequential")
    compute = torch.promote_types(u.dtype, torch.float32)
    batch, dim, length = u.shape
    u_c, dt = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A = A.to(compute)
    B, C = (mat.to(compute) if mat.ndim == 4 else mat.to(compute).unsqueeze(1) for mat in (B, C))
    B = repeat(B, "b g n l -> b (g h) n l", h=dim // B.shape[1])
    C = repeat(C, "b g n l -> b (g h) n l", h=dim // C.shape[1])
    h = u_c.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(compute)
    outputs = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u_c[:, :, t])[..., None] * B[..., t]
        outputs.append((h * C[..., t]).sum(-1))
    y = torch.stack(outputs, dim=-1) if outputs else u_c.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    return (out, h) if return_last_state else out


# --- the eager chunked path ---------------------------------------------------------------------
def _inclusive_scan(decay: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hillis-Steele scan along dim -2 of h_k = decay_k h_{k-1} + x_k with h_{-1} = 0.
    Returns (prod_{j<=k} decay_j, h_k), both (..., K, N). Consumes its inputs (in place)."""
    length = decay.shape[-2]
    offset = 1
    while offset < length:
        x[..., offset:, :] += decay[..., offset:, :] * x[..., :-offset, :]
        decay[..., offset:, :] = decay[..., offset:, :] * decay[..., :-offset, :]
        offset *= 2
    return decay, x


def _chunk_states(u, dt, A, B, C, h_prev):
    """States of one chunk. u, dt (B, G, H, K); A (G, H, N); B, C (B, G, K, N); h_prev (B, G, H, N).
    Returns (states (B, G, H, K, N), decays exp(dt A) (B, G, H, K, N))."""
    decay = torch.exp(dt[..., None] * A[:, :, None])  # (B, G, H, K, N)
    x = (dt * u)[..., None] * B[:, :, None]  # (B, G, H, K, N)
    cumulative, local = _inclusive_scan(decay.clone(), x)
    return cumulative * h_prev[..., None, :] + local, decay


class _ChunkedScan(torch.autograd.Function):
    """Core scan (no D, z, bias, softplus) on the eager chunked path."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk):
        # u, dt (B, G, H, L); A (G, H, N); B, C (B, G, L, N); h0 (B, G, H, N)
        length = u.shape[-1]
        y = torch.empty_like(u)
        checkpoints = []
        h = h0
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            checkpoints.append(h)
            states, _ = _chunk_states(u[..., start:stop], dt[..., start:stop], A, B[:, :, start:stop],
                                      C[:, :, start:stop], h)
            y[..., start:stop] = torch.einsum("bghkn,bgkn->bghk", states, C[:, :, start:stop])
            h = states[..., -1, :].clone()  # a view would keep the whole chunk alive
        ctx.save_for_backward(u, dt, A, B, C, *checkpoints)
        ctx.chunk = chunk
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, dt, A, B, C, *checkpoints = ctx.saved_tensors
        chunk, length = ctx.chunk, u.shape[-1]
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dB, dC, dA = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
        dy = dy.contiguous() if dy is not None else torch.zeros_like(u)
        carry = dh_last if dh_last is not None else torch.zeros_like(checkpoints[0])  # dL/dh at chunk end
        for index in reversed(range(len(checkpoints))):
            start = index * chunk
            stop = min(length, start + chunk)
            u_k, dt_k, dy_k = u[..., start:stop], dt[..., start:stop], dy[..., start:stop]
            B_k, C_k = B[:, :, start:stop], C[:, :, start:stop]
            h_prev = checkpoints[index]
            states, decay = _chunk_states(u_k, dt_k, A, B_k, C_k, h_prev)
            previous = torch.cat([h_prev[..., None, :], states[..., :-1, :]], dim=-2)
            # Adjoint g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}: the same scan, reversed in time.
            next_decay = torch.cat([decay[..., 1:, :], torch.ones_like(decay[..., :1, :])], dim=-2)
            source = dy_k[..., None] * C_k[:, :, None]  # (B, G, H, K, N)
            cumulative, local = _inclusive_scan(next_decay.flip(-2), source.flip(-2))
            adjoint = (cumulative * carry[..., None, :] + local).flip(-2)  # (B, G, H, K, N)
            carry = decay[..., 0, :] * adjoint[..., 0, :]
            decayed_previous = decay * previous
            adjoint_B = torch.einsum("bghkn,bgkn->bghk", adjoint, B_k)
            weighted = adjoint * decayed_previous
            dB[:, :, start:stop] = torch.einsum("bghkn,bghk->bgkn", adjoint, dt_k * u_k)
            dC[:, :, start:stop] = torch.einsum("bghk,bghkn->bgkn", dy_k, states)
            du[..., start:stop] = dt_k * adjoint_B
            ddt[..., start:stop] = u_k * adjoint_B + torch.einsum("bghkn,ghn->bghk", weighted, A)
            dA += torch.einsum("bghkn,bghk->ghn", weighted, dt_k)
        return du, ddt, dA, dB, dC, carry, None


def _chunked_core(u, dt, A, B, C, h0, chunk):
    """u, dt (B, D, L); A (D, N); B, C (B, G, L, N); h0 (B, D, N) -> y (B, D, L), h_last (B, D, N)."""
    groups = B.shape[1]
    y, h_last = _ChunkedScan.apply(
        rearrange(u, "b (g h) l -> b g h l", g=groups), rearrange(dt, "b (g h) l -> b g h l", g=groups),
        rearrange(A, "(g h) n -> g h n", g=groups), B, C, rearrange(h0, "b (g h) n -> b g h n", g=groups), chunk,
    )
    return rearrange(y, "b g h l -> b (g h) l"), rearrange(h_last, "b g h n -> b (g h) n")


# --- the compiled path (KERNEL, built on first use) ---------------------------------------------
class _CompiledScan(torch.autograd.Function):
    """The whole selective scan (delta_bias, softplus, D skip and SiLU(z) gate fused) through the
    C++ kernel; D, z, delta_bias and h0 may be None. Both kernels take u, delta, z and dout with any
    strides (the portable backward copies them into (B, D, L) rows itself)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, chunk):
        out, h_last, checkpoints = KERNEL.load().forward(u, delta, A, B, C, D, z, delta_bias, softplus, h0, chunk,
                                                             _channel_last(u) or _channel_last(delta))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
        ctx.softplus, ctx.chunk, ctx.has_initial_state = softplus, chunk, h0 is not None
        return out, h_last

    @staticmethod
    def backward(ctx, dout, dh_last):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        dout = dout if dout is not None else torch.zeros_like(u)
        dh_last = dh_last.contiguous() if dh_last is not None else None
        du, ddelta, dA, dB, dC, dh0, dD, dbias, dz = KERNEL.load().backward(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, checkpoints, dout, dh_last, ctx.chunk
        )
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                dbias if delta_bias is not None else None, dh0 if ctx.has_initial_state else None, None, None)


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def _channel_last(t: torch.Tensor) -> bool:
    """(B, D, L) laid out as (B, L, D): the kernel then writes its output in that layout too."""
    return t.shape[1] > 1 and t.stride(1) == 1


def _compiled_scan(u, delta, A, B, C, D, z, delta_bias, softplus, h0, chunk):
    """All inputs in the compute dtype; B, C (B, G, L, N); optional ones None -> out, h_last.
    u, delta, z keep their strides (the forward kernel reads any layout); out is channel-last
    (a (B, D, L) view of a (B, L, D) tensor) when u or delta is, else contiguous."""
    return _CompiledScan.apply(u, delta, _dense(A), B, C, _dense(D), z, _dense(delta_bias), _dense(h0), softplus,
                               chunk)


# --- dispatch -----------------------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device | str, has_initial_state: bool = False) -> str:
    """The path `backend` runs on `device`: "cuda" (mamba-ssm's kernel), "compiled", "chunked" or
    "sequential". "auto" on CPU builds the compiled kernel if needed and falls back to "chunked"
    with a one-time notice saying why; an explicit "compiled" that cannot run raises."""
    check_backend("selective_scan", backend, BACKENDS)
    device = torch.device(device)
    if backend in ("chunked", "sequential"):
        return backend
    if backend == "auto" and cuda_kernels_usable("mamba_ssm", device) and not has_initial_state:
        notify_once("selective_scan:cuda", "selective_scan runs mamba-ssm's CUDA kernel")
        return "cuda"
    return compiled_or_eager("selective_scan", backend, device, KERNEL)


def describe_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """What `resolve_backend` would pick, in words, without building anything."""
    check_backend("selective_scan", backend, BACKENDS)
    if backend == "auto" and cuda_kernels_usable("mamba_ssm", device):
        return "backend=auto: mamba-ssm CUDA kernel"
    return describe_compiled_or_eager(backend, device, KERNEL, "eager chunked")


def _cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, backend: Backend = "auto", chunk_size=CHUNK_SIZE,
                   scan: str | None = None):
    """mamba-ssm's `selective_scan_fn`, plus `initial_state`, on the path `backend` picks
    (`resolve_backend`; `scan=` is the deprecated name of `backend=`).

    u, delta, z (B, D, L); A (D, N) real; B, C (B, N, L) shared by all channels or (B, G, N, L) in
    G groups; D, delta_bias (D,); initial_state (B, D, N). Returns out (B, D, L) in u's dtype (on the
    compiled path a view of a (B, L, D) tensor when u or delta is one), and
    with `return_last_state` also the final state (B, D, N) in the compute dtype (float32, or
    float64 for float64 inputs). `chunk_size` is K: the checkpoint interval of backward and the
    chunk of the eager path (memory O(B D K N)).
    """
    backend = renamed_keyword("selective_scan", backend, "scan", scan)
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, backend)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    path = resolve_backend(backend, u.device, initial_state is not None)
    if path == "sequential":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state)
    if path == "cuda":
        return _cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    compute = torch.promote_types(u.dtype, torch.float32)
    B, C = (rearrange(mat if mat.ndim == 4 else mat.unsqueeze(1), "b g n l -> b g l n").to(compute).contiguous()
            for mat in (B, C))
    if path == "compiled":
        def cast(t):
            return t.to(compute) if t is not None else None

        out, last_state = _compiled_scan(cast(u), cast(delta), cast(A), B, C, cast(D), cast(z), cast(delta_bias),
                                         bool(delta_softplus), cast(initial_state), chunk_size)
        out = out.to(u.dtype)
        return (out, last_state) if return_last_state else out
    u_c, dt = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    batch, dim, _ = u.shape
    h0 = u_c.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(compute)
    y, last_state = _chunked_core(u_c, dt, A.to(compute), B, C, h0, chunk_size)
    if D is not None:
        y = y + u_c * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    return (out, last_state) if return_last_state else out


# Earlier names, kept as aliases for one release (CHANGELOG.md): the backend switch was `scan`.
SCANS = BACKENDS
resolve_scan = resolve_backend
