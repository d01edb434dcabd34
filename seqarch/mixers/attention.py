"""Causal multi-head self-attention with RoPE and grouped-query heads (GQA), and a KV cache.

Legend: B batch, L new tokens, T cached + new tokens, D model width, H query heads,
G key/value heads (H % G == 0), E head dim.

Parallel path: q, k, v projections, RoPE at positions 0..L-1, `F.scaled_dot_product_attention`
with a causal mask. Prefill appends k, v to the cache and lets query i (absolute position p + i)
see keys 0..p + i. Step is prefill of one token. GQA (Ainslie et al., 2023) shares each key/value
head between H / G query heads; the cache holds only the G heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.mixers.base import MixerState, SequenceMixer, check_input
from seqarch.positional import apply_rope, rope_cos_sin, rope_frequencies
from seqarch.registry import register


@dataclass(frozen=True)
class AttentionConfig:
    d_model: int = 256
    n_heads: int | None = None  # query heads; None: d_model // 64, at least 1
    n_kv_heads: int | None = None  # key/value heads (GQA); None: n_heads (plain MHA); 1: MQA
    rope_base: float = 10000.0  # RoPE base θ; frequencies θ^(-2i/E)
    max_position: int = 2048  # context length the model is trained for (used by RoPE scalings)
    positional: str = "rope"  # "rope" or "none" (NoPE)
    bias: bool = False  # biases in the q/k/v/o projections

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ValueError(f"attention: d_model={self.d_model} is not divisible by n_heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"attention: n_heads={self.heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.positional not in ("rope", "none"):
            raise ValueError(f"attention: positional={self.positional!r}; valid: 'rope', 'none'")
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(f"attention: RoPE needs an even head dim, got {self.head_dim}")

    @property
    def heads(self) -> int:
        return self.n_heads if self.n_heads is not None else max(1, self.d_model // 64)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


@dataclass
class KVCache(MixerState):
    key: torch.Tensor  # (B, G, T, E), RoPE already applied
    value: torch.Tensor  # (B, G, T, E)
    position: int  # tokens seen so far = absolute position of the next token


@register("attention", AttentionConfig)
class Attention(SequenceMixer):
    state_grows_with_length = True

    def __init__(self, config: AttentionConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        factory = {"device": device, "dtype": dtype}
        heads, kv_heads, head_dim = config.heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, heads * head_dim, bias=config.bias, **factory)
        self.kv_proj = nn.Linear(config.d_model, 2 * kv_heads * head_dim, bias=config.bias, **factory)
        self.out_proj = nn.Linear(heads * head_dim, config.d_model, bias=config.bias, **factory)
        if config.positional == "rope":
            inv_freq, self.attention_scale = rope_frequencies(head_dim, config.rope_base, config.max_position)
            self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        else:
            self.inv_freq = None
            self.attention_scale = 1.0

    def _project(self, x: torch.Tensor, start: int):
        """x (B, L, D) at absolute positions start.. -> q (B, H, L, E), k, v (B, G, L, E)."""
        cfg = self.config
        q = rearrange(self.q_proj(x), "b l (h e) -> b h l e", h=cfg.heads)
        k, v = rearrange(self.kv_proj(x), "b l (two g e) -> two b g l e", two=2, g=cfg.kv_heads)
        if self.inv_freq is not None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            cos, sin = rope_cos_sin(positions, self.inv_freq, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _attend(self, q, k, v, query_start: int) -> torch.Tensor:
        """q (B, H, L, E) at positions query_start.., k, v (B, G, T, E) at positions 0.. -> (B, L, D)."""
        cfg = self.config
        seqlen, total = q.shape[2], k.shape[2]
        if cfg.kv_heads != cfg.heads:
            k = k.repeat_interleave(cfg.heads // cfg.kv_heads, dim=1)
            v = v.repeat_interleave(cfg.heads // cfg.kv_heads, dim=1)
        scale = self.attention_scale / cfg.head_dim**0.5
        if query_start == 0 and seqlen == total:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        elif seqlen == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            query_pos = torch.arange(query_start, query_start + seqlen, device=q.device)
            mask = torch.arange(total, device=q.device) <= query_pos[:, None]  # (L, T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.out_proj(rearrange(out, "b h l e -> b l (h e)"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "attention.forward")
        q, k, v = self._project(x, 0)
        return self._attend(q, k, v, 0)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        cfg = self.config
        empty = torch.zeros(batch_size, cfg.kv_heads, 0, cfg.head_dim, device=device, dtype=dtype)
        return KVCache(key=empty, value=empty.clone(), position=0)

    def prefill(self, x: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        check_input(x, self.d_model, 3, "attention.prefill")
        q, k, v = self._project(x, state.position)
        key = torch.cat([state.key, k.to(state.key.dtype)], dim=2)
        value = torch.cat([state.value, v.to(state.value.dtype)], dim=2)
        y = self._attend(q, key.to(q.dtype), value.to(q.dtype), state.position)
        return y, KVCache(key=key, value=value, position=state.position + x.shape[1])

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        check_input(x_t, self.d_model, 2, "attention.step")
        y, state = self.prefill(x_t.unsqueeze(1), state)
        return y.squeeze(1), state

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * batch_size * cfg.kv_heads * seq_len * cfg.head_dim * element
