"""Mamba-2: multi-head selective state-space mixer with scalar decay per head, computed by SSD.

Dao and Gu (2024), "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", Section 7 (the Mamba-2 block), following mamba-ssm's `Mamba2`
module in parameter names and initialisation, so its checkpoints map one to one.

Legend: B batch, L length, D model width, E inner width (= expand * D), H heads (n_heads), P head dim
(head_dim, E = H * P), G groups of B/C (H % G == 0), N state size, W conv width, F conv channels (= E + 2 G N).

    z, xBC, dt = in_proj(u)                          (B, L, E), (B, L, F), (B, L, H)
    x, B, C    = split(silu(causal_conv1d(xBC)))     (B, L, E), (B, L, G N), (B, L, G N)
    y          = SSD(x, clamp(softplus(dt + dt_bias), *time_step_limit), A = -exp(A_log), B, C, D)  seqarch/ops/ssd.py
    out        = out_proj(RMSNorm_groups(y * silu(z)))

The gated RMSNorm normalises each of the G groups of E / G channels separately, as mamba-ssm does
(its `group_size = d_ssm // ngroups`), so a checkpoint trained with G groups behaves the same here.
The recurrent state is the last W - 1 conv inputs and the SSM state per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.backends import check_backend
from seqarch.mixers.base import MixerState, SequenceMixer, check_input, check_positive, check_state, element_size
from seqarch.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqarch.ops.gated_norm import gated_rms_norm
from seqarch.ops.ssd import BACKENDS, DEFAULT_CHUNK_SIZE, Backend, describe_backend, ssd, ssd_step
from seqarch.registry import register


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int = 256
    d_state: int = 64  # N, state size per head channel (mamba-ssm uses 128 for large models)
    d_conv: int = 4  # W, width of the short causal conv over x, B, C
    expand: int = 2  # inner width E = expand * d_model
    head_dim: int = 32  # P; 32 gives >= 2 heads already at d_model 64 (mamba-ssm's default is 64)
    ngroups: int = 1  # G groups of B/C, each shared by H / G heads (as key/value heads in GQA)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # Q of the chunked SSD; measured on CPU, see ops/ssd.py
    A_init_range: tuple[float, ...] = (1.0, 16.0)  # -A per head is drawn uniformly from this range
    dt_min: float = 1e-3  # softplus(dt_bias) is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4  # lower clamp of the initial dt
    norm_eps: float = 1e-5  # epsilon of the gated RMSNorm
    bias: bool = False  # biases in in_proj and out_proj (off in Mamba-2)
    conv_bias: bool = True  # bias of the depthwise conv
    backend: Backend = "auto"  # the SSD path: "auto", "compiled", "chunked", "sequential"; see ops.ssd.resolve_backend
    # (min, max) clamp of dt after the softplus, as mamba-ssm's / HF's dt_limit; (0, inf) is off
    time_step_limit: tuple[float, ...] = (0.0, float("inf"))

    _renamed: ClassVar[dict[str, str]] = {"scan": "backend", "headdim": "head_dim"}  # accepted for one release

    def __post_init__(self):
        check_backend("mamba2", self.backend, BACKENDS)
        check_positive("mamba2", d_model=self.d_model, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                       head_dim=self.head_dim, ngroups=self.ngroups, chunk_size=self.chunk_size)
        if self.d_inner % self.head_dim:
            raise ValueError(f"mamba2: inner width expand * d_model = {self.d_inner} is not divisible by "
                             f"head_dim={self.head_dim}")
        if self.n_heads % self.ngroups:
            raise ValueError(f"mamba2: the {self.n_heads} heads are not divisible into ngroups={self.ngroups}")
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"mamba2: A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"mamba2: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if len(self.time_step_limit) != 2 or not 0 <= self.time_step_limit[0] <= self.time_step_limit[1]:
            raise ValueError(f"mamba2: time_step_limit must be (min, max) with 0 <= min <= max, "
                             f"got {self.time_step_limit}")

    @property
    def limits_dt(self) -> bool:
        """Whether time_step_limit clamps anything (the default (0, inf) does not: softplus > 0)."""
        return tuple(self.time_step_limit) != (0.0, float("inf"))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state


@dataclass
class Mamba2State(MixerState):
    conv: torch.Tensor  # (B, F, W - 1): the last W - 1 inputs of the conv
    ssm: torch.Tensor  # (B, H, P, N)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) over groups of `group_size` channels, times a learned weight (E,):
    `seqarch.ops.gated_norm.gated_rms_norm` (a fused C++ kernel on CPU, PyTorch elsewhere)."""

    def __init__(self, width: int, group_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size)


