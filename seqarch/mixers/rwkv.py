"""RWKV-6 ("Finch"): time-mix with data-dependent token shift and decay, and its channel-mix.

Peng et al. (2024), "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
section 4. Parameter names follow RWKV-LM's `RWKV_Tmix_x060` / `RWKV_CMix_x060`.
Legend: B batch, L length, D model width, H heads (n_heads), K head size (head_dim, key = value size), R LoRA rank,
F channel-mix hidden width.

Time-mix, for token x_t with the previous token x_{t-1} (zeros before the first):

    xx = x_{t-1} - x_t
    m_* = tanh((x_t + xx * mu_x) A) B_*                 for * in w, k, v, r, g (one low-rank MLP, 5 heads)
    x_* = x_t + xx * (mu_* + m_*)                        data-dependent interpolation ("ddlerp", eq. 9-10)
    r, k, v = W_r x_r, W_k x_k, W_v x_v;   g = SiLU(W_g x_g)
    w_t = -exp(d + tanh(x_w A_d) B_d)                    log-decay <= 0, per channel (eq. 11-12)
    o_t = wkv6(r, k, v, w, u)                            per head, matrix state (K, K) (eq. 13-17)
    y_t = W_o (GroupNorm_H(o_t) * g)

Channel-mix (RWKV's own MLP, returned by `own_mlp()` for the block):

    xx = x_{t-1} - x_t;   k = ReLU(W_k (x_t + xx * mu_k))^2;   y_t = sigmoid(W_r (x_t + xx * mu_r)) * W_v k

The family's state is (time-mix shift, wkv state) in the mixer and (channel-mix shift) in the
block's MLP state: the block owns the channel-mix, so it carries its state.

Initialisation depends on the layer's place in the model, as RWKV-LM's (`layer_id` of `n_layers`, which
SeqLM fills per layer): with ratio_0_to_1 = layer_id / (n_layers - 1) and ratio_1_to_almost0 =
1 - layer_id / n_layers (two denominators, as RWKV-LM), and p_i = i / D over channels,

    mu_x = mu_w = mu_k = 1 - p^ratio_1;   mu_v = mu_k - 0.3 ratio_0;   mu_r = mu_g = 1 - p^(0.5 ratio_1)
    d_i = -6 + 5 (i / (D - 1))^(0.7 + 1.3 ratio_0);   u_i = ratio_0 (1 - i / (D - 1)) + 0.1 ((i + 1) mod 3 - 1)
    ln_x.weight = ((layer_id + 1) / n_layers)^0.7     (RWKV-LM's generate_init_weight)
    channel-mix mu_k = mu_r = 1 - p^(ratio_1^3)

The projections take RWKV-LM's model init (`generate_init_weight`, which redraws every projection of the model
it builds) when a block or SeqLM initialises the model (tagged `_model_init`, see seqarch.models.block):
orthogonal W_r, W_v and channel-mix W_k with gain 1, W_k and W_g with gain 0.1, and zero W_o, channel-mix W_v
and W_r, so each block starts as the identity. A mixer built alone keeps PyTorch's default Linear init, as
RWKV-LM's module does before its model init.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.backends import check_backend
from seqarch.configs import outside_stacklevel
from seqarch.mixers.base import (
    MixerState,
    SequenceMixer,
    check_input,
    check_positive,
    check_stack_position,
    check_state,
    element_size,
)
from seqarch.ops.wkv import BACKENDS, Backend, describe_backend, wkv6, wkv6_step
from seqarch.registry import register

_MIXED = ("w", "k", "v", "r", "g")  # the five interpolations of the time-mix, in RWKV-LM's order


@dataclass(frozen=True)
class RWKV6Config:
    d_model: int = 256
    head_dim: int | None = None  # K per head; None: 64 (as RWKV-6) if d_model >= 128, else d_model // 2
    mix_lora_rank: int = 32  # rank R of the token-shift interpolation MLP (RWKV-LM's TIME_MIX_EXTRA_DIM)
    decay_lora_rank: int = 64  # rank of the decay MLP (RWKV-LM's TIME_DECAY_EXTRA_DIM)
    ffn_ratio: float = 3.5  # channel-mix hidden width F / D, rounded down to a multiple of 32 (as RWKV-6)
    # Stack position (RWKV-LM's layer_id / n_layer), which the initialisation depends on; SeqLM fills both
    # per layer (block index, model depth). The defaults are the first layer of one.
    layer_id: int = 0
    n_layers: int = 1
    # Deprecated, accepted for one release: one position in [0, 1] used for both of RWKV-LM's ratios (and the
    # channel-mix's mu exponent, ln_x weight 1): the initialisation before layer_id / n_layers. None: unused.
    depth_ratio: float | None = None
    # wkv algorithm: "auto" (compiled C++ kernel on CPU where it builds, else "chunked"), "compiled",
    # "chunked" (eager PyTorch), "parallel" (O(L^2 K) memory), "sequential" (token loop, reference)
    backend: Backend = "auto"
    chunk_size: int = 32  # tokens per chunk: state passing of "chunked", state checkpoints of "compiled"
    subchunk_size: int = 8  # tokens whose pairwise decays are formed exactly; divides chunk_size
    norm_eps: float = 64e-5  # GroupNorm eps: RWKV's 1e-5 * head_size_divisor^2 with divisor 8

    _renamed: ClassVar[dict[str, str]] = {"mode": "backend", "head_size": "head_dim"}  # accepted for one release

    def __post_init__(self):
        if self.d_model < 2:
            raise ValueError(f"rwkv6: d_model must be >= 2, got {self.d_model}")
        check_positive("rwkv6", head_dim=self.head_dim)
        if self.head_dim is None:  # frozen: the resolved default is stored once, so the config says what runs
            object.__setattr__(self, "head_dim", 64 if self.d_model >= 128 else max(1, self.d_model // 2))
        if self.d_model % self.head_dim:
            raise ValueError(f"rwkv6: d_model={self.d_model} is not divisible by head_dim={self.head_dim}")
        check_backend("rwkv6", self.backend, BACKENDS)
        if self.chunk_size < 1 or self.subchunk_size < 1 or self.chunk_size % self.subchunk_size:
            raise ValueError(f"rwkv6: chunk_size={self.chunk_size} must be a positive multiple of "
                             f"subchunk_size={self.subchunk_size}")
        if self.mix_lora_rank < 1 or self.decay_lora_rank < 1:
            raise ValueError(f"rwkv6: LoRA ranks must be >= 1, got mix_lora_rank={self.mix_lora_rank}, "
                             f"decay_lora_rank={self.decay_lora_rank}")
        if self.ffn_ratio <= 0:
            raise ValueError(f"rwkv6: ffn_ratio must be > 0, got {self.ffn_ratio}")
        check_stack_position("rwkv6", self.layer_id, self.n_layers)
        if self.depth_ratio is not None:
            if not 0.0 <= self.depth_ratio <= 1.0:
                raise ValueError(f"rwkv6: depth_ratio must be in [0, 1], got {self.depth_ratio}")
            warnings.warn("config key 'depth_ratio' for mixer 'rwkv6' is deprecated and will be removed in the next "
                          "release; use 'layer_id' and 'n_layers' (SeqLM sets them per layer)", DeprecationWarning,
                          stacklevel=outside_stacklevel())

    @property
    def depth_ratios(self) -> tuple[float, float]:
        """RWKV-LM's (ratio_0_to_1, ratio_1_to_almost0) for this layer (the deprecated depth_ratio r: (r, 1 - r))."""
        if self.depth_ratio is not None:
            return self.depth_ratio, 1.0 - self.depth_ratio
        return layer_ratios(self.layer_id, self.n_layers)

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    @property
    def ffn_hidden(self) -> int:
        return max(32, int(self.d_model * self.ffn_ratio) // 32 * 32)


@dataclass
class RWKV6State(MixerState):
    shift: torch.Tensor  # (B, D) the last input token, shifted into the next one
    wkv: torch.Tensor  # (B, H, K, K) the wkv matrix state


@dataclass
class ChannelMixState(MixerState):
    shift: torch.Tensor  # (B, D) the last input token of the channel-mix


def _token_shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, D) -> the previous token of every position, `last` (B, D) (or zeros) before the first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last.to(x.dtype).unsqueeze(1)
    return torch.cat([first, x[:, :-1]], dim=1)


