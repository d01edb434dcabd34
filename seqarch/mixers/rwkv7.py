"""RWKV-7 ("Goose"): time-mix with the generalized delta rule, and its channel-mix.

Peng et al. (2025), "RWKV-7 'Goose' with Expressive Dynamic State Evolution", section 4. Parameter
names, shapes and initialisation follow BlinkDL's RWKV-LM `RWKV_Tmix_x070` / `RWKV_CMix_x070`
(RWKV-v7/train_temp/src/model.py; the per-token form in RWKV-v7/rwkv_v7_demo_rnn.py).
Legend: B batch, L length, D model width (RWKV's C), H heads, K head size (RWKV's N), F channel-mix width.

Time-mix, for token x_t with the previous token x_{t-1} (zeros before the first):

    xx = x_{t-1} - x_t;   x_* = x_t + xx * x_*                  for * in r, w, k, v, a, g (six lerps)
    r, k, v = W_r x_r, W_k x_k, W_v x_v
    gk = -exp(-0.5) sigmoid(w0 + tanh(x_w w1) w2)               log-decay in (-0.607, 0), per channel
    a = sigmoid(a0 + (x_a a1) a2)                               in-context learning rate, per channel
    g = sigmoid(x_g g1) g2                                      output gate (a LoRA, no full projection)
    v <- v + (v_first - v) sigmoid(v0 + (x_v v1) v2)            value residual (value_residual=True only)
    kappa = L2-normalise_per_head(k * k_k);   k <- k * (1 + (a - 1) * k_a)
    o = generalized_delta_rule(q=r, k, v, a=-kappa, b=kappa * a, gk, scale=1)    per head, state (K, K)
    y = W_o ((GroupNorm_H(o) + ((r * k * r_k).sum per head) v) * g)

Channel-mix (RWKV's own MLP, returned by `own_mlp()` for the block):

    y = W_v ReLU(W_k (x_t + (x_{t-1} - x_t) * x_k))^2

The value residual. In RWKV-LM every layer after the first mixes its value with the first layer's
(`v_first`), which the model threads through the stack. A mixer with `value_residual=False` is what
RWKV-LM's first layer is: no v0/v1/v2, v is its own value. With `value_residual=True` it holds
v0/v1/v2 (so a later layer's weights load) and mixes its value towards `v_first`. Two ways to pass it:

- `context=` (what SeqLM does): a dict shared by all layers of one forward / prefill / step call. The
  first rwkv7 layer to see it stores its own value under `V_FIRST` ((B, L, D), in step mode (B, 1, D):
  v_first is per token, so no state carries it); every later layer with `value_residual=True` mixes
  towards it. SeqLM builds the first rwkv7 layer with `value_residual=False` and the later ones with
  `value_residual=True` unless the config says otherwise.
- the keyword `v_first` ((B, L, D) or (B, D)), for a model that threads it itself; without either the
  residual is the identity (v + (v - v) * s = v).

Initialisation depends on the layer's place in the model (`layer_id` of `n_layers`, which SeqLM fills per
layer), as RWKV-LM's: the lerps x_*, the decay base w0 and the channel-mix's x_k through its two ratios
(seqarch.mixers.rwkv.layer_ratios), and ln_x's weight ((layer_id + 1) / n_layers)^0.7 (its generate_init_weight).
The projections: built alone, the mixer has `RWKV_Tmix_x070.__init__`'s scaled uniform W_r, W_k, W_v and a small
W_o (RWKV-LM's is zero; this one gives the mixer an output and every parameter a gradient). When a block or SeqLM
initialises the model it draws RWKV-LM's train_temp model init instead (`generate_init_weight`, which redraws
every projection of the model it trains; tagged `_model_init`, see seqarch.models.block): orthogonal W_r, W_v
and channel-mix W_k with gain 1, W_k with gain 0.1, and zero W_o and channel-mix W_v, so each block starts as
the identity.

State: (token-shift input, wkv state) here; the channel-mix's token shift lives in the block's MLP
state. The wkv state is (B, H, K, V) in flash-linear-attention's layout, the transpose of RWKV-LM's
(V, K) per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.mixers.base import (
    MixerState,
    SequenceMixer,
    check_input,
    check_positive,
    check_stack_position,
    check_state,
    element_size,
)
from seqarch.mixers.rwkv import layer_ratios, ln_x_scale, rwkv_lm_init
from seqarch.ops.generalized_delta_rule import (
    Backend,
    describe_backend,
    generalized_delta_rule,
    generalized_delta_rule_step,
)
from seqarch.registry import register

_DECAY_SCALE = math.exp(-0.5)  # the decay exp(-exp(-softplus(-z) - 0.5)) = exp(-exp(-0.5) sigmoid(z))
_MIXED = ("r", "w", "k", "v", "a", "g")  # the six token-shift interpolations, in RWKV-LM's order
V_FIRST = "rwkv7.v_first"  # the key of the first layer's value in a model's per-call `context` dict


def _lora_rank(width: int, factor: float) -> int:
    """RWKV-LM's suggested LoRA rank: factor * sqrt(C), rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * width**0.5 / 32) * 32))


