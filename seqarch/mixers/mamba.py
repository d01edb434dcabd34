"""Mamba-1: a selective state-space mixer (the Mamba block without its norm and residual).

Gu & Dao (2023), "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", Section 3.4
and Figure 3. Legend: B batch, L length, D model width, E inner width (expand * D), N state
size, R dt rank, W conv width.

    x, z = in_proj(u)                           (B, L, E) each
    x    = SiLU(causal_conv1d(x))               depthwise, width W
    dt, Bs, Cs = x_proj(x)                      (B, L, R), (B, L, N), (B, L, N)
    dt   = softplus(dt_proj(dt))                (B, L, E); dt_proj's bias is the scan's delta_bias
    y    = selective_scan(x, dt, -exp(A_log), Bs, Cs, D, z=z)   y = SSM(x) + D x, times SiLU(z)
    out  = out_proj(y)

Initialisation as the paper's reference code: A_log = log(1..N) for every channel (S4D-Real),
D = 1, dt_proj's bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] floored at
dt_init_floor, dt_proj's weight uniform in +-dt_scale / sqrt(R). A_log and D carry no weight decay.

State: (conv (B, E, W - 1) the last inputs of the convolution, ssm (B, E, N) the scan state).
Parameter names match mamba-ssm's `Mamba` module, so its state dicts load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from seqarch.backends import check_backend
from seqarch.mixers.base import MixerState, SequenceMixer, check_input, check_positive, check_state, element_size
from seqarch.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqarch.ops.selective_scan import BACKENDS, CHUNK_SIZE, Backend, describe_backend, selective_scan
from seqarch.registry import register


@dataclass(frozen=True)
class MambaConfig:
    d_model: int = 256
    d_state: int = 16  # N, state size per channel
    d_conv: int = 4  # W, width of the causal depthwise convolution before the scan
    expand: int = 2  # E = expand * d_model, the inner width the scan runs at
    dt_rank: int | str = "auto"  # R, rank of the dt projection; "auto" = ceil(d_model / 16)
    dt_min: float = 1e-3  # dt is initialised log-uniform in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # ... and floored here, so softplus^-1 stays finite
    dt_scale: float = 1.0  # dt_proj weights start uniform in +-dt_scale / sqrt(R)
    conv_bias: bool = True  # bias of the depthwise convolution, as the paper
    bias: bool = False  # biases of in_proj / out_proj, off as the paper
    backend: Backend = "auto"  # the selective scan's path; see seqarch.ops.selective_scan.resolve_backend
    chunk_size: int = CHUNK_SIZE  # K: backward checkpoints every K steps; the chunk of the eager scan

    _renamed: ClassVar[dict[str, str]] = {"scan": "backend"}  # old key -> new key, accepted for one release

    def __post_init__(self):
        check_positive("mamba", d_model=self.d_model, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                       chunk_size=self.chunk_size)
        if isinstance(self.dt_rank, str) and self.dt_rank != "auto":
            raise ValueError(f"mamba: dt_rank={self.dt_rank!r}; valid: a positive int or 'auto'")
        if isinstance(self.dt_rank, int) and self.dt_rank < 1:
            raise ValueError(f"mamba: dt_rank must be >= 1 or 'auto', got {self.dt_rank}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"mamba: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.dt_init_floor <= 0:
            raise ValueError(f"mamba: dt_init_floor must be > 0, got {self.dt_init_floor}")
        check_backend("mamba", self.backend, BACKENDS)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank


@dataclass
class MambaState(MixerState):
    conv: torch.Tensor  # (B, E, W - 1) the last W - 1 inputs of the convolution
    ssm: torch.Tensor  # (B, E, N)


@register("mamba", MambaConfig)
class MambaMixer(SequenceMixer):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        factory = {"device": device, "dtype": dtype}
        inner, state, rank = config.d_inner, config.d_state, config.rank
        self.in_proj = nn.Linear(config.d_model, 2 * inner, bias=config.bias, **factory)
        self.conv1d = nn.Conv1d(inner, inner, config.d_conv, groups=inner, bias=config.conv_bias, **factory)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False, **factory)
        self.dt_proj = nn.Linear(rank, inner, bias=True, **factory)
        self.out_proj = nn.Linear(inner, config.d_model, bias=config.bias, **factory)
        self.out_proj._is_residual_projection = True  # mamba-ssm's model init divides it by sqrt(depth)
        for proj in (self.in_proj, self.x_proj, self.dt_proj, self.out_proj):  # mamba-ssm's model init keeps
            proj._no_reinit = True  # PyTorch's default init on these (and dt_proj's dt init)
        self._init_dt()
        A = repeat(torch.arange(1, state + 1, dtype=torch.float32), "n -> e n", e=inner)
        self.A_log = nn.Parameter(torch.log(A).to(**factory))
        self.D = nn.Parameter(torch.ones(inner, **factory))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def _init_dt(self) -> None:
        cfg = self.config
        bound = cfg.dt_scale * cfg.rank**-0.5
        log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(cfg.d_inner) * (log_max - log_min) + log_min).clamp(min=cfg.dt_init_floor)
        inverse_softplus = dt + torch.log(-torch.expm1(-dt))  # softplus(inverse_softplus) == dt
        with torch.no_grad():
            self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(inverse_softplus)
        self.dt_proj.bias._no_reinit = True

    # --- pieces shared by every path ----------------------------------------------------------
    def _conv_weight(self) -> torch.Tensor:
        return rearrange(self.conv1d.weight, "e 1 w -> e w")

    def _split_x(self, x: torch.Tensor):
        """x (..., E) after the convolution -> dt (..., E) before softplus and bias, Bs, Cs (..., N)."""
        cfg = self.config
        dt, Bs, Cs = torch.split(self.x_proj(x), [cfg.rank, cfg.d_state, cfg.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), Bs, Cs

    def _A(self) -> torch.Tensor:
        # exp of A_log in at least float32: in half precision the decays exp(dt A) lose the state.
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def _convolve(self, x: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """x (B, E, L) -> SiLU(causal conv) (B, E, L), continuing from `history` (B, E, W - 1); the
        op picks its kernel ("auto")."""
        return causal_conv1d(x, self._conv_weight(), self.conv1d.bias, "silu", history)

    def _mix(self, u: torch.Tensor, state: MambaState | None):
        """u (B, L, D) -> (y (B, L, D), new state or None), continuing from `state` if given."""
        cfg = self.config
        x, z = rearrange(self.in_proj(u), "b l (two e) -> two b e l", two=2)
        history = state.conv.to(x.dtype) if state is not None else None
        x_conv = self._convolve(x, history)
        dt, Bs, Cs = self._split_x(rearrange(x_conv, "b e l -> b l e"))
        result = selective_scan(
            x_conv, rearrange(dt, "b l e -> b e l"), self._A(),
            rearrange(Bs, "b l n -> b n l"), rearrange(Cs, "b l n -> b n l"), self.D,
            z=z, delta_bias=self.dt_proj.bias, delta_softplus=True, return_last_state=state is not None,
            initial_state=state.ssm if state is not None else None, backend=cfg.backend, chunk_size=cfg.chunk_size,
        )
        if state is None:
            return self.out_proj(rearrange(result, "b e l -> b l e")), None
        y, ssm = result
        width = cfg.d_conv - 1
        conv = torch.cat([history, x], dim=-1)[..., -width:] if width else history
        new_state = MambaState(conv=conv.to(state.conv.dtype), ssm=ssm.to(state.ssm.dtype))
        return self.out_proj(rearrange(y, "b e l -> b l e")), new_state

    # --- the contract -------------------------------------------------------------------------
    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        return "selective scan " + describe_backend(self.config.backend, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "mamba.forward")
        return self._mix(x, None)[0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        cfg = self.config
        factory = self.state_factory(device, dtype)
        return MambaState(
            conv=torch.zeros(batch_size, cfg.d_inner, cfg.d_conv - 1, **factory),
            ssm=torch.zeros(batch_size, cfg.d_inner, cfg.d_state, **factory),
        )

    def prefill(self, x: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        check_input(x, self.d_model, 3, "mamba.prefill")
        check_state(state, MambaState, x.shape[0], "mamba.prefill")
        return self._mix(x, state)

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token: causal_conv1d_update, then one step of h = exp(dt A) h + dt x B."""
        check_input(x_t, self.d_model, 2, "mamba.step")
        check_state(state, MambaState, x_t.shape[0], "mamba.step")
        x, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, E) each
        x_conv, conv = causal_conv1d_update(x, state.conv.to(x.dtype), self._conv_weight(), self.conv1d.bias,
                                            "silu")
        dt, Bs, Cs = self._split_x(x_conv)
        compute = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(compute) + self.dt_proj.bias.to(compute))  # (B, E)
        x_c = x_conv.to(compute)
        decay = torch.exp(dt[..., None] * self._A().to(compute))  # (B, E, N)
        h = decay * state.ssm.to(compute) + (dt * x_c)[..., None] * Bs.to(compute)[:, None]
        y = (h * Cs.to(compute)[:, None]).sum(-1) + self.D.to(compute) * x_c
        y = y * F.silu(z.to(compute))
        new_state = MambaState(conv=conv.to(state.conv.dtype), ssm=h.to(state.ssm.dtype))
        return self.out_proj(y.to(x_t.dtype)), new_state

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): the depthwise conv
        (2 E W) and the scan step, per (channel, state) dt A, its exp, h = decay h + (dt x) B and
        y += C h (7 E N); independent of the context length."""
        cfg = self.config
        return 2 * cfg.d_inner * cfg.d_conv + 7 * cfg.d_inner * cfg.d_state

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = element_size(dtype)
        return batch_size * cfg.d_inner * (cfg.d_conv - 1 + cfg.d_state) * element


Mamba = MambaMixer  # the class's earlier name, kept as an alias for one release