def layer_ratios(layer_id: int, n_layers: int) -> tuple[float, float]:
    """RWKV-LM's (ratio_0_to_1, ratio_1_to_almost0) = (layer_id / (n_layers - 1), 1 - layer_id / n_layers) of
    layer `layer_id` in a model of `n_layers` (ratio_0_to_1 = 0 for a one-layer model, where RWKV-LM divides by 0)."""
    return (layer_id / (n_layers - 1) if n_layers > 1 else 0.0), 1.0 - layer_id / n_layers


def ln_x_scale(layer_id: int, n_layers: int) -> float:
    """The initial weight of a layer's ln_x GroupNorm in RWKV-LM (`generate_init_weight`): ((layer_id + 1) / n)^0.7."""
    return ((layer_id + 1) / n_layers) ** 0.7


def orthogonal_(weight: torch.Tensor, gain: float) -> torch.Tensor:
    """nn.init.orthogonal_ (orthonormal rows, or columns if taller than wide, times `gain`), drawn in float32
    (float64 for a float64 weight) and copied in, so half-precision weights get it too (QR has no kernel for
    them); a meta weight stays as it is."""
    if weight.is_meta:
        return weight
    draw = torch.empty(weight.shape, device=weight.device,
                       dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return weight.copy_(nn.init.orthogonal_(draw, gain=gain))


def rwkv_lm_init(linear: nn.Linear, gain: float) -> None:
    """Tag `linear` with RWKV-LM's model-init rule (`generate_init_weight`): zero for gain 0, else orthogonal with
    `gain`. The model init (seqarch.models.block.Block.init_weights) draws it in place of N(0, 0.02)."""
    linear._model_init = nn.init.zeros_ if gain == 0 else functools.partial(orthogonal_, gain=gain)


def _depth_profile(width: int, exponent: float) -> torch.Tensor:
    """1 - (i / D)^exponent over channels i (float64): RWKV's initial interpolation weights mu."""
    return 1.0 - (torch.arange(width, dtype=torch.float64) / width) ** exponent


@register("rwkv6", RWKV6Config)
class RWKV6Mixer(SequenceMixer):
    """The Finch time-mix; `own_mlp()` gives the matching channel-mix."""

    def __init__(self, config: RWKV6Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        heads = config.n_heads
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}  # the profiles are built in float64
        early, late = config.depth_ratios  # RWKV-LM's ratio_0_to_1, ratio_1_to_almost0

        with torch.no_grad():
            self.time_maa_x = nn.Parameter(_depth_profile(width, late).to(**factory))
            self.time_maa_w = nn.Parameter(_depth_profile(width, late).to(**factory))
            self.time_maa_k = nn.Parameter(_depth_profile(width, late).to(**factory))
            self.time_maa_v = nn.Parameter((_depth_profile(width, late) - 0.3 * early).to(**factory))
            self.time_maa_r = nn.Parameter(_depth_profile(width, 0.5 * late).to(**factory))
            self.time_maa_g = nn.Parameter(_depth_profile(width, 0.5 * late).to(**factory))
            # RWKV-LM starts the first LoRA factors at zero; small random values here give the second
            # factors a gradient from the first step (the contract checks every parameter learns).
            rank = config.mix_lora_rank
            self.time_maa_w1 = nn.Parameter(torch.empty(width, len(_MIXED) * rank, **factory).uniform_(-0.01, 0.01))
            self.time_maa_w2 = nn.Parameter(torch.empty(len(_MIXED), rank, width, **factory).uniform_(-0.01, 0.01))
            channel = torch.arange(width, dtype=torch.float64) / max(width - 1, 1)
            # Decay speeds from -6 (slow, long memory) to -1 (fast), steeper in deeper layers.
            self.time_decay = nn.Parameter((-6.0 + 5.0 * channel ** (0.7 + 1.3 * early)).to(**factory))
            self.time_decay_w1 = nn.Parameter(
                torch.empty(width, config.decay_lora_rank, **factory).uniform_(-0.01, 0.01))
            self.time_decay_w2 = nn.Parameter(
                torch.empty(config.decay_lora_rank, width, **factory).uniform_(-0.01, 0.01))
            zigzag = ((torch.arange(width, dtype=torch.float64) + 1) % 3 - 1) * 0.1
            self.time_faaaa = nn.Parameter(  # the bonus u of the current token, (H, K)
                rearrange(early * (1.0 - channel) + zigzag, "(h k) -> h k", h=heads).to(**factory))
        for param in (self.time_maa_x, self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r,
                      self.time_maa_g, self.time_decay, self.time_faaaa):
            param._no_weight_decay = True

        self.receptance = nn.Linear(width, width, bias=False, **factory)
        self.key = nn.Linear(width, width, bias=False, **factory)
        self.value = nn.Linear(width, width, bias=False, **factory)
        self.gate = nn.Linear(width, width, bias=False, **factory)
        self.output = nn.Linear(width, width, bias=False, **factory)
        self.output._is_residual_projection = True  # writes into the residual stream (zero at the model init)
        for linear, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.gate, 0.1),
                             (self.output, 0.0)):
            rwkv_lm_init(linear, gain)
        self.ln_x = nn.GroupNorm(heads, width, eps=config.norm_eps, **factory)
        if config.depth_ratio is None:  # RWKV-LM's model init: deeper layers' ln_x start larger
            with torch.no_grad():
                self.ln_x.weight.fill_(ln_x_scale(config.layer_id, config.n_layers))

    # --- pieces ---------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, x_prev: torch.Tensor):
        """x, x_prev (B, L, D) -> r, k, w (B, H, L, K), v (B, H, L, K), g (B, L, D)."""
        xx = x_prev - x
        lora = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1)  # (B, L, 5 R)
        lora = rearrange(lora, "b l (f r) -> f b l r", f=len(_MIXED))
        mw, mk, mv, mr, mg = torch.einsum("fblr,frd->fbld", lora, self.time_maa_w2)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)
        log_decay = -torch.exp(self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2)
        heads = self.config.n_heads
        r, k, v, w = (rearrange(t, "b l (h k) -> b h l k", h=heads)
                      for t in (self.receptance(xr), self.key(xk), self.value(xv), log_decay))
        return r, k, v, w, F.silu(self.gate(xg))

    def _wkv(self, r, k, v, w, initial_state):
        cfg = self.config
        return wkv6(r, k, v, w, self.time_faaaa, scale=1.0, initial_state=initial_state,
                    output_final_state=initial_state is not None, chunk_size=cfg.chunk_size,
                    subchunk_size=cfg.subchunk_size, backend=cfg.backend)

    def _output(self, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """out (B, H, L, K), gate (B, L, D) -> (B, L, D)."""
        length = out.shape[2]
        normed = self.ln_x(rearrange(out, "b h l k -> (b l) (h k)"))
        return self.output(rearrange(normed, "(b l) d -> b l d", l=length) * gate)

    # --- the contract -----------------------------------------------------------------------
    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        return "wkv6 " + describe_backend(self.config.backend, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "rwkv6.forward")
        r, k, v, w, gate = self._project(x, _token_shift(x, None))
        out, _ = self._wkv(r, k, v, w, None)
        return self._output(out, gate)

    def init_state(self, batch_size: int, device=None, dtype=None) -> RWKV6State:
        cfg = self.config
        factory = self.state_factory(device, dtype)
        return RWKV6State(
            shift=torch.zeros(batch_size, self.d_model, **factory),
            wkv=torch.zeros(batch_size, cfg.n_heads, cfg.head_dim, cfg.head_dim, **factory),
        )

    def prefill(self, x: torch.Tensor, state: RWKV6State) -> tuple[torch.Tensor, RWKV6State]:
        check_input(x, self.d_model, 3, "rwkv6.prefill")
        check_state(state, RWKV6State, x.shape[0], "rwkv6.prefill")
        r, k, v, w, gate = self._project(x, _token_shift(x, state.shift))
        out, wkv_state = self._wkv(r, k, v, w, state.wkv)
        new_state = RWKV6State(shift=x[:, -1].to(state.shift.dtype), wkv=wkv_state.to(state.wkv.dtype))
        return self._output(out, gate), new_state

    def step(self, x_t: torch.Tensor, state: RWKV6State) -> tuple[torch.Tensor, RWKV6State]:
        check_input(x_t, self.d_model, 2, "rwkv6.step")
        check_state(state, RWKV6State, x_t.shape[0], "rwkv6.step")
        r, k, v, w, gate = self._project(x_t.unsqueeze(1), state.shift.to(x_t.dtype).unsqueeze(1))
        out_t, wkv_state = wkv6_step(r[:, :, 0], k[:, :, 0], v[:, :, 0], w[:, :, 0], self.time_faaaa,
                                     state.wkv.to(torch.promote_types(x_t.dtype, torch.float32)), scale=1.0)
        y = self._output(out_t.to(x_t.dtype).unsqueeze(2), gate)
        return y.squeeze(1), RWKV6State(shift=x_t.to(state.shift.dtype), wkv=wkv_state.to(state.wkv.dtype))

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): the two low-rank MLPs
        held as Parameters (token-shift interpolation D x 5R x D, decay D x R' x D: 2 weights each),
        the decay exp (H K) and the wkv step, per (head, key, value) S = w S + k v and o += r S
        (5 H K V); independent of the context length."""
        cfg = self.config
        lora = sum(weight.numel() for weight in (self.time_maa_w1, self.time_maa_w2, self.time_decay_w1,
                                                   self.time_decay_w2))
        return 2 * lora + cfg.n_heads * cfg.head_dim + 5 * cfg.n_heads * cfg.head_dim * cfg.head_dim

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = element_size(dtype)
        return batch_size * (self.d_model + cfg.n_heads * cfg.head_dim * cfg.head_dim) * element

    def own_mlp(self) -> RWKV6ChannelMix:
        weight = self.output.weight
        return RWKV6ChannelMix(self.config, device=weight.device, dtype=weight.dtype)


class RWKV6ChannelMix(SequenceMixer):
    """RWKV-6 channel-mix: token shift, squared ReLU, receptance gate. A SequenceMixer because its
    token shift carries one token of state."""

    def __init__(self, config: RWKV6Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}  # the profiles are built in float64
        late = config.depth_ratios[1]
        exponent = late if config.depth_ratio is not None else late**3  # RWKV-LM's x060: ratio_1_to_almost0^3
        self.time_maa_k = nn.Parameter(_depth_profile(width, exponent).to(**factory))
        self.time_maa_r = nn.Parameter(_depth_profile(width, exponent).to(**factory))
        for param in (self.time_maa_k, self.time_maa_r):
            param._no_weight_decay = True
        self.key = nn.Linear(width, config.ffn_hidden, bias=False, **factory)
        self.receptance = nn.Linear(width, width, bias=False, **factory)
        self.value = nn.Linear(config.ffn_hidden, width, bias=False, **factory)
        self.value._is_residual_projection = True  # the channel-mix's output, as SwiGLU's down projection
        for linear, gain in ((self.key, 1.0), (self.receptance, 0.0), (self.value, 0.0)):
            rwkv_lm_init(linear, gain)

    def _mix(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        xx = x_prev - x
        hidden = torch.relu(self.key(x + xx * self.time_maa_k)).square()  # (..., F)
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "rwkv6 channel-mix forward")
        return self._mix(x, _token_shift(x, None))

    def init_state(self, batch_size: int, device=None, dtype=None) -> ChannelMixState:
        return ChannelMixState(shift=torch.zeros(batch_size, self.d_model, **self.state_factory(device, dtype)))

    def prefill(self, x: torch.Tensor, state: ChannelMixState) -> tuple[torch.Tensor, ChannelMixState]:
        check_input(x, self.d_model, 3, "rwkv6 channel-mix prefill")
        check_state(state, ChannelMixState, x.shape[0], "rwkv6 channel-mix prefill")
        y = self._mix(x, _token_shift(x, state.shift))
        return y, ChannelMixState(shift=x[:, -1].to(state.shift.dtype))

    def step(self, x_t: torch.Tensor, state: ChannelMixState) -> tuple[torch.Tensor, ChannelMixState]:
        check_input(x_t, self.d_model, 2, "rwkv6 channel-mix step")
        check_state(state, ChannelMixState, x_t.shape[0], "rwkv6 channel-mix step")
        return self._mix(x_t, state.shift.to(x_t.dtype)), ChannelMixState(shift=x_t.to(state.shift.dtype))

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return batch_size * self.d_model * element_size(dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """FLOPs beyond the Linear weights: the token shift and two interpolations (5 D), the
        squared ReLU (2 F) and the receptance gate's sigmoid and product (2 D)."""
        return 7 * self.d_model + 2 * self.config.ffn_hidden


RWKV6 = RWKV6Mixer  # the class's earlier name, kept as an alias for one release
