"""RetNet: multi-scale retention (MSR).

Sun et al. (2023), "Retentive Network: A Successor to Transformer for Large Language Models",
section 2.2. Legend: B batch, L length, D model width, H heads, K query/key head dim (= D / H),
V value head dim (= value_factor * D / H).

    q, k = RoPE(x W_Q), RoPE(x W_K)  per head,   v = x W_V
    head_h = Retention_γh(q, k, v)               γ_h = 1 - 2^(-5-h), scale K^-1/2 (seqarch.ops.retention)
    y = (swish(x W_G) ⊙ GroupNorm_H(head_1 .. head_H)) W_O

The paper's rotation Θ_n = e^(inθ) on q and conjugated on k is RoPE; the xPos-style decay lives in
γ, so q and k are only rotated (RoPE of seqarch.positional, "rotate half" pairing). GroupNorm
normalises each head's V channels per token, so it applies unchanged to one decoding step. The
paper's extra normalisations (decay-mask rows by sqrt of their sum, scores by max(|row sum|, 1))
are per-(head, token) scalars that GroupNorm removes up to its eps; they are left out, which keeps
the parallel, chunkwise and recurrent paths exactly the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.mixers.base import MixerState, SequenceMixer, check_input
from seqarch.ops.retention import retention, retention_step
from seqarch.positional import apply_rope, rope_cos_sin, rope_frequencies
from seqarch.registry import register


@dataclass(frozen=True)
class RetNetConfig:
    d_model: int = 256
    n_heads: int | None = None  # retention heads; None: d_model // 64, at least 1 (paper: head dim 256)
    value_factor: int = 2  # value and gate width = value_factor * d_model, as in the paper
    decay: tuple[float, ...] | None = None  # per-head γ in (0, 1); None: 1 - 2^(-5-h)
    rope_base: float = 10000.0  # RoPE base θ of the q/k rotation; frequencies θ^(-2i/K)
    mode: Literal["parallel", "chunkwise"] = "chunkwise"  # training / prefill form; both exact
    chunk_size: int = 64  # chunkwise form's chunk; fastest of 16..256 on CPU (benchmarks/bench_retention.py)
    norm_eps: float = 1e-5  # GroupNorm eps
    bias: bool = False  # biases in the q/k/v/gate/output projections

    def __post_init__(self):
        if self.d_model < 1:
            raise ValueError(f"retnet: d_model must be positive, got {self.d_model}")
        if self.heads < 1 or self.d_model % self.heads:
            raise ValueError(f"retnet: d_model={self.d_model} is not divisible by n_heads={self.heads}")
        if self.key_dim % 2:
            raise ValueError(f"retnet: RoPE needs an even head dim, got d_model / n_heads = {self.key_dim}")
        if self.value_factor < 1:
            raise ValueError(f"retnet: value_factor must be >= 1, got {self.value_factor}")
        if self.decay is not None:
            if len(self.decay) != self.heads:
                raise ValueError(f"retnet: decay needs one γ per head ({self.heads}), got {len(self.decay)}")
            if not all(0 < gamma < 1 for gamma in self.decay):
                raise ValueError(f"retnet: every decay γ must lie in (0, 1), got {self.decay}")
        if self.mode not in ("parallel", "chunkwise"):
            raise ValueError(f"retnet: mode={self.mode!r}; valid: 'parallel', 'chunkwise'")
        if self.chunk_size < 1:
            raise ValueError(f"retnet: chunk_size must be >= 1, got {self.chunk_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"retnet: norm_eps must be positive, got {self.norm_eps}")

    @property
    def heads(self) -> int:
        return self.n_heads if self.n_heads is not None else max(1, self.d_model // 64)

    @property
    def key_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def value_width(self) -> int:
        return self.value_factor * self.d_model

    @property
    def value_dim(self) -> int:
        return self.value_width // self.heads


@dataclass
class RetNetState(MixerState):
    retention: torch.Tensor  # (B, H, K, V): S after the tokens seen so far
    position: int  # tokens seen so far = absolute position of the next token (for RoPE)


@register("retnet", RetNetConfig)
class RetNet(SequenceMixer):
    def __init__(self, config: RetNetConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(width, width, bias=config.bias, **factory)
        self.k_proj = nn.Linear(width, width, bias=config.bias, **factory)
        self.v_proj = nn.Linear(width, config.value_width, bias=config.bias, **factory)
        self.g_proj = nn.Linear(width, config.value_width, bias=config.bias, **factory)
        self.out_proj = nn.Linear(config.value_width, width, bias=config.bias, **factory)
        self.norm_weight = nn.Parameter(torch.ones(config.value_width, **factory))
        self.norm_bias = nn.Parameter(torch.zeros(config.value_width, **factory))
        self.norm_weight._no_weight_decay = True
        self.norm_bias._no_weight_decay = True
        # The reference implementation (torchscale) shrinks the initial projections so that the
        # un-normalised retention sums start small: gain 2^-2.5 for q, k, v, g and 2^-1 for W_O.
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.out_proj.weight, gain=2**-1)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.out_proj):
            proj._no_reinit = True  # the model init keeps torchscale's gains; W_O is also a residual projection
        self.out_proj._is_residual_projection = True
        inv_freq, _ = rope_frequencies(config.key_dim, config.rope_base)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
    def _project(self, x: torch.Tensor, start: int):
        """x (B, L, D) at absolute positions start.. -> q, k (B, H, L, K), v (B, H, L, V), gate (B, L, H V)."""
        heads = self.config.heads
        q = rearrange(self.q_proj(x), "b l (h k) -> b h l k", h=heads)
        k = rearrange(self.k_proj(x), "b l (h k) -> b h l k", h=heads)
        v = rearrange(self.v_proj(x), "b l (h v) -> b h l v", h=heads)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, F.silu(self.g_proj(x))

    def _output(self, heads_out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """heads_out (B, H, L, V), gate (B, L, H V) -> (B, L, D): GroupNorm per head and token, gate, W_O."""
        batch, heads, length, _ = heads_out.shape
        flat = rearrange(heads_out, "b h l v -> (b l) (h v)")
        normed = F.group_norm(flat, heads, self.norm_weight, self.norm_bias, self.config.norm_eps)
        y = rearrange(normed, "(b l) c -> b l c", b=batch) * gate
        return self.out_proj(y)

    def _decay(self, device) -> torch.Tensor | None:
        """The configured γ (H,) in float64, so values near 1 survive a float32 model; None: the op's default."""
        if self.config.decay is None:
            return None
        return torch.tensor(self.config.decay, dtype=torch.float64, device=device)

    def _retain(self, q, k, v, state: torch.Tensor | None, output_final_state: bool):
        cfg = self.config
        return retention(q, k, v, decay=self._decay(q.device), mode=cfg.mode, chunk_size=cfg.chunk_size,
                         initial_state=state, output_final_state=output_final_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "retnet.forward")
        q, k, v, gate = self._project(x, 0)
        out, _ = self._retain(q, k, v, None, False)
        return self._output(out, gate)

    def init_state(self, batch_size: int, device=None, dtype=None) -> RetNetState:
        cfg = self.config
        zeros = torch.zeros(batch_size, cfg.heads, cfg.key_dim, cfg.value_dim, device=device, dtype=dtype)
        return RetNetState(retention=zeros, position=0)

    def prefill(self, x: torch.Tensor, state: RetNetState) -> tuple[torch.Tensor, RetNetState]:
        check_input(x, self.d_model, 3, "retnet.prefill")
        q, k, v, gate = self._project(x, state.position)
        out, final = self._retain(q, k, v, state.retention.to(q.dtype), True)
        new_state = RetNetState(retention=final.to(state.retention.dtype), position=state.position + x.shape[1])
        return self._output(out, gate), new_state

    def step(self, x_t: torch.Tensor, state: RetNetState) -> tuple[torch.Tensor, RetNetState]:
        check_input(x_t, self.d_model, 2, "retnet.step")
        q, k, v, gate = self._project(x_t.unsqueeze(1), state.position)
        out, retained = retention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state.retention.to(q.dtype),
                                       decay=self._decay(q.device))
        new_state = RetNetState(retention=retained.to(state.retention.dtype), position=state.position + 1)
        return self._output(out.unsqueeze(2), gate).squeeze(1), new_state

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = torch.empty((), dtype=dtype).element_size()
        return batch_size * cfg.heads * cfg.key_dim * cfg.value_dim * element

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): the retention step, per
        (head, key, value) S = γ S + k v and o += q S (5 H K V); independent of the context length."""
        cfg = self.config
        return 5 * cfg.heads * cfg.key_dim * cfg.value_dim