@register("mamba2", Mamba2Config)
class Mamba2Mixer(SequenceMixer):
    def __init__(self, config: Mamba2Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        factory = {"device": device, "dtype": dtype}
        heads = config.n_heads
        projected = 2 * config.d_inner + 2 * config.ngroups * config.d_state + heads  # [z, xBC, dt]
        self.in_proj = nn.Linear(config.d_model, projected, bias=config.bias, **factory)
        self.conv1d = nn.Conv1d(config.conv_dim, config.conv_dim, config.d_conv, groups=config.conv_dim,
                                bias=config.conv_bias, **factory)
        dt = torch.exp(torch.rand(heads) * (math.log(config.dt_max) - math.log(config.dt_min))
                       + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
        # Inverse softplus, so softplus(dt_bias) starts at dt: log(exp(dt) - 1) = dt + log(1 - exp(-dt)).
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(**factory))
        A = torch.empty(heads).uniform_(*config.A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(**factory))
        self.D = nn.Parameter(torch.ones(heads, **factory))
        self.norm = GatedRMSNorm(config.d_inner, config.d_inner // config.ngroups, config.norm_eps, **factory)
        self.out_proj = nn.Linear(config.d_inner, config.d_model, bias=config.bias, **factory)
        self.out_proj._is_residual_projection = True  # mamba-ssm's model init divides it by sqrt(depth)
        self.in_proj._no_reinit = self.out_proj._no_reinit = True  # mamba-ssm keeps PyTorch's default init
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True

    # --- pieces shared by the paths ---------------------------------------------------------
    def _split_projection(self, u: torch.Tensor):
        cfg = self.config
        return torch.split(self.in_proj(u), [cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)

    def _split_conv_output(self, xBC: torch.Tensor):
        cfg = self.config
        return torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)

    def _conv_weight(self) -> torch.Tensor:
        return rearrange(self.conv1d.weight, "f 1 w -> f w")

    def _dt_arguments(self, dt: torch.Tensor) -> dict:
        """The SSD's dt arguments: raw dt with dt_bias and the softplus left to the op, or, when
        time_step_limit clamps, dt = clamp(softplus(dt + dt_bias), min, max) computed here."""
        if not self.config.limits_dt:
            return {"dt": dt, "dt_bias": self.dt_bias, "dt_softplus": True}
        low, high = self.config.time_step_limit
        return {"dt": F.softplus(dt + self.dt_bias).clamp(low, high), "dt_bias": None, "dt_softplus": False}

    def _mix(self, u: torch.Tensor, state: Mamba2State | None):
        """u (B, L, D), continuing from `state` (None: from zeros, and no state is returned)."""
        cfg = self.config
        z, xBC, dt = self._split_projection(u)
        xBC = rearrange(xBC, "b l f -> b f l")
        history = None if state is None else state.conv.to(u.dtype)
        conv_out = causal_conv1d(xBC, self._conv_weight(), self.conv1d.bias, "silu", history)
        x, B, C = self._split_conv_output(rearrange(conv_out, "b f l -> b l f"))
        result = ssd(
            rearrange(x, "b l (h p) -> b l h p", p=cfg.head_dim),
            A=-torch.exp(self.A_log),
            B=rearrange(B, "b l (g n) -> b l g n", g=cfg.ngroups),
            C=rearrange(C, "b l (g n) -> b l g n", g=cfg.ngroups),
            chunk_size=cfg.chunk_size,
            D=self.D,
            initial_states=None if state is None else state.ssm.to(u.dtype),
            return_final_states=state is not None,
            backend=cfg.backend,
            **self._dt_arguments(dt),
        )
        y, final = result if state is not None else (result, None)
        out = self.out_proj(self.norm(rearrange(y, "b l h p -> b l (h p)"), z))
        if state is None:
            return out, None
        width = cfg.d_conv - 1
        conv_history = torch.cat([history, xBC], dim=-1)
        conv_state = conv_history[..., conv_history.shape[-1] - width :]
        return out, Mamba2State(conv=conv_state.to(state.conv.dtype), ssm=final.to(state.ssm.dtype))

    # --- the contract -----------------------------------------------------------------------
    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        return "SSD " + describe_backend(self.config.backend, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "mamba2.forward")
        return self._mix(x, None)[0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> Mamba2State:
        cfg = self.config
        factory = self.state_factory(device, dtype)
        return Mamba2State(
            conv=torch.zeros(batch_size, cfg.conv_dim, cfg.d_conv - 1, **factory),
            ssm=torch.zeros(batch_size, cfg.n_heads, cfg.head_dim, cfg.d_state, **factory),
        )

    def prefill(self, x: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        check_input(x, self.d_model, 3, "mamba2.prefill")
        check_state(state, Mamba2State, x.shape[0], "mamba2.prefill")
        return self._mix(x, state)

    def step(self, x_t: torch.Tensor, state: Mamba2State) -> tuple[torch.Tensor, Mamba2State]:
        check_input(x_t, self.d_model, 2, "mamba2.step")
        check_state(state, Mamba2State, x_t.shape[0], "mamba2.step")
        cfg = self.config
        z, xBC, dt = self._split_projection(x_t)
        xBC, conv_state = causal_conv1d_update(xBC, state.conv.to(x_t.dtype), self._conv_weight(),
                                               self.conv1d.bias, "silu")
        x, B, C = self._split_conv_output(xBC)
        dt_arguments = self._dt_arguments(dt)
        y, ssm_state = ssd_step(
            rearrange(x, "b (h p) -> b h p", p=cfg.head_dim), dt_arguments.pop("dt"), -torch.exp(self.A_log),
            rearrange(B, "b (g n) -> b g n", g=cfg.ngroups), rearrange(C, "b (g n) -> b g n", g=cfg.ngroups),
            state.ssm.to(x_t.dtype), D=self.D, **dt_arguments,
        )
        out = self.out_proj(self.norm(rearrange(y, "b h p -> b (h p)"), z))
        return out, Mamba2State(conv=conv_state.to(state.conv.dtype), ssm=ssm_state.to(state.ssm.dtype))

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): the depthwise conv over
        x, B, C (2 conv_dim W) and the SSD step, per (head, head dim, state) h = decay h + (dt x) B
        and y += C h (5 H P N); independent of the context length."""
        cfg = self.config
        return 2 * cfg.conv_dim * cfg.d_conv + 5 * cfg.n_heads * cfg.head_dim * cfg.d_state

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = element_size(dtype)
        return batch_size * (cfg.conv_dim * (cfg.d_conv - 1) + cfg.n_heads * cfg.head_dim * cfg.d_state) * element


Mamba2 = Mamba2Mixer  # the class's earlier name, kept as an alias for one release
