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


def _solve_residues(h: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Least-squares residues for fixed poles: h (C, L) real, basis lambda^l (C, M, L) -> R (C, M).

    2 Re(R lambda^l) = 2 Re(R) Re(lambda^l) - 2 Im(R) Im(lambda^l) is linear in (Re R, Im R)."""
    design = torch.cat([2 * basis.real, -2 * basis.imag], dim=1).transpose(1, 2)  # (C, L, 2M)
    solution = torch.linalg.lstsq(design, h[..., None], driver="gelsd").solution[..., 0]  # (C, 2M)
    real, imag = solution.chunk(2, dim=-1)
    return torch.complex(real, imag)


def fit_modal(h: torch.Tensor, n_modes: int, decay_rate: torch.Tensor | None = None) -> ModalFit:
    """Fit h (C, L) with n_modes complex modes per channel, in float64.

    Poles: a damped Fourier basis on the window, lambda_m = exp(-decay_rate + 2 pi i m / L) for
    m < n_modes, every mode decaying like the channel's envelope (`decay_rate` (C,) per step;
    Hyena knows it from its modulation; None takes 3 / L). Residues: linear least squares. The
    mode sets are nested, so the error cannot grow with n_modes.
    """
    if h.ndim != 2:
        raise ValueError(f"fit_modal expects h of shape (C, L), got {tuple(h.shape)}")
    if n_modes < 1:
        raise ValueError(f"fit_modal needs n_modes >= 1, got {n_modes}")
    h = h.detach().double()
    channels, length = h.shape
    if decay_rate is None:
        decay_rate = torch.full((channels,), 3.0 / length, device=h.device)
    log_rate = decay_rate.detach().double().clamp(min=1e-3 / length).log()[:, None].expand(channels, n_modes)
    angle = (2 * math.pi / length * torch.arange(n_modes, dtype=torch.float64, device=h.device)).expand_as(log_rate)
    # The least-squares design is (C, L, 2M): bound it by solving blocks of channels.
    block = max(1, _POWER_BLOCK_ELEMENTS // (2 * n_modes * length))
    exponents = torch.arange(length, device=h.device)
    residues = [_solve_residues(h[rows], modal_powers(log_rate[rows], angle[rows], exponents))
                for rows in (slice(start, start + block) for start in range(0, channels, block))]
    residue = torch.cat(residues)
    error = (modal_kernel(log_rate, angle, residue, length) - h).norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-300)
    return ModalFit(log_rate=log_rate.contiguous(), angle=angle.contiguous(), residue=residue, relative_error=error)
