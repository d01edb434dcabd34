"""Diagonal (modal) SSM filters: their kernel, and fitting one to a given long filter.

Massaroli, Poli, Fu et al. (2023), "Laughing Hyena Distillery: Extracting Compact Recurrences
From Convolutions". Legend: C channels (any leading dims), M complex modes (the conjugate half is
implied, so a channel's real state size is 2M), L length, P exponents.

A channel's filter is a sum of damped complex exponentials (eq. 3.2 of the paper, with the
conjugate pairs written as 2 Re):

    h[l] = 2 Re( sum_m R_m lambda_m^l ),   lambda_m = exp(-exp(log_rate_m) + i angle_m),   |lambda_m| < 1

which is the impulse response of the diagonal recurrence

    s_t = lambda * s_{t-1} + u_t,   y_t = 2 Re( sum_m R_m s_{t,m} )

Powers lambda^l are formed as polar(exp(-rate l), (angle l) mod 2 pi) with the phase reduced in
float64, as in seqarch/mixers/s4d.py, so float32 kernels keep their phase at long l.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Elements of one (C, M, P) block of powers; bounds the memory of kernel generation.
_POWER_BLOCK_ELEMENTS = 1 << 22


def modal_powers(log_rate: torch.Tensor, angle: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """lambda^p for p in `exponents` (P,): log_rate, angle (C, M) -> (C, M, P) complex."""
    magnitude = torch.exp(-log_rate.exp()[..., None] * exponents.to(log_rate.dtype))
    phase = torch.remainder(angle.double()[..., None] * exponents.double(), 2 * math.pi)
    return torch.polar(magnitude, phase.to(log_rate.dtype))


def power_blocks(n_elements_per_step: int, length: int):
    """(start, stop) ranges over [0, length) whose (C, M, stop - start) powers stay bounded."""
    block = max(1, _POWER_BLOCK_ELEMENTS // max(1, n_elements_per_step))
    for start in range(0, length, block):
        yield start, min(length, start + block)


def modal_kernel(log_rate: torch.Tensor, angle: torch.Tensor, residue: torch.Tensor, length: int) -> torch.Tensor:
    """h[l] = 2 Re(sum_m R_m lambda_m^l) for l < length: (C, M) parameters, residue complex -> (C, L) real."""
    pieces = []
    for start, stop in power_blocks(residue.numel(), length):
        exponents = torch.arange(start, stop, device=residue.device)
        powers = modal_powers(log_rate, angle, exponents)  # (C, M, P)
        pieces.append(2 * torch.einsum("...m,...mp->...p", residue, powers).real)
    return torch.cat(pieces, dim=-1)


def modal_kernel_ref(log_rate: torch.Tensor, angle: torch.Tensor, residue: torch.Tensor, length: int) -> torch.Tensor:
    """The impulse response of s_t = lambda s_{t-1} + u_t, y_t = 2 Re(R . s_t), one step at a time."""
    lam = torch.polar(torch.exp(-log_rate.exp()), angle)
    state = torch.zeros_like(residue)
    outputs = []
    for t in range(length):
        state = lam * state + (1.0 if t == 0 else 0.0)
        outputs.append(2 * (residue * state).sum(-1).real)
    return torch.stack(outputs, dim=-1)


@dataclass
class ModalFit:
    """Poles and residues of a fitted modal filter, and its error."""

    log_rate: torch.Tensor  # (C, M) lambda magnitude = exp(-exp(log_rate))
    angle: torch.Tensor  # (C, M) lambda phase, radians per step
    residue: torch.Tensor  # (C, M) complex
    relative_error: torch.Tensor  # (C,) ||h - h_fit||_2 / ||h||_2 over the fitted length


def _solve_residues(h: torch.Tensor, log_rate: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Least-squares residues for fixed poles: h (C, L) real -> R (C, M) complex.

    2 Re(R lambda^l) = 2 Re(R) Re(lambda^l) - 2 Im(R) Im(lambda^l) is linear in (Re R, Im R)."""
    powers = modal_powers(log_rate, angle, torch.arange(h.shape[-1], device=h.device))  # (C, M, L)
    design = torch.cat([2 * powers.real, -2 * powers.imag], dim=1).transpose(1, 2)  # (C, L, 2M)
    solution = torch.linalg.lstsq(design, h[..., None], driver="gelsd").solution[..., 0]  # (C, 2M)
    real, imag = solution.chunk(2, dim=-1)
    return torch.complex(real, imag)


def _fit_block(h: torch.Tensor, n_modes: int, decay_rate: torch.Tensor, steps: int, lr: float):
    """Fit one block of channels h (C, L) float64. Poles are optimised in window units
    (rate and angle times L) so that one Adam learning rate suits both."""
    channels, length = h.shape
    # Start: a damped Fourier basis on the window, every mode decaying like the filter's envelope.
    window_rate = (decay_rate * length).clamp(min=1e-2)[:, None].expand(channels, n_modes)
    window_angle = (2 * math.pi * torch.arange(n_modes, dtype=h.dtype, device=h.device)).expand(channels, n_modes)
    log_window_rate = window_rate.log().clone().requires_grad_(True)
    window_angle = window_angle.clone().requires_grad_(True)

    def poles():
        return log_window_rate - math.log(length), window_angle / length

    with torch.no_grad():
        residue = _solve_residues(h, *poles())
    residue = torch.view_as_real(residue).clone().requires_grad_(True)
    energy = h.pow(2).sum(-1)
    optimizer = torch.optim.Adam([log_window_rate, window_angle, residue], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        fitted = modal_kernel(*poles(), torch.view_as_complex(residue), length)
        loss = ((fitted - h).pow(2).sum(-1) / energy).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        log_rate, angle = poles()
        residue = _solve_residues(h, log_rate, angle)  # residues optimal for the final poles
        error = (modal_kernel(log_rate, angle, residue, length) - h).norm(dim=-1) / energy.sqrt()
    return log_rate.detach(), angle.detach(), residue, error


def fit_modal(h: torch.Tensor, n_modes: int, decay_rate: torch.Tensor | None = None, steps: int = 300,
              lr: float = 0.05) -> ModalFit:
    """Fit h (C, L) with n_modes complex modes per channel, in float64.

    `decay_rate` (C,) is a per-step decay of each channel's envelope used to place the initial
    poles (Hyena knows it from its modulation); None starts every mode at rate 3 / L. Residues
    start from least squares on the initial poles, then poles and residues take `steps` Adam
    steps on the relative squared error, and finally the residues are re-solved by least squares.
    """
    if h.ndim != 2:
        raise ValueError(f"fit_modal expects h of shape (C, L), got {tuple(h.shape)}")
    if n_modes < 1:
        raise ValueError(f"fit_modal needs n_modes >= 1, got {n_modes}")
    h = h.detach().double()
    channels, length = h.shape
    if decay_rate is None:
        decay_rate = torch.full((channels,), 3.0 / length, dtype=torch.float64, device=h.device)
    decay_rate = decay_rate.detach().double()
    # Autograd keeps a few (C, M, L) complex tensors per step: bound them by the block size.
    block = max(1, _POWER_BLOCK_ELEMENTS // (n_modes * length))
    results = []
    with torch.enable_grad():
        for start in range(0, channels, block):
            rows = slice(start, start + block)
            results.append(_fit_block(h[rows], n_modes, decay_rate[rows], steps, lr))
    log_rate, angle, residue, error = (torch.cat(parts) for parts in zip(*results, strict=True))
    return ModalFit(log_rate=log_rate, angle=angle, residue=residue, relative_error=error)
