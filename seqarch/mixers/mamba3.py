"""Mamba-3: exponential-trapezoidal SSM with data-dependent rotations (complex state) and optional MIMO.

Lahoti, Li, Chen, Wang, Bick, Kolter, Dao and Gu (2026), "Mamba-3: Improved Sequence Modeling using
State Space Principles" (arXiv 2603.15569), following mamba-ssm's `Mamba3` module
(mamba_ssm/modules/mamba3.py) in parameter names, shapes and initialisation, so its state dict loads
with `load_state_dict` for the same config. Where mamba-ssm says `headdim` / `nheads` / `ngroups`,
the config here says `head_dim` / `n_heads` / `n_groups` (docs/mixers/mamba3.md has the mapping).

Legend: B batch, L length, D model width, E inner width (= expand * D), H heads, P head dim
(E = H * P), G groups of B/C, R MIMO rank (1 for SISO), N state size, S rotation angles.

    z, x, B, C, dd_dt, dd_A, trap, angle = in_proj(u)   (E, E, R G N, R G N, H, H, H, S) per token
    dt    = softplus(dd_dt + dt_bias)                   A = min(-heavy_tail(dd_A), -A_floor) (or softplus)
    B, C  = RMSNorm(B), RMSNorm(C)  over N               biases B_bias, C_bias (H, R, N) added in the scan
    y     = mamba3_scan(x, dt, A, B, C, sigmoid(trap), tanh(angle) * pi, D, z)   see seqarch/ops/mamba3.py
    out   = out_proj(y)            (or out_proj(RMSNorm_heads(y) * silu(z)) when is_outproj_norm)

There is no short convolution (Mamba-3 drops it). The recurrent state is the cumulative angles, the
SSM state, and the previous token's rotated B and its x, which the trapezoidal rule needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.backends import notify_once
from seqarch.mixers.base import MixerState, SequenceMixer, check_input, check_positive, check_state
from seqarch.ops.mamba3 import Backend, Mamba3ScanState, describe_backend, mamba3_scan, mamba3_step, resolve_backend
from seqarch.registry import register


@dataclass(frozen=True)
class Mamba3Config:
    d_model: int = 256
    # --- sizes (mamba-ssm's defaults, but for head_dim)
    d_state: int = 128  # N, state size per head channel
    expand: int = 2  # inner width E = expand * d_model
    head_dim: int = 32  # P (mamba-ssm: headdim, default 64); 32 keeps widths in steps of 16 valid, as mamba2
    n_groups: int = 1  # G groups of B/C shared by H / G heads before the per-head biases (mamba-ssm: ngroups)
    # --- rotations (the complex-valued state)
    rope_fraction: float = 0.5  # share of the N state channels that rotate: 0.5 or 1.0
    # --- dt and A
    dt_min: float = 1e-3  # softplus(dt_bias) is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4  # lower clamp of the initial dt
    A_floor: float = 1e-4  # A <= -A_floor, so every step decays a little
    # A = -f(dd_A): mamba-ssm's main branch uses the heavy-tail f (stabler at high learning rates);
    # its 2.3.2.post1 release used softplus. Pick the one a checkpoint was trained with.
    A_activation: Literal["heavy_tail", "softplus"] = "heavy_tail"
    # --- output and MIMO
    is_outproj_norm: bool = False  # a per-head gated RMSNorm before out_proj (off: silu(z) gates y directly)
    is_mimo: bool = False  # multi-input multi-output: rank-R B/C and x, z, y projections
    mimo_rank: int = 4  # R when is_mimo (the decode state does not grow with R)
    # --- algorithm
    chunk_size: int = 64  # Q of the chunked scan (mamba-ssm recommends 64 for SISO)
    backend: Backend = "auto"  # "auto" | "compiled" | "chunked" | "sequential"; see seqarch.ops.mamba3.resolve_backend

    def __post_init__(self):
        check_positive("mamba3", **{name: getattr(self, name) for name in ("d_model", "d_state", "expand", "head_dim",
                                                                          "n_groups", "mimo_rank", "chunk_size")})
        if self.d_inner % self.head_dim:
            raise ValueError(f"mamba3: inner width expand * d_model = {self.d_inner} is not divisible by "
                             f"head_dim={self.head_dim}")
        if self.n_heads % self.n_groups:
            raise ValueError(f"mamba3: the {self.n_heads} heads are not divisible into n_groups={self.n_groups}")
        if self.rope_fraction not in (0.5, 1.0):
            raise ValueError(f"mamba3: rope_fraction must be 0.5 or 1.0, got {self.rope_fraction}")
        if self.n_angles < 1:
            raise ValueError(f"mamba3: d_state={self.d_state} leaves no rotation angle at rope_fraction="
                             f"{self.rope_fraction}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"mamba3: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def rank(self) -> int:
        """R: mimo_rank when is_mimo, else 1 (as mamba-ssm)."""
        return self.mimo_rank if self.is_mimo else 1

    @property
    def n_angles(self) -> int:
        """S = the even part of rope_fraction * N, halved (mamba-ssm's num_rope_angles)."""
        rotated = int(self.d_state * self.rope_fraction)
        return (rotated - rotated % 2) // 2

    @property
    def rotary(self) -> str:
        """mamba-ssm's SISO path pairs channels (2i, 2i + 1); its MIMO kernels pair (i, i + N / 2)."""
        return "halves" if self.is_mimo else "pairwise"


@dataclass
class Mamba3State(MixerState):
    angle: torch.Tensor  # (B, H, S) cumulative rotation angles
    ssm: torch.Tensor  # (B, H, P, N)
    k: torch.Tensor  # (B, R, H, N) the previous token's rotated, biased B
    x: torch.Tensor  # (B, H, P) the previous token's x


def heavy_tail(x: torch.Tensor) -> torch.Tensor:
    """1 + x for x >= 0, 1 / (1 - x) for x < 0: positive, smooth at 0, with a heavy tail (mamba-ssm's
    `heavy_tail_activation` for the data-dependent A)."""
    return x.clamp_min(0) + torch.reciprocal(1 - x.clamp_max(0))


class GroupRMSNorm(nn.Module):
    """RMSNorm over groups of `group_size` channels times a weight, then * silu(z) when z is given
    (mamba-ssm's gated RMSNorm with norm_before_gate=True; its `bias` is None, so only `weight`)."""

    def __init__(self, width: int, group_size: int | None = None, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.group_size = group_size or width
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        grouped = rearrange(x, "... (g c) -> ... g c", c=self.group_size)
        y = rearrange(F.rms_norm(grouped, (self.group_size,), eps=self.eps), "... g c -> ... (g c)") * self.weight
        return y if z is None else y * F.silu(z)


@register("mamba3", Mamba3Config)
class Mamba3Mixer(SequenceMixer):
    def __init__(self, config: Mamba3Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        factory = {"device": device, "dtype": dtype}
        cfg, heads, rank = config, config.n_heads, config.rank
        # Order: [z, x, B, C, dd_dt, dd_A, trap, angle], as mamba-ssm.
        self.split_sizes = [cfg.d_inner, cfg.d_inner, cfg.d_state * cfg.n_groups * rank,
                            cfg.d_state * cfg.n_groups * rank, heads, heads, heads, cfg.n_angles]
        self.in_proj = nn.Linear(cfg.d_model, sum(self.split_sizes), bias=False, **factory)
        dt = torch.exp(torch.rand(heads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        # Inverse softplus, so softplus(dt_bias) starts at dt: log(exp(dt) - 1) = dt + log(1 - exp(-dt)).
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(**factory))
        self.B_bias = nn.Parameter(torch.ones(heads, rank, cfg.d_state, **factory))
        self.C_bias = nn.Parameter(torch.ones(heads, rank, cfg.d_state, **factory))
        self.B_norm = GroupRMSNorm(cfg.d_state, **factory)
        self.C_norm = GroupRMSNorm(cfg.d_state, **factory)
        if cfg.is_mimo:
            self.mimo_x = nn.Parameter(torch.full((heads, rank, cfg.head_dim), 1 / rank, **factory))
            self.mimo_z = nn.Parameter(torch.ones(heads, rank, cfg.head_dim, **factory))
            self.mimo_o = nn.Parameter(torch.full((heads, rank, cfg.head_dim), 1 / rank, **factory))
        self.D = nn.Parameter(torch.ones(heads, **factory))
        if cfg.is_outproj_norm:
            self.norm = GroupRMSNorm(cfg.d_inner, group_size=cfg.head_dim, **factory)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False, **factory)
        self.out_proj._is_residual_projection = True  # mamba-ssm's model init divides it by sqrt(depth)
        self.in_proj._no_reinit = self.out_proj._no_reinit = True  # mamba-ssm keeps PyTorch's default init
        for param in (self.dt_bias, self.D):
            param._no_weight_decay = True

    # --- pieces shared by the paths ---------------------------------------------------------
    def _scan_inputs(self, u: torch.Tensor) -> dict:
        """in_proj and the per-token maps: u (..., D) -> the arguments of mamba3_scan / mamba3_step
        ((..., H, P) x and z, (..., H) dt, A, trap, (..., R, G, N) B and C, (..., H, S) angles)."""
        cfg = self.config
        z, x, B, C, dd_dt, dd_A, trap, angle = torch.split(self.in_proj(u), self.split_sizes, dim=-1)
        B = self.B_norm(rearrange(B, "... (r g n) -> ... r g n", r=cfg.rank, g=cfg.n_groups))
        C = self.C_norm(rearrange(C, "... (r g n) -> ... r g n", r=cfg.rank, g=cfg.n_groups))
        angles = (torch.tanh(angle) * math.pi).unsqueeze(-2).expand(*angle.shape[:-1], cfg.n_heads, cfg.n_angles)
        arguments = {
            "x": rearrange(x, "... (h p) -> ... h p", p=cfg.head_dim),
            "dt": F.softplus(dd_dt + self.dt_bias),
            "A": torch.clamp(-(heavy_tail(dd_A) if cfg.A_activation == "heavy_tail" else F.softplus(dd_A)),
                             max=-cfg.A_floor),
            "B": B,
            "C": C,
            "trap": torch.sigmoid(trap),
            "angles": angles,
            "D": self.D,
            "B_bias": self.B_bias,
            "C_bias": self.C_bias,
            "rotary": cfg.rotary,
        }
        z = rearrange(z, "... (h p) -> ... h p", p=cfg.head_dim)
        if cfg.is_mimo:
            arguments.update(mimo_x=self.mimo_x, mimo_z=self.mimo_z)
        if cfg.is_outproj_norm:
            return arguments, z  # the gate goes through the norm after the scan
        if cfg.is_mimo:
            arguments["mimo_o"] = self.mimo_o
        return {**arguments, "z": z}, None

    def _finish(self, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """y (..., H, P), or (..., R, H, P) per rank when is_outproj_norm and MIMO -> (..., D)."""
        cfg = self.config
        if cfg.is_outproj_norm:
            if cfg.is_mimo:
                z_r = torch.einsum("...hp,hrp->...rhp", z, self.mimo_z)
                y = self.norm(rearrange(y, "... h p -> ... (h p)"), rearrange(z_r, "... h p -> ... (h p)"))
                y = torch.einsum("...rhp,hrp->...hp", rearrange(y, "... (h p) -> ... h p", p=cfg.head_dim),
                                 self.mimo_o)
            else:
                y = rearrange(self.norm(rearrange(y, "... h p -> ... (h p)"), rearrange(z, "... h p -> ... (h p)")),
                              "... (h p) -> ... h p", p=cfg.head_dim)
        return self.out_proj(rearrange(y, "... h p -> ... (h p)"))

    def _path(self, device: torch.device) -> str:
        path = resolve_backend(self.config.backend, device)
        notify_once(f"mamba3-{path}-{device.type}", f"mamba3 runs the {path} scan on {device.type}")
        return path

    def _mix(self, u: torch.Tensor, state: Mamba3State | None):
        cfg = self.config
        self._path(u.device)
        arguments, z = self._scan_inputs(u)
        initial = None
        if state is not None:
            initial = Mamba3ScanState(*(t.to(u.dtype) for t in (state.angle, state.ssm, state.k, state.x)))
        y, final = mamba3_scan(**arguments, initial_state=initial, output_final_state=state is not None,
                               chunk_size=cfg.chunk_size, backend=cfg.backend)
        out = self._finish(y, z)
        if state is None:
            return out, None
        return out, self._new_state(final, state)

    @staticmethod
    def _new_state(final: Mamba3ScanState, state: Mamba3State) -> Mamba3State:
        return Mamba3State(angle=final.angle.to(state.angle.dtype), ssm=final.ssm.to(state.ssm.dtype),
                           k=final.k.to(state.k.dtype), x=final.x.to(state.x.dtype))

    # --- the contract -----------------------------------------------------------------------
    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        backend = self.config.backend
        what = {"compiled": "chunked scan with its products in a compiled C++ CPU kernel",
                "chunked": "chunked SSD-style scan (PyTorch)", "sequential": "sequential reference"}.get(backend)
        described = describe_backend(backend, device) if what is None else f"backend={backend}: {what}"
        return f"{described}; recurrent step"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "mamba3.forward")
        return self._mix(x, None)[0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> Mamba3State:
        cfg = self.config
        reference = self.out_proj.weight
        factory = {"device": device if device is not None else reference.device,
                   "dtype": dtype if dtype is not None else reference.dtype}
        return Mamba3State(
            angle=torch.zeros(batch_size, cfg.n_heads, cfg.n_angles, **factory),
            ssm=torch.zeros(batch_size, cfg.n_heads, cfg.head_dim, cfg.d_state, **factory),
            k=torch.zeros(batch_size, cfg.rank, cfg.n_heads, cfg.d_state, **factory),
            x=torch.zeros(batch_size, cfg.n_heads, cfg.head_dim, **factory),
        )

    def prefill(self, x: torch.Tensor, state: Mamba3State) -> tuple[torch.Tensor, Mamba3State]:
        check_input(x, self.d_model, 3, "mamba3.prefill")
        check_state(state, Mamba3State, x.shape[0], "mamba3.prefill")
        return self._mix(x, state)

    def step(self, x_t: torch.Tensor, state: Mamba3State) -> tuple[torch.Tensor, Mamba3State]:
        check_input(x_t, self.d_model, 2, "mamba3.step")
        check_state(state, Mamba3State, x_t.shape[0], "mamba3.step")
        arguments, z = self._scan_inputs(x_t)
        initial = Mamba3ScanState(*(t.to(x_t.dtype) for t in (state.angle, state.ssm, state.k, state.x)))
        y, final = mamba3_step(**arguments, state=initial)
        return self._finish(y, z), self._new_state(final, state)

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights: the B/C RMSNorms and biases (~8 R G N + 2 R H N),
        their rotations (12 R H S), the state update h = alpha h + beta sum_r v'_r k'_r^T + gamma
        sum_r v_r k_r^T (H P N + 4 R H P N), the readout (2 R H P N), and the MIMO projections of
        x, z, y (6 R H P); independent of the context length."""
        cfg = self.config
        heads, rank, n = cfg.n_heads, cfg.rank, cfg.d_state
        hpn = heads * cfg.head_dim * n
        mimo = 6 * rank * heads * cfg.head_dim if cfg.is_mimo else 0
        return 8 * rank * cfg.n_groups * n + 2 * rank * heads * n + 12 * rank * heads * cfg.n_angles \
            + (1 + 6 * rank) * hpn + mimo

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = torch.empty((), dtype=dtype).element_size()
        per_item = cfg.n_heads * (cfg.n_angles + cfg.head_dim * cfg.d_state + cfg.rank * cfg.d_state + cfg.head_dim)
        return batch_size * per_item * element