@dataclass(frozen=True)
class RWKV7Config:
    d_model: int = 256
    # Heads: give one of n_heads / head_dim; None for both means head_dim 64 (RWKV-7's) when d_model >= 128,
    # else d_model // 2.
    n_heads: int | None = None
    head_dim: int | None = None
    # LoRA ranks; None means RWKV-LM's suggestion for this d_model (2.5, 2.5, 1.7 and 5 sqrt(D), multiples of 32)
    decay_lora_rank: int | None = None  # w1 / w2 (D_DECAY_LORA)
    a_lora_rank: int | None = None  # a1 / a2, the in-context learning rate (D_AAA_LORA)
    value_lora_rank: int | None = None  # v1 / v2, the value residual (D_MV_LORA)
    gate_lora_rank: int | None = None  # g1 / g2, the output gate (D_GATE_LORA)
    # hold v0/v1/v2 and mix v towards the first layer's value, as RWKV-LM's layers after the first (SeqLM sets
    # it True on every rwkv7 layer after its first one unless given)
    value_residual: bool = False
    ffn_ratio: float = 4.0  # channel-mix hidden width F / D (RWKV-7 uses 4)
    # Stack position (RWKV-LM's layer_id / n_layer), which the initialisation depends on; SeqLM fills both per
    # layer (block index, model depth). The defaults are the first layer of one.
    layer_id: int = 0
    n_layers: int = 1
    # generalized delta rule: "auto" ("compiled" on CPU where it builds, else "chunked"), "compiled" (C++ CPU
    # kernel), "chunked" (DPLR chunked form), "sequential" (token loop)
    backend: Backend = "auto"
    chunk_size: int = 32  # tokens per chunk: of the chunked form, and the checkpoints of "compiled"
    subchunk_size: int = 8  # tokens whose pairwise decays are formed exactly; divides chunk_size
    norm_eps: float = 64e-5  # ln_x GroupNorm eps, RWKV-LM's value

    def __post_init__(self):
        if self.d_model < 2:
            raise ValueError(f"rwkv7: d_model must be >= 2, got {self.d_model}")
        check_positive("rwkv7", **{name: getattr(self, name) for name in ("n_heads", "head_dim", "decay_lora_rank",
                                                                           "a_lora_rank", "value_lora_rank",
                                                                           "gate_lora_rank")})
        if self.n_heads is not None and self.head_dim is not None and self.n_heads * self.head_dim != self.d_model:
            raise ValueError(f"rwkv7: n_heads={self.n_heads} x head_dim={self.head_dim} != d_model={self.d_model}")
        if self.d_model % self.heads or self.d_model % self.head_size:
            raise ValueError(f"rwkv7: d_model={self.d_model} is not divisible into heads "
                             f"(n_heads={self.n_heads}, head_dim={self.head_dim})")
        if self.chunk_size < 1 or self.subchunk_size < 1 or self.chunk_size % self.subchunk_size:
            raise ValueError(f"rwkv7: chunk_size={self.chunk_size} must be a positive multiple of "
                             f"subchunk_size={self.subchunk_size}")
        if self.ffn_ratio <= 0:
            raise ValueError(f"rwkv7: ffn_ratio must be > 0, got {self.ffn_ratio}")
        check_stack_position("rwkv7", self.layer_id, self.n_layers)

    @property
    def head_size(self) -> int:
        """K, the head width (the derived one of n_heads / head_dim)."""
        if self.head_dim is not None:
            return self.head_dim
        if self.n_heads is not None:
            return max(1, self.d_model // self.n_heads)
        return 64 if self.d_model >= 128 else max(1, self.d_model // 2)

    @property
    def heads(self) -> int:
        return self.n_heads if self.n_heads is not None else self.d_model // self.head_size

    def rank(self, name: str) -> int:
        factors = {"decay": 2.5, "a": 2.5, "value": 1.7, "gate": 5.0}
        given = getattr(self, f"{name}_lora_rank")
        return given if given is not None else _lora_rank(self.d_model, factors[name])

    @property
    def ffn_hidden(self) -> int:
        return max(1, int(self.d_model * self.ffn_ratio))


@dataclass
class RWKV7State(MixerState):
    shift: torch.Tensor  # (B, D) the last input token, shifted into the next one
    wkv: torch.Tensor  # (B, H, K, K) the generalized-delta-rule state (fla layout: key rows, value columns)


@dataclass
class RWKV7ChannelMixState(MixerState):
    shift: torch.Tensor  # (B, D) the last input token of the channel-mix


def _token_shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, D) -> the previous token of every position, `last` (B, D) (or zeros) before the first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last.to(x.dtype).unsqueeze(1)
    return torch.cat([first, x[:, :-1]], dim=1)


def _low_rank(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, base: torch.Tensor | None = None,
              inner=None) -> torch.Tensor:
    """base + inner(x @ first) @ second for x (..., D), first (D, R), second (R, D), base (1, 1, D) or None;
    the add is fused into the second product (addmm)."""
    hidden = x.reshape(-1, x.shape[-1]) @ first
    if inner is not None:
        hidden = inner(hidden)
    out = hidden @ second if base is None else torch.addmm(base.reshape(1, -1), hidden, second)
    return out.view(*x.shape[:-1], second.shape[-1])


def _orthogonal(rows: int, cols: int, scale: float) -> torch.Tensor:
    """RWKV-LM's ortho_init for a (rows, cols) LoRA factor."""
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    return nn.init.orthogonal_(torch.empty(rows, cols), gain=gain * scale)


@register("rwkv7", RWKV7Config)
class RWKV7Mixer(SequenceMixer):
    """The Goose time-mix; `own_mlp()` gives the matching channel-mix."""

    def __init__(self, config: RWKV7Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        heads, size = config.heads, config.head_size
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}  # the profiles are built in float64
        early, late = layer_ratios(config.layer_id, config.n_layers)  # RWKV-LM's ratio_0_to_1, ratio_1_to_almost0

        with torch.no_grad():
            ddd = torch.arange(width, dtype=torch.float64) / width
            exponents = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
            for name in _MIXED:
                profile = 1.0 - ddd ** (exponents[name] * late)
                setattr(self, f"x_{name}", nn.Parameter(profile.view(1, 1, width).to(**factory)))
            channel = torch.arange(width, dtype=torch.float64)
            linear = channel / max(width - 1, 1) - 0.5
            zigzag = ((channel % size) - (size - 1) / 2) / max((size - 1) / 2, 1e-9)
            zigzag = zigzag * zigzag.abs()
            decay_speed = -6 + 6 * (channel / max(width - 1, 1)) ** (1 + early**0.3)

            def lora(name: str, base: torch.Tensor | None):
                rank = config.rank({"w": "decay", "a": "a", "v": "value", "g": "gate"}[name])
                # RWKV-LM starts the first factor at zero; U(-0.01, 0.01) here gives the second factor and
                # the lerp x_* a gradient from the first step (the contract checks that every parameter learns).
                first = torch.empty(width, rank).uniform_(-0.01, 0.01)
                setattr(self, f"{name}1", nn.Parameter(first.to(**factory)))
                setattr(self, f"{name}2", nn.Parameter(_orthogonal(rank, width, 0.1).to(**factory)))
                if base is not None:
                    setattr(self, f"{name}0", nn.Parameter(base.view(1, 1, width).to(**factory)))

            lora("w", decay_speed + 0.5 + zigzag * 2.5)
            lora("a", -0.19 + zigzag * 0.3 + linear * 0.4)
            if config.value_residual:
                lora("v", 0.73 - linear * 0.4)
            lora("g", None)
            self.k_k = nn.Parameter((0.71 - linear * 0.1).view(1, 1, width).to(**factory))
            self.k_a = nn.Parameter(torch.full((1, 1, width), 1.02, **factory))
            self.r_k = nn.Parameter(torch.full((heads, size), -0.04, **factory))

        self.receptance = nn.Linear(width, width, bias=False, **factory)
        self.key = nn.Linear(width, width, bias=False, **factory)
        self.value = nn.Linear(width, width, bias=False, **factory)
        self.output = nn.Linear(width, width, bias=False, **factory)
        self.ln_x = nn.GroupNorm(heads, width, eps=config.norm_eps, **factory)
        with torch.no_grad():
            self.ln_x.weight.fill_(ln_x_scale(config.layer_id, config.n_layers))  # RWKV-LM's model init
            bound = width**-0.5
            self.receptance.weight.uniform_(-0.5 * bound, 0.5 * bound)
            self.key.weight.uniform_(-0.05 * bound, 0.05 * bound)
            self.value.weight.uniform_(-0.5 * bound, 0.5 * bound)
            # RWKV-LM's module zeroes the output projection; a small one here gives a mixer built alone a
            # non-zero output and every time-mix parameter a gradient (the model init zeroes it, as RWKV-LM).
            self.output.weight.uniform_(-0.1 * bound, 0.1 * bound)
        self.output._is_residual_projection = True
        for linear, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.output, 0.0)):
            rwkv_lm_init(linear, gain)  # RWKV-LM's generate_init_weight, drawn by the model init
        for name, param in self.named_parameters():
            if name.startswith(("x_", "k_", "r_k")) or name in ("w0", "a0", "v0"):
                param._no_weight_decay = True

    # --- pieces ---------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, x_prev: torch.Tensor, v_first: torch.Tensor | None, context: dict | None):
        """x, x_prev (B, L, D) -> the delta rule's inputs (B, L, H, K) and the rest of the time-mix. With a
        `context`, the first layer to see it leaves its value there as v_first for the later ones."""
        xx = x_prev - x
        # Fused elementwise forms (addcmul, lerp, addmm): at L = 4096 the time-mix is memory-bound outside
        # its projections, so each pass over a (B, L, D) tensor saved counts.
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, getattr(self, f"x_{name}")) for name in _MIXED)
        r = self.receptance(xr)
        log_decay = -_DECAY_SCALE * torch.sigmoid(_low_rank(xw, self.w1, self.w2, self.w0, torch.tanh))
        k = self.key(xk)
        v = self.value(xv)
        if context is not None:
            if V_FIRST not in context:
                context[V_FIRST] = v
            elif v_first is None:
                v_first = context[V_FIRST]
        if self.config.value_residual and v_first is not None:
            v = torch.lerp(v, v_first.to(v.dtype), torch.sigmoid(_low_rank(xv, self.v1, self.v2, self.v0)))
        a = torch.sigmoid(_low_rank(xa, self.a1, self.a2, self.a0))
        g = _low_rank(xg, self.g1, self.g2, inner=torch.sigmoid)
        split = "b l (h k) -> b l h k"
        heads = self.config.heads
        kappa = F.normalize(rearrange(k * self.k_k, split, h=heads), dim=-1)
        k = k * torch.addcmul(1 - self.k_a, a, self.k_a)  # k (1 + (a - 1) k_a)
        r, k, v, a, log_decay = (rearrange(t, split, h=heads) for t in (r, k, v, a, log_decay))
        return r, k, v, -kappa, kappa * a, log_decay, g

    def _output(self, out, r, k, v, g) -> torch.Tensor:
        """out, r, k, v (B, L, H, K), g (B, L, D) -> (B, L, D): GroupNorm, the r_k bonus, gate, projection."""
        # GroupNorm with one group per head is a LayerNorm over each head's K channels: ln_x's parameters
        # applied as layer_norm's, which is several times faster than torch's group_norm on CPU (and at
        # decode, batch 1, group_norm dominated the whole step).
        heads, size = out.shape[-2], out.shape[-1]
        weight, bias = self.ln_x.weight.view(heads, size), self.ln_x.bias.view(heads, size)
        normed = torch.addcmul(bias, F.layer_norm(out, (size,), eps=self.ln_x.eps), weight)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True)  # (B, L, H, 1), times v below
        return self.output((torch.addcmul(normed, bonus, v) * g.unflatten(-1, (heads, size))).flatten(2))

    def _check_v_first(self, v_first, shape, what):
        if v_first is None:
            return
        if not self.config.value_residual:
            raise ValueError(f"{what}: v_first is given but value_residual=False")
        if tuple(v_first.shape) != tuple(shape):
            raise ValueError(f"{what}: v_first must have the input's shape {tuple(shape)}, got {tuple(v_first.shape)}")

    def _run(self, x, state: RWKV7State | None, v_first, context):
        cfg = self.config
        r, k, v, a, b, log_decay, g = self._project(x, _token_shift(x, None if state is None else state.shift), v_first,
                                                    context)
        initial = None if state is None else state.wkv
        out, final = generalized_delta_rule(r, k, v, a, b, log_decay, scale=1.0, initial_state=initial,
                                            output_final_state=state is not None, backend=cfg.backend,
                                            chunk_size=cfg.chunk_size, subchunk_size=cfg.subchunk_size)
        return self._output(out, r, k, v, g), final

    # --- the contract -----------------------------------------------------------------------
    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        return f"generalized delta rule {describe_backend(self.config.backend, device)}; recurrent step"

    # SeqLM's blocks pass their per-call context dict to a mixer that sets this (see seqarch.models.block)
    uses_layer_context = True

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None = None,
                context: dict | None = None) -> torch.Tensor:
        check_input(x, self.d_model, 3, "rwkv7.forward")
        self._check_v_first(v_first, x.shape, "rwkv7.forward")
        return self._run(x, None, v_first, context)[0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> RWKV7State:
        cfg = self.config
        factory = self.state_factory(device, dtype)
        return RWKV7State(
            shift=torch.zeros(batch_size, self.d_model, **factory),
            wkv=torch.zeros(batch_size, cfg.heads, cfg.head_size, cfg.head_size, **factory),
        )

    def prefill(self, x: torch.Tensor, state: RWKV7State, v_first: torch.Tensor | None = None,
                context: dict | None = None) -> tuple[torch.Tensor, RWKV7State]:
        check_input(x, self.d_model, 3, "rwkv7.prefill")
        check_state(state, RWKV7State, x.shape[0], "rwkv7.prefill")
        self._check_v_first(v_first, x.shape, "rwkv7.prefill")
        if x.shape[1] == 0:
            return x, state
        y, wkv = self._run(x, state, v_first, context)
        return y, RWKV7State(shift=x[:, -1].to(state.shift.dtype), wkv=wkv.to(state.wkv.dtype))

    def step(self, x_t: torch.Tensor, state: RWKV7State, v_first: torch.Tensor | None = None,
             context: dict | None = None) -> tuple[torch.Tensor, RWKV7State]:
        check_input(x_t, self.d_model, 2, "rwkv7.step")
        check_state(state, RWKV7State, x_t.shape[0], "rwkv7.step")
        self._check_v_first(v_first, x_t.shape, "rwkv7.step")
        r, k, v, a, b, log_decay, g = self._project(x_t.unsqueeze(1), state.shift.to(x_t.dtype).unsqueeze(1),
                                                    None if v_first is None else v_first.unsqueeze(1), context)
        wkv = state.wkv.to(torch.promote_types(x_t.dtype, torch.float32))
        out_t, wkv = generalized_delta_rule_step(r[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], log_decay[:, 0], wkv,
                                                 scale=1.0, backend=self.config.backend)
        y = self._output(out_t.to(x_t.dtype).unsqueeze(1), r, k, v, g)
        return y.squeeze(1), RWKV7State(shift=x_t.to(state.shift.dtype), wkv=wkv.to(state.wkv.dtype))

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): the LoRAs held as Parameters
        (2 per weight), and per (head, key, value) the delta-rule step: sa = a^T S (2), S = w S + b sa + k v
        (5), o = r^T S (2); independent of the context length."""
        cfg = self.config
        lora = sum(p.numel() for name, p in self.named_parameters() if name[:1] in "wavg" and name[1:] in ("1", "2"))
        return 2 * lora + 9 * cfg.heads * cfg.head_size * cfg.head_size

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        return batch_size * (self.d_model + cfg.heads * cfg.head_size * cfg.head_size) * element_size(dtype)

    def own_mlp(self) -> RWKV7ChannelMix:
        weight = self.output.weight
        return RWKV7ChannelMix(self.config, device=weight.device, dtype=weight.dtype)


class RWKV7ChannelMix(SequenceMixer):
    """RWKV-7 channel-mix (`RWKV_CMix_x070`): token shift, squared ReLU, no receptance gate. A
    SequenceMixer because its token shift carries one token of state."""

    def __init__(self, config: RWKV7Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        late = layer_ratios(config.layer_id, config.n_layers)[1]
        with torch.no_grad():
            profile = 1.0 - (torch.arange(width, dtype=torch.float64) / width) ** (late**4)
            self.x_k = nn.Parameter(profile.view(1, 1, width).to(**factory))
        self.x_k._no_weight_decay = True
        self.key = nn.Linear(width, config.ffn_hidden, bias=False, **factory)
        self.value = nn.Linear(config.ffn_hidden, width, bias=False, **factory)
        with torch.no_grad():
            self.key.weight.uniform_(-0.5 * width**-0.5, 0.5 * width**-0.5)
            # RWKV-LM zeroes it; small here (built alone) as the time-mix output; the model init zeroes it.
            self.value.weight.uniform_(-0.1 * config.ffn_hidden**-0.5, 0.1 * config.ffn_hidden**-0.5)
        self.value._is_residual_projection = True  # the channel-mix's output, as SwiGLU's down projection
        rwkv_lm_init(self.key, 1.0)
        rwkv_lm_init(self.value, 0.0)

    def _mix(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        return self.value(torch.relu(self.key(x + (x_prev - x) * self.x_k)).square())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "rwkv7 channel-mix forward")
        return self._mix(x, _token_shift(x, None))

    def init_state(self, batch_size: int, device=None, dtype=None) -> RWKV7ChannelMixState:
        return RWKV7ChannelMixState(shift=torch.zeros(batch_size, self.d_model, **self.state_factory(device, dtype)))

    def prefill(self, x: torch.Tensor, state: RWKV7ChannelMixState) -> tuple[torch.Tensor, RWKV7ChannelMixState]:
        check_input(x, self.d_model, 3, "rwkv7 channel-mix prefill")
        check_state(state, RWKV7ChannelMixState, x.shape[0], "rwkv7 channel-mix prefill")
        if x.shape[1] == 0:
            return x, state
        y = self._mix(x, _token_shift(x, state.shift))
        return y, RWKV7ChannelMixState(shift=x[:, -1].to(state.shift.dtype))

    def step(self, x_t: torch.Tensor, state: RWKV7ChannelMixState) -> tuple[torch.Tensor, RWKV7ChannelMixState]:
        check_input(x_t, self.d_model, 2, "rwkv7 channel-mix step")
        check_state(state, RWKV7ChannelMixState, x_t.shape[0], "rwkv7 channel-mix step")
        y = self._mix(x_t.unsqueeze(1), state.shift.to(x_t.dtype).unsqueeze(1)).squeeze(1)  # x_k is (1, 1, D)
        return y, RWKV7ChannelMixState(shift=x_t.to(state.shift.dtype))

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return batch_size * self.d_model * element_size(dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """FLOPs beyond the Linear weights: the token shift and its interpolation (3 D) and the squared
        ReLU (2 F)."""
        return 3 * self.d_model + 2 * self.config.ffn_hidden
