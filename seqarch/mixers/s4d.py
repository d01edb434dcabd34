"""S4D: a diagonal linear time-invariant state-space model per channel.

Gu, Gupta, Goel, Ré (2022), "On the Parameterization and Initialization of Diagonal State Space
Models". Legend: B batch, L length, D channels (= model width), N complex modes (= d_state / 2;
the conjugate half is implied, hence the 2 Re(...) below).

Continuous system per channel: h'(t) = A h(t) + B u(t), y(t) = 2 Re(C h(t)) + D u(t), with A
diagonal complex (Re A < 0) and B = 1 (absorbed into C). Zero-order hold with step dt gives

    dA = exp(dt A),   dB = (exp(dt A) - 1) / A
    h_t = dA * h_{t-1} + dB * u_t,   y_t = 2 Re(sum_n C_n h_{t,n}) + D u_t          (recurrent path)
    K_l = 2 Re(sum_n C_n dB_n dA_n^l),   y = K * u + D u   (causal conv, FFT)  (parallel path)

Initialisation, n = 0 .. d_state/2 - 1: S4D-Lin A_n = -1/2 + i pi n; S4D-Inv A_n = -1/2 + i (S / pi)(S / (2n + 1) - 1)
with S = d_state, the full real state size, as the S4 code evaluates it (state-spaces/s4,
src/models/sequence/kernels/dplr.py, `dplr(init="inv", N=d_state)`, which keeps N//2 modes);
log dt uniform in [log dt_min, log dt_max]. The layer then applies GELU and a position-wise GLU
output projection, as the paper's S4D block does.

Powers dA^l are formed as polar(exp(l Re(dt A)), (l Im(dt A)) mod 2 pi) with the angle reduced
in float64: in float32 the raw angle l * Im(dt A) reaches 1e5 rad at l = 16k and would lose
two decimal digits of the phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.mixers.base import (
    MixerState,
    SequenceMixer,
    check_input,
    check_positive,
    check_state,
    complex_dtype,
    element_size,
)
from seqarch.ops.fftconv import fftconv
from seqarch.registry import register


@dataclass(frozen=True)
class S4DConfig:
    d_model: int = 256
    d_state: int = 64  # real state size per channel; d_state / 2 complex modes
    init: Literal["inv", "lin"] = "inv"  # S4D-Inv or S4D-Lin imaginary parts of A
    dt_min: float = 1e-3  # log dt is initialised uniformly in [log dt_min, log dt_max]
    dt_max: float = 1e-1

    def __post_init__(self):
        check_positive("s4d", d_model=self.d_model)
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"s4d: d_state must be an even number >= 2, got {self.d_state}")
        if self.init not in ("inv", "lin"):
            raise ValueError(f"s4d: init={self.init!r}; valid: 'inv', 'lin'")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"s4d: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def n_modes(self) -> int:
        return self.d_state // 2


@dataclass
class S4DState(MixerState):
    ssm: torch.Tensor  # (B, D, N) complex


@register("s4d", S4DConfig)
class S4DMixer(SequenceMixer):
    def __init__(self, config: S4DConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        modes = config.n_modes
        factory = {"device": device, "dtype": dtype}
        log_dt = torch.rand(width) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
        n = torch.arange(modes, dtype=torch.float64)
        if config.init == "lin":
            imag = math.pi * n
        else:
            # S4D-Inv: the formula takes the full state size d_state (not the d_state / 2 modes kept).
            imag = config.d_state / math.pi * (config.d_state / (2 * n + 1) - 1)
        self.log_dt = nn.Parameter(log_dt.to(**factory))
        self.log_A_real = nn.Parameter(torch.full((width, modes), math.log(0.5)).to(**factory))
        self.A_imag = nn.Parameter(imag.float().repeat(width, 1).to(**factory))
        # C ~ N(0, 1) complex, stored as (real, imag) pairs so optimizers see real tensors.
        self.C = nn.Parameter((torch.randn(width, modes, 2) * 0.5**0.5).to(**factory))
        self.D = nn.Parameter(torch.randn(width).to(**factory))
        self.out_proj = nn.Linear(width, 2 * width, **factory)
        self.out_proj._is_residual_projection = True  # GLU output linear, scaled by 1/sqrt(depth) in the model init
        for param in (self.log_dt, self.log_A_real, self.A_imag):
            param._no_weight_decay = True

    # --- discretisation -------------------------------------------------------------------
    def _discrete(self):
        """dt*A split into (real (D, N), imag (D, N) in float64) and C * dB (D, N) complex."""
        dt = self.log_dt.exp()[:, None]
        A = torch.complex(-self.log_A_real.exp(), self.A_imag)
        dtA = dt * A
        dB = torch.expm1(dtA) / A
        C = torch.view_as_complex(self.C.contiguous())
        return dtA.real, dtA.imag.double(), C, dB

    @staticmethod
    def _powers(dtA_real, dtA_imag64, exponents: torch.Tensor) -> torch.Tensor:
        """dA^p for p in `exponents` (P,): (D, N, P) complex, phase reduced in float64."""
        magnitude = torch.exp(dtA_real[..., None] * exponents.to(dtA_real.dtype))
        angle = torch.remainder(dtA_imag64[..., None] * exponents.double(), 2 * math.pi)
        return torch.polar(magnitude, angle.to(dtA_real.dtype))

    def _power_tables(self, dtA_real, dtA_imag64, length: int):
        """dA^l for l = o J + j < O J, J = ceil(sqrt(length)), as two tables: inner dA^j (D, N, J) and
        outer dA^(oJ) (D, N, O). Every length-L Vandermonde sum then becomes batched products of
        O(D N sqrt(L)) powers instead of O(D N L), and autograd keeps only the tables."""
        inner = math.isqrt(max(length - 1, 0)) + 1
        outer = -(-length // inner)
        device = dtA_real.device
        z_inner = self._powers(dtA_real, dtA_imag64, torch.arange(inner, device=device))
        z_outer = self._powers(dtA_real, dtA_imag64, torch.arange(outer, device=device) * inner)
        return z_inner, z_outer

    @staticmethod
    def _power_series(coefficient: torch.Tensor, z_inner: torch.Tensor, z_outer: torch.Tensor,
                      length: int) -> torch.Tensor:
        """2 Re(sum_n coefficient_n dA_n^l) for l < length: coefficient (..., D, N) -> (..., D, length)."""
        blocks = (coefficient[..., None] * z_outer).transpose(-1, -2) @ z_inner  # (..., D, O, J)
        return 2 * blocks.real.flatten(-2)[..., :length]

    def kernel(self, length: int) -> torch.Tensor:
        """The convolution kernel K (D, length), K_l = 2 Re(sum_n C_n dB_n dA_n^l)."""
        dtA_real, dtA_imag64, C, dB = self._discrete()
        return self._power_series(C * dB, *self._power_tables(dtA_real, dtA_imag64, length), length)

    # --- the contract -----------------------------------------------------------------------
    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return F.glu(self.out_proj(F.gelu(y)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "s4d.forward")
        u = rearrange(x, "b l d -> b d l")
        y = fftconv(u, self.kernel(u.shape[-1]).to(u.dtype), self.D)
        return self._output(rearrange(y, "b d l -> b l d"))

    def init_state(self, batch_size: int, device=None, dtype=None) -> S4DState:
        factory = self.state_factory(device, dtype)
        return S4DState(ssm=torch.zeros(batch_size, self.d_model, self.config.n_modes, device=factory["device"],
                                        dtype=complex_dtype(factory["dtype"])))

    def prefill(self, x: torch.Tensor, state: S4DState) -> tuple[torch.Tensor, S4DState]:
        check_input(x, self.d_model, 3, "s4d.prefill")
        check_state(state, S4DState, x.shape[0], "s4d.prefill", complex_fields=("ssm",))
        u = rearrange(x, "b l d -> b d l")
        length = u.shape[-1]
        dtA_real, dtA_imag64, C, dB = self._discrete()
        z_inner, z_outer = self._power_tables(dtA_real, dtA_imag64, length)
        y = fftconv(u, self._power_series(C * dB, z_inner, z_outer, length).to(u.dtype), self.D)
        h0 = state.ssm.to(C.dtype)
        dA = torch.polar(dtA_real.exp(), dtA_imag64.to(dtA_real.dtype))
        # y_t += 2 Re(sum_n C_n dA_n^(t+1) h0_n): the initial state decaying into the sequence.
        decayed = self._power_series(C * dA * h0, z_inner, z_outer, length)  # (B, D, L)
        # h_L = dA^L h0 + sum_s dA^(L-1-s) dB u_s, with s' = L-1-s = o J + j split like the powers.
        inner, outer = z_inner.shape[-1], z_outer.shape[-1]
        reversed_u = F.pad(u.flip(-1), (0, outer * inner - length)).to(C.dtype)
        partial = rearrange(reversed_u, "b d (o j) -> b d o j", j=inner) @ z_inner.transpose(-1, -2)  # (B, D, O, N)
        final = (partial * z_outer.transpose(-1, -2)).sum(-2) * dB
        final = final + h0 * self._powers(dtA_real, dtA_imag64, torch.tensor([length], device=u.device))[..., 0]
        y = y + decayed.to(y.dtype)
        return self._output(rearrange(y, "b d l -> b l d")), S4DState(ssm=final.to(state.ssm.dtype))

    def step(self, x_t: torch.Tensor, state: S4DState) -> tuple[torch.Tensor, S4DState]:
        check_input(x_t, self.d_model, 2, "s4d.step")
        check_state(state, S4DState, x_t.shape[0], "s4d.step", complex_fields=("ssm",))
        dtA_real, dtA_imag64, C, dB = self._discrete()
        dA = torch.polar(dtA_real.exp(), dtA_imag64.to(dtA_real.dtype))
        h = dA * state.ssm.to(C.dtype) + dB * x_t[..., None].to(C.dtype)  # (B, D, N)
        y = 2 * (h * C).sum(-1).real.to(x_t.dtype) + self.D * x_t
        return self._output(y), S4DState(ssm=h.to(state.ssm.dtype))

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): per (channel, complex
        mode) h = dA h + dB x (complex multiply 6, real scale 2, add 2) and 2 Re(C h) summed (4), so
        14 D N/2, plus the D skip (2 D); independent of the context length."""
        return 14 * self.d_model * self.config.n_modes + 2 * self.d_model

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        complex_bytes = element_size(complex_dtype(dtype))
        return batch_size * self.d_model * self.config.n_modes * complex_bytes


S4D = S4DMixer  # the class's earlier name, kept as an alias for one release
