"""DeltaNet and Gated DeltaNet: linear attention whose state is edited by the delta rule.

DeltaNet: Schlag, Irie and Schmidhuber (2021), "Linear Transformers Are Secretly Fast Weight
Programmers", as parallelised by Yang et al. (2024), "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length". Gated DeltaNet: Yang, Kautz and Hatamizadeh (ICLR 2025), "Gated Delta
Networks: Improving Mamba2 with Delta Rule". Both follow flash-linear-attention's `layers/delta_net.py`
(`DeltaNet`) and `layers/gated_deltanet.py` (`GatedDeltaNet`) in parameter names, shapes, defaults
and initialisation, so their weights load after renaming the config fields (docs/mixers/deltanet.md).

Legend: B batch, L length, D model width, H heads, K key head dim (`head_dim`), V value head dim,
F conv channels (= 2 H K + H V), W conv width.

    q, k, v = silu(causal_conv1d(q_proj(x))), ...     (B, L, H, K), (B, L, H, K), (B, L, H, V)
    q, k    = q / |q|, k / |k|                         L2 norm per head
    beta    = sigmoid(b_proj(x))                       (B, L, H); times 2 with allow_neg_eigval
    g       = -exp(A_log) softplus(a_proj(x) + dt_bias)     Gated DeltaNet only: the log of alpha
    o       = delta rule (seqarch/ops/delta_rule.py)   S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    out     = o_proj(RMSNorm(o) * silu(g_proj(x)))     per head; without use_gate RMSNorm(o) alone

The recurrent state is the last W - 1 inputs of the three convs and the (K, V) matrix of each head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.mixers.base import MixerState, SequenceMixer, check_input, check_positive, check_state
from seqarch.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqarch.ops.delta_rule import (
    DEFAULT_CHUNK_SIZE,
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
)
from seqarch.ops.delta_rule import describe_backend as describe_delta_rule_backend
from seqarch.registry import register

Backend = Literal["auto", "compiled", "chunked", "sequential"]
# flash-linear-attention's l2norm adds this inside the square root.
L2_NORM_EPS = 1e-6


def _check_positive(owner: str, config, names: tuple[str, ...]) -> None:
    check_positive(owner, **{name: getattr(config, name) for name in names})


@dataclass(frozen=True)
class DeltaNetConfig:
    d_model: int = 256
    n_heads: int = 4  # H (fla's layer default; its 1.3B model uses 16)
    expand_k: float = 1.0  # key width H K = expand_k * d_model, so head_dim = expand_k * d_model / H
    expand_v: float = 1.0  # value width H V = expand_v * d_model
    use_beta: bool = True  # beta = sigmoid(b_proj(x)); False: beta = 1
    use_gate: bool = False  # output gate silu(g_proj(x)) after the RMSNorm (off in fla's DeltaNet)
    d_conv: int = 4  # W, width of the short causal convs on q, k, v (fla: conv_size)
    conv_bias: bool = False  # biases in the short convs
    allow_neg_eigval: bool = False  # beta in (0, 2): I - beta k k^T may have eigenvalue < 0 (Grazzi et al. 2025)
    norm_eps: float = 1e-5  # epsilon of the output RMSNorm
    initializer_range: float = 0.02  # std of the Linear and conv weights (fla's _init_weights)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # C of the chunked delta rule (checkpoint interval of the compiled one)
    backend: Backend = "auto"  # "auto" | "compiled" | "chunked" | "sequential"; see ops.delta_rule.resolve_backend

    def __post_init__(self):
        _check_positive("deltanet", self, ("d_model", "n_heads", "expand_k", "expand_v", "d_conv", "norm_eps",
                                           "initializer_range", "chunk_size"))
        for name, width in (("key", self.d_model * self.expand_k), ("value", self.d_model * self.expand_v)):
            if width != int(width) or int(width) % self.n_heads:
                raise ValueError(f"deltanet: the {name} width {width} (expand_{name[0]} * d_model) must be an "
                                 f"integer divisible by n_heads={self.n_heads}")

    @property
    def key_dim(self) -> int:
        return int(self.d_model * self.expand_k)

    @property
    def value_dim(self) -> int:
        return int(self.d_model * self.expand_v)

    @property
    def head_dim(self) -> int:
        return self.key_dim // self.n_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.n_heads

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    d_model: int = 256
    n_heads: int | None = None  # H; None: max(1, round(0.75 d_model / head_dim)): H K ≈ 0.75 d_model, as fla asks
    head_dim: int = 32  # K; 32 keeps parameter counts fine-grained at small widths (as mamba2 here); fla: 256 at d 2048
    expand_v: float = 2.0  # V = expand_v * K
    use_gate: bool = True  # output gate silu(g_proj(x)) after the RMSNorm
    d_conv: int = 4  # W, width of the short causal convs on q, k, v (fla: conv_size)
    conv_bias: bool = False  # biases in the short convs
    allow_neg_eigval: bool = False  # beta in (0, 2): I - beta k k^T may have eigenvalue < 0 (Grazzi et al. 2025)
    A_init_range: tuple[float, ...] = (0.0, 16.0)  # A = exp(A_log) is drawn uniformly from this range
    dt_min: float = 1e-3  # softplus(dt_bias) is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4  # lower clamp of the initial dt
    norm_eps: float = 1e-5  # epsilon of the output RMSNorm
    initializer_range: float = 0.02  # std of the Linear and conv weights (fla's _init_weights)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # C of the chunked gated delta rule
    backend: Backend = "auto"  # "auto" | "compiled" | "chunked" | "sequential"; see ops.delta_rule.resolve_backend

    def __post_init__(self):
        if self.n_heads is None and isinstance(self.head_dim, int) and self.head_dim > 0:
            # Resolved once at construction (the config is frozen after): 6 heads of 32 at d_model 256.
            object.__setattr__(self, "n_heads", max(1, round(0.75 * self.d_model / self.head_dim)))
        _check_positive("gated_deltanet", self, ("d_model", "n_heads", "head_dim", "expand_v", "d_conv",
                                                 "norm_eps", "initializer_range", "chunk_size"))
        if self.head_dim * self.expand_v != int(self.head_dim * self.expand_v):
            raise ValueError(f"gated_deltanet: head_dim * expand_v = {self.head_dim * self.expand_v} must be an "
                             "integer")
        if len(self.A_init_range) != 2 or not 0 <= self.A_init_range[0] < self.A_init_range[1]:
            raise ValueError(f"gated_deltanet: A_init_range must be (low, high) with 0 <= low < high, "
                             f"got {self.A_init_range}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"gated_deltanet: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def key_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def value_dim(self) -> int:
        return self.n_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass
class DeltaNetState(MixerState):
    conv: torch.Tensor  # (B, F, W - 1): the last W - 1 inputs of the q, k, v convs, channels [q | k | v]
    recurrent: torch.Tensor  # (B, H, K, V)


@dataclass
class GatedDeltaNetState(MixerState):
    conv: torch.Tensor  # (B, F, W - 1): the last W - 1 inputs of the q, k, v convs, channels [q | k | v]
    recurrent: torch.Tensor  # (B, H, K, V)


class OutputNorm(nn.Module):
    """RMSNorm over each head's V channels times a learned weight (V,), then times silu(gate) when a
    gate is given (fla's FusedRMSNormGated: normalise first, gate after)."""

    def __init__(self, width: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        o = F.rms_norm(o, (o.shape[-1],), self.weight, eps=self.eps)
        return o if gate is None else o * F.silu(gate)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim (fla's l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)


class _DeltaRuleMixer(SequenceMixer):
    """What DeltaNet and Gated DeltaNet share: q/k/v projections with short convs, beta, the output
    norm and projection, the state and the contract. Subclasses add the gate."""

    name: str
    state_type: type
    gated: bool

    def _build_common(self, config, beta: bool, factory: dict) -> None:
        self.config = config
        self.d_model = config.d_model
        self.q_proj = nn.Linear(config.d_model, config.key_dim, bias=False, **factory)
        self.k_proj = nn.Linear(config.d_model, config.key_dim, bias=False, **factory)
        self.v_proj = nn.Linear(config.d_model, config.value_dim, bias=False, **factory)
        if beta:
            self.b_proj = nn.Linear(config.d_model, config.n_heads, bias=False, **factory)
        for name, width in (("q_conv1d", config.key_dim), ("k_conv1d", config.key_dim),
                            ("v_conv1d", config.value_dim)):
            setattr(self, name, nn.Conv1d(width, width, config.d_conv, groups=width, bias=config.conv_bias, **factory))
        if config.use_gate:
            self.g_proj = nn.Linear(config.d_model, config.value_dim, bias=False, **factory)
        self.o_norm = OutputNorm(config.head_v_dim, config.norm_eps, **factory)
        self.o_proj = nn.Linear(config.value_dim, config.d_model, bias=False, **factory)
        self.o_proj._is_residual_projection = True  # scaled by 1/sqrt(residual branches) in the model init (GPT-2)

    def _init_linear_and_conv(self) -> None:
        """As fla's `_init_weights`: every Linear and conv weight N(0, initializer_range), biases 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # --- pieces shared by the paths ---------------------------------------------------------
    def _projection_weights(self) -> list[torch.Tensor]:
        """Weights of every input projection, concatenated along the output so that one matmul
        computes them all: [q | k | v | b | g | a] (absent ones skipped)."""
        names = ("q_proj", "k_proj", "v_proj", "b_proj", "g_proj", "a_proj")
        return [getattr(self, name).weight for name in names if hasattr(self, name)]

    def _project(self, x: torch.Tensor):
        """x (..., D) -> qkv (..., F) before the convs, and the dict of the other projections."""
        weights = self._projection_weights()
        out = F.linear(x, torch.cat(weights) if len(weights) > 1 else weights[0])
        cfg = self.config
        sizes = [cfg.conv_dim] + [w.shape[0] for w in weights[3:]]
        parts = torch.split(out, sizes, dim=-1)
        names = [name for name in ("b_proj", "g_proj", "a_proj") if hasattr(self, name)]
        return parts[0], dict(zip(names, parts[1:], strict=True))

    def _conv_weight(self) -> torch.Tensor:
        return torch.cat([rearrange(conv.weight, "f 1 w -> f w") for conv in (self.q_conv1d, self.k_conv1d,
                                                                                self.v_conv1d)])

    def _conv_bias(self) -> torch.Tensor | None:
        if not self.config.conv_bias:
            return None
        return torch.cat([self.q_conv1d.bias, self.k_conv1d.bias, self.v_conv1d.bias])

    def _heads(self, qkv: torch.Tensor, others: dict):
        """Split the conv output into L2-normalised q, k and v per head, beta and the log-gate."""
        cfg = self.config
        q, k, v = torch.split(qkv, [cfg.key_dim, cfg.key_dim, cfg.value_dim], dim=-1)
        q = l2_normalize(rearrange(q, "... (h d) -> ... h d", d=cfg.head_dim))
        k = l2_normalize(rearrange(k, "... (h d) -> ... h d", d=cfg.head_dim))
        v = rearrange(v, "... (h d) -> ... h d", d=cfg.head_v_dim)
        if "b_proj" in others:
            beta = torch.sigmoid(others["b_proj"])
        else:
            beta = torch.ones(q.shape[:-1], dtype=q.dtype, device=q.device)
        if cfg.allow_neg_eigval:
            beta = beta * 2
        g = self._log_gate(others["a_proj"]) if self.gated else None
        return q, k, v, beta, g

    def _log_gate(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _output(self, o: torch.Tensor, others: dict) -> torch.Tensor:
        cfg = self.config
        gate = None
        if cfg.use_gate:
            gate = rearrange(others["g_proj"], "... (h d) -> ... h d", d=cfg.head_v_dim)
        o = self.o_norm(o.to(self.o_proj.weight.dtype), gate)
        return self.o_proj(rearrange(o, "... h d -> ... (h d)"))

    def _check_state(self, state, batch: int, what: str) -> None:
        if type(state) is not self.state_type:  # exactly: the two mixers' states have the same fields
            raise ValueError(f"{what} expects a {self.state_type.__name__} (from init_state), "
                             f"got {type(state).__name__}")
        check_state(state, self.state_type, batch, what)  # the contract's batch and dtype checks
        cfg = self.config
        expected = (batch, cfg.n_heads, cfg.head_dim, cfg.head_v_dim)
        if tuple(state.recurrent.shape) != expected or tuple(state.conv.shape) != (batch, cfg.conv_dim,
                                                                                    cfg.d_conv - 1):
            raise ValueError(f"{what}: the state's shapes {tuple(state.conv.shape)}, {tuple(state.recurrent.shape)} "
                             f"do not match this mixer's {(batch, cfg.conv_dim, cfg.d_conv - 1)}, {expected}")

    def _mix(self, x: torch.Tensor, state: MixerState | None):
        """x (B, L, D), continuing from `state` (None: from zeros, and no state is returned)."""
        cfg = self.config
        qkv, others = self._project(x)
        conv_in = rearrange(qkv, "b l f -> b f l")
        history = None if state is None else state.conv.to(x.dtype)
        qkv = rearrange(causal_conv1d(conv_in, self._conv_weight(), self._conv_bias(), "silu", history),
                        "b f l -> b l f")
        q, k, v, beta, g = self._heads(qkv, others)
        initial = None if state is None else state.recurrent
        options = {"initial_state": initial, "output_final_state": state is not None, "backend": cfg.backend,
                   "chunk_size": cfg.chunk_size}
        if self.gated:
            o, final = gated_delta_rule(q, k, v, g, beta, **options)
        else:
            o, final = delta_rule(q, k, v, beta, **options)
        out = self._output(o, others)
        if state is None:
            return out, None
        width = cfg.d_conv - 1
        conv_history = torch.cat([history, conv_in], dim=-1)
        conv_state = conv_history[..., conv_history.shape[-1] - width :]
        return out, self.state_type(conv=conv_state.to(state.conv.dtype), recurrent=final.to(state.recurrent.dtype))

    # --- the contract -----------------------------------------------------------------------
    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        backend = self.config.backend
        what = {"compiled": "compiled C++ CPU kernel", "chunked": "chunked WY/UT delta rule (PyTorch matrix products)",
                "sequential": "sequential reference"}.get(backend)
        described = describe_delta_rule_backend(backend, device) if what is None else f"backend={backend}: {what}"
        return f"delta rule {described}; recurrent step"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, f"{self.name}.forward")
        return self._mix(x, None)[0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> MixerState:
        cfg = self.config
        reference = self.o_proj.weight
        factory = {"device": device if device is not None else reference.device,
                   "dtype": dtype if dtype is not None else reference.dtype}
        return self.state_type(
            conv=torch.zeros(batch_size, cfg.conv_dim, cfg.d_conv - 1, **factory),
            recurrent=torch.zeros(batch_size, cfg.n_heads, cfg.head_dim, cfg.head_v_dim, **factory),
        )

    def prefill(self, x: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        check_input(x, self.d_model, 3, f"{self.name}.prefill")
        self._check_state(state, x.shape[0], f"{self.name}.prefill")
        return self._mix(x, state)

    def step(self, x_t: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        check_input(x_t, self.d_model, 2, f"{self.name}.step")
        self._check_state(state, x_t.shape[0], f"{self.name}.step")
        qkv, others = self._project(x_t)
        qkv, conv_state = causal_conv1d_update(qkv, state.conv.to(x_t.dtype), self._conv_weight(),
                                               self._conv_bias(), "silu")
        q, k, v, beta, g = self._heads(qkv, others)
        recurrent = state.recurrent.to(q.dtype)
        if self.gated:
            o, recurrent = gated_delta_rule_step(q, k, v, g, beta, recurrent)
        else:
            o, recurrent = delta_rule_step(q, k, v, beta, recurrent)
        out = self._output(o.to(v.dtype), others)
        return out, self.state_type(conv=conv_state.to(state.conv.dtype), recurrent=recurrent.to(state.recurrent.dtype))

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): the depthwise convs
        (2 F W), the L2 norms of q and k (3 per channel, 2 H K), the delta-rule step per head
        (recall k^T S: 2 K V, the rank-one update: 3 K V, the read-out S^T q: 2 K V, and the gate's
        scaling of S: K V when gated) and the output RMSNorm and gate (4 per channel, H V);
        independent of the context length."""
        cfg = self.config
        state = cfg.n_heads * cfg.head_dim * cfg.head_v_dim
        return (2 * cfg.conv_dim * cfg.d_conv + 6 * cfg.key_dim + (8 if self.gated else 7) * state
                + 4 * cfg.value_dim)

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = torch.empty((), dtype=dtype).element_size()
        return batch_size * (cfg.conv_dim * (cfg.d_conv - 1) + cfg.n_heads * cfg.head_dim * cfg.head_v_dim) * element


@register("deltanet", DeltaNetConfig)
class DeltaNetMixer(_DeltaRuleMixer):
    """DeltaNet (fla's `DeltaNet` layer with qk_activation="silu", qk_norm="l2")."""

    name = "deltanet"
    state_type = DeltaNetState
    gated = False

    def __init__(self, config: DeltaNetConfig, device=None, dtype=None):
        super().__init__()
        self._build_common(config, config.use_beta, {"device": device, "dtype": dtype})
        self._init_linear_and_conv()


@register("gated_deltanet", GatedDeltaNetConfig)
class GatedDeltaNetMixer(_DeltaRuleMixer):
    """Gated DeltaNet (fla's `GatedDeltaNet` layer): DeltaNet with Mamba-2's data-dependent decay
    alpha_t = exp(g_t), g_t = -exp(A_log) softplus(a_proj(x_t) + dt_bias)."""

    name = "gated_deltanet"
    state_type = GatedDeltaNetState
    gated = True

    def __init__(self, config: GatedDeltaNetConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._build_common(config, True, factory)
        self.a_proj = nn.Linear(config.d_model, config.n_heads, bias=False, **factory)
        A = torch.empty(config.n_heads).uniform_(*config.A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(**factory))
        dt = torch.exp(torch.rand(config.n_heads) * (math.log(config.dt_max) - math.log(config.dt_min))
                       + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
        # Inverse softplus, so softplus(dt_bias) starts at dt: log(exp(dt) - 1) = dt + log(1 - exp(-dt)).
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(**factory))
        for param in (self.A_log, self.dt_bias):
            param._no_weight_decay = True
        self._init_linear_and_conv()

    def _log_gate(self, a: torch.Tensor) -> torch.Tensor:
        # In float32 at least, as fla computes the gate: g is summed over a chunk before exp.
        dtype = torch.promote_types(a.dtype, torch.float32)
        return -torch.exp(self.A_log.to(dtype)) * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))
