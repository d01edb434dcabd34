"""Causal multi-head self-attention with positional variants, long-context policies and a KV cache.

Legend: B batch, L new tokens, T keys (cached + new), D model width, H query heads,
G key/value heads (H % G == 0), E head dim, C kNN chunk, M memory entries.

Default: q, k, v projections, RoPE at positions 0..L-1, `F.scaled_dot_product_attention` with a
causal mask (Vaswani et al., 2017; RoPE: Su et al., 2021; GQA: Ainslie et al., 2023, the cache
holding only the G key/value heads). Variants, all in this one class, chosen by the config:

- positions: RoPE with the linear / ntk / dynamic / yarn scalings, ReRoPE and Leaky ReRoPE
  (two score passes), ALiBi, or none (seqarch/positional.py has the formulas);
- sliding window of w keys with a rolling cache of w - 1 entries; attention sinks (StreamingLLM)
  on top of it, with the sink distances taken inside the cache;
- S2-Attn (LongLoRA) in training mode; full attention in eval mode and for prefill / step;
- kNN memory (Memorizing / Focused Transformer): chunk-local attention plus the top-k of a memory
  of earlier chunks, in one softmax.

Every variant other than the default runs `_attend_blocked` (blocks of queries, each reading only the
keys it may see, so a window costs O(L (w + s)) not O(L^2); the fused kernel with a mask or ALiBi bias
where one logit formula serves the block, explicit two-pass scores for RoPE with sinks, ReRoPE and
dynamic NTK) or `_run_knn`; `forward_ref` is the per-query loop they are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.mixers.base import MixerState, SequenceMixer, check_input, check_positive, check_state, element_size
from seqarch.ops.attention import (
    alibi_bias,
    attention_mask,
    dot_scale,
    key_distance,
    knn_attention,
    retained_positions,
    s2_attention,
    sink_only,
    sink_query_positions,
)
from seqarch.positional import (
    ROPE_SCALING_TYPES,
    alibi_slopes,
    apply_rope,
    dynamic_ntk_inv_freq,
    rerope_angles,
    rerope_distance,
    rope_cos_sin,
    rope_frequencies,
)
from seqarch.registry import register

POSITIONAL = ("rope", "rerope", "alibi", "none")
# Elements of one block of explicit scores (B * H * queries * keys); bounds the blocked path's memory.
_SCORE_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class AttentionConfig:
    d_model: int = 256
    n_heads: int | None = None  # query heads; None: d_model // 64, at least 1
    n_kv_heads: int | None = None  # key/value heads (GQA); None: n_heads (plain MHA); 1: MQA
    head_dim: int | None = None  # E, width of each head; None: d_model // n_heads (Mistral-Nemo-like models differ)
    bias: bool = False  # biases in the q/k/v/o projections
    positional: str = "rope"  # "rope", "rerope", "alibi" or "none" (NoPE); sinusoidal lives at the embedding
    rope_base: float = 10000.0  # RoPE base θ; frequencies θ^(-2i/E)
    max_position: int = 2048  # context length trained for: the scalings' original length, ReRoPE's default
    rope_scaling: str | None = None  # None, "linear" (PI), "ntk", "dynamic" (dynamic NTK), "yarn" or "llama3"
    rope_factor: float = 1.0  # scaling factor s = target length / trained length
    yarn_beta_fast: float = 32.0  # YaRN: dimensions rotating more than this often in max_position extrapolate
    yarn_beta_slow: float = 1.0  # YaRN: dimensions rotating less than this often interpolate
    yarn_mscale: float = 1.0  # YaRN (DeepSeek form, with yarn_mscale_all_dim): numerator 0.1 * mscale * ln(s) + 1
    yarn_mscale_all_dim: float = 0.0  # YaRN (DeepSeek form): denominator's mscale; 0: off, factor 0.1 ln(s) + 1 (HF)
    yarn_attention_factor: float | None = None  # YaRN: explicit factor on q and k (HF's attention_factor); None: infer
    llama3_low_freq_factor: float = 1.0  # llama3: wavelengths above max_position / this are divided by rope_factor
    llama3_high_freq_factor: float = 4.0  # llama3: wavelengths below max_position / this are kept
    rerope_window: int = 512  # ReRoPE: relative distances from this on are clipped / compressed
    rerope_leak: float = 0.0  # Leaky ReRoPE slope 1/k beyond the window; 0: ReRoPE (clip)
    window: int | None = None  # sliding window: each query sees its `window` most recent keys; None: all
    sinks: int = 0  # StreamingLLM attention sinks: the first `sinks` tokens stay visible (needs a window)
    s2_group: int | None = None  # LongLoRA S2-Attn group size (even) in training mode; None: off
    knn_top_k: int | None = None  # kNN memory: entries retrieved per query; None: no memory
    knn_chunk: int = 512  # kNN memory: local attention runs inside chunks of this many tokens
    knn_memory_size: int = 8192  # kNN memory: most recent (key, value) pairs of earlier chunks kept

    def __post_init__(self):
        check_positive("attention", d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads)
        if self.head_dim is None:
            if self.d_model % self.heads:
                raise ValueError(f"attention: d_model={self.d_model} is not divisible by n_heads={self.heads} "
                                 "(or give head_dim)")
            object.__setattr__(self, "head_dim", self.d_model // self.heads)  # resolved once; frozen after
        if self.head_dim < 1:
            raise ValueError(f"attention: head_dim must be >= 1, got {self.head_dim}")
        if self.heads % self.kv_heads:
            raise ValueError(f"attention: n_heads={self.heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.positional not in POSITIONAL:
            hint = " (sinusoidal positions are absolute: add them at the embedding)" * (
                self.positional == "sinusoidal")
            raise ValueError(f"attention: positional={self.positional!r}; valid: {POSITIONAL}{hint}")
        if self.positional in ("rope", "rerope") and self.head_dim % 2:
            raise ValueError(f"attention: RoPE needs an even head dim, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALING_TYPES:
            raise ValueError(f"attention: rope_scaling={self.rope_scaling!r}; valid: None, {ROPE_SCALING_TYPES}")
        if self.rope_scaling is not None and self.positional != "rope":
            raise ValueError(f"attention: rope_scaling needs positional='rope', got {self.positional!r}")
        if self.rope_factor < 1:
            raise ValueError(f"attention: rope_factor must be >= 1, got {self.rope_factor}")
        if self.max_position < 1 or self.rerope_window < 1:
            raise ValueError("attention: max_position and rerope_window must be >= 1")
        if not 0 <= self.rerope_leak < 1:
            raise ValueError(f"attention: rerope_leak must be in [0, 1), got {self.rerope_leak}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"attention: window must be None or >= 1, got {self.window}")
        if self.sinks < 0 or self.sinks and self.window is None:
            raise ValueError(f"attention: sinks={self.sinks} needs sinks >= 0 and a window (without one every "
                             "token is visible anyway)")
        if self.s2_group is not None:
            if self.s2_group < 2 or self.s2_group % 2:
                raise ValueError(f"attention: s2_group must be an even number >= 2, got {self.s2_group}")
            if self.heads % 2:
                raise ValueError(f"attention: S2-Attn shifts half of the heads; n_heads={self.heads} is odd")
        if self.knn_top_k is not None and (self.knn_top_k < 1 or self.knn_chunk < 1 or self.knn_memory_size < 1):
            raise ValueError("attention: knn_top_k, knn_chunk and knn_memory_size must be >= 1")
        self._check_combinations()

    def _check_combinations(self):
        used = [name for name, on in (("window", self.window is not None), ("s2_group", self.s2_group is not None),
                                      ("knn_top_k", self.knn_top_k is not None)) if on]
        if len(used) > 1:
            raise ValueError(f"attention: {' and '.join(used)} cannot be combined; choose one long-context policy")
        position_dependent = self.positional == "rerope" or self.rope_scaling == "dynamic"
        if (self.sinks or self.s2_group is not None or self.knn_top_k is not None) and position_dependent:
            raise ValueError("attention: sinks, s2_group and knn_top_k work with positional 'rope' (static scalings), "
                             "'alibi' or 'none', not with ReRoPE or dynamic NTK")
        if self.knn_top_k is not None and self.positional == "alibi":
            raise ValueError("attention: knn_top_k ranks memory by q . k; use positional 'rope' or 'none'")
        if self.s2_group is not None and self.positional == "alibi":
            raise ValueError("attention: s2_group runs the fused grouped kernel without a bias; use positional "
                             "'rope' or 'none'")

    @property
    def heads(self) -> int:
        return self.n_heads if self.n_heads is not None else max(1, self.d_model // 64)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.heads

    @property
    def rope_scaling_dict(self) -> dict | None:
        """The scaling in the dict form of `rope_frequencies`."""
        if self.rope_scaling is None:
            return None
        fields = {"type": self.rope_scaling, "factor": self.rope_factor}
        if self.rope_scaling in ("dynamic", "yarn", "llama3"):
            fields["original_max_position"] = self.max_position
        if self.rope_scaling == "yarn":
            fields.update(beta_fast=self.yarn_beta_fast, beta_slow=self.yarn_beta_slow, mscale=self.yarn_mscale,
                          mscale_all_dim=self.yarn_mscale_all_dim, attention_factor=self.yarn_attention_factor)
        if self.rope_scaling == "llama3":
            fields.update(low_freq_factor=self.llama3_low_freq_factor, high_freq_factor=self.llama3_high_freq_factor)
        return fields

    @property
    def cached_entries_bound(self) -> int | None:
        """Most (key, value) entries the cache ever holds; None when it grows with the length."""
        if self.window is not None:
            return self.sinks + self.window - 1
        if self.knn_top_k is not None:
            return self.knn_chunk + self.knn_memory_size
        return None


@dataclass
class KVCache(MixerState):
    key: torch.Tensor  # (B, G, T, E); RoPE applied at the true positions, except for dynamic NTK and ReRoPE
    value: torch.Tensor  # (B, G, T, E)
    position: int  # tokens seen so far = absolute position of the next token


@dataclass
class MemoryKVCache(KVCache):
    """The kNN variant: `key`/`value` hold the current chunk, the memory the earlier ones."""

    memory_key: torch.Tensor  # (B, G, M, E), RoPE applied
    memory_value: torch.Tensor  # (B, G, M, E)


@register("attention", AttentionConfig)
class AttentionMixer(SequenceMixer):
    def __init__(self, config: AttentionConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        factory = {"device": device, "dtype": dtype}
        heads, kv_heads, head_dim = config.heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, heads * head_dim, bias=config.bias, **factory)
        self.kv_proj = nn.Linear(config.d_model, 2 * kv_heads * head_dim, bias=config.bias, **factory)
        self.out_proj = nn.Linear(heads * head_dim, config.d_model, bias=config.bias, **factory)
        self.out_proj._is_residual_projection = True  # scaled by 1/sqrt(depth) in the model init (GPT-2)
        inv_freq, slopes, self.attention_scale = None, None, 1.0
        if config.positional in ("rope", "rerope"):
            inv_freq, self.attention_scale = rope_frequencies(head_dim, config.rope_base, config.max_position,
                                                              config.rope_scaling_dict, device=device)
        if config.positional == "alibi":
            slopes = alibi_slopes(heads).to(device=device, dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (E/2,) or None
        self.register_buffer("slopes", slopes, persistent=False)  # (H,) or None
        # Dynamic NTK and ReRoPE rotate a key differently for different queries: cache it unrotated.
        self.rotate_cached_keys = config.positional == "rope" and config.rope_scaling != "dynamic"

    @property
    def state_grows_with_length(self) -> bool:
        return self.config.cached_entries_bound is None

    @property
    def _plain(self) -> bool:
        cfg = self.config
        return cfg.positional in ("rope", "none") and cfg.rope_scaling != "dynamic" and cfg.window is None

    # --- projections and rotations ------------------------------------------------------------
    def _project(self, x: torch.Tensor):
        """x (B, L, D) -> q (B, H, L, E), k, v (B, G, L, E), before RoPE."""
        cfg = self.config
        q = rearrange(self.q_proj(x), "b l (h e) -> b h l e", h=cfg.heads)
        k, v = rearrange(self.kv_proj(x), "b l (two g e) -> two b g l e", two=2, g=cfg.kv_heads)
        return q, k, v

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor):
        """RoPE of x (..., N, E) at `positions` (N,) (real allowed)."""
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        return apply_rope(x, cos, sin)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        groups = self.config.heads // self.config.kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    @property
    def _scale(self) -> float:
        return dot_scale(self.config.head_dim, self.attention_scale)

    # --- scores of the non-default variants ---------------------------------------------------
    def _dynamic_scores(self, q, k, q_pos, k_pos):
        """Dynamic NTK: query t uses the base of length t + 1 for itself and every key it sees."""
        inv_freq = dynamic_ntk_inv_freq(self.config.head_dim, self.config.rope_base, self.config.rope_factor,
                                        self.config.max_position, q_pos + 1)  # (Lb, E/2) float32
        inv_freq = inv_freq.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        if q_pos[-1] < self.config.max_position:  # all inside the trained length: one base
            return self._rotate(q, q_pos) @ self._rotate(k, k_pos).transpose(-1, -2)
        angles_q = q_pos[:, None] * inv_freq  # (Lb, E/2)
        q_rot = apply_rope(q, *(torch.cat([a, a], -1).to(q.dtype) for a in (angles_q.cos(), angles_q.sin())))
        angles_k = k_pos[None, :, None] * inv_freq[:, None, :]  # (Lb, Tb, E/2)
        cos_k, sin_k = (torch.cat([a, a], -1).to(q.dtype) for a in (angles_k.cos(), angles_k.sin()))
        k_rot = apply_rope(k[:, :, None], cos_k, sin_k)  # (B, H, Lb, Tb, E)
        return torch.einsum("bhle,bhlte->bhlt", q_rot, k_rot)

    def _scores(self, q, k, q_pos, k_pos):
        """Logits before the scale (B, H, Lb, Tb) of the two-pass RoPE variants (dynamic NTK, ReRoPE,
        RoPE with sinks): raw queries q against keys k as cached."""
        cfg = self.config
        if cfg.rope_scaling == "dynamic":
            return self._dynamic_scores(q, k, q_pos, k_pos)
        if cfg.positional == "rerope":
            near = self._rotate(q, q_pos) @ self._rotate(k, k_pos).transpose(-1, -2)
            q_far, k_far = rerope_angles(q_pos, k_pos, cfg.rerope_window, cfg.rerope_leak)
            far = self._rotate(q, q_far) @ self._rotate(k, k_far).transpose(-1, -2)
            return torch.where(key_distance(q_pos, k_pos) < cfg.rerope_window, near, far)
        scores = self._rotate(q, q_pos) @ k.transpose(-1, -2)
        # Sinks outside the window: second pass with the query at its slot in the cache.
        n_sinks = int((k_pos < cfg.sinks).sum())
        q_slot = self._rotate(q, sink_query_positions(q_pos, cfg.window, cfg.sinks))
        sink_scores = q_slot @ k[:, :, :n_sinks].transpose(-1, -2)
        outside = sink_only(q_pos, k_pos[:n_sinks], cfg.window, cfg.sinks)
        return torch.cat([torch.where(outside, sink_scores, scores[..., :n_sinks]), scores[..., n_sinks:]], -1)

    def _block_keys(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Indices of the keys a block of queries may see (sorted k_pos): sinks and the window."""
        cfg = self.config
        last = int(torch.searchsorted(k_pos, q_pos[-1], right=True))
        if cfg.window is None:
            return torch.arange(last, device=k_pos.device)
        first = int(torch.searchsorted(k_pos, q_pos[0] - cfg.window + 1))
        n_sinks = int((k_pos < cfg.sinks).sum())
        window_part = torch.arange(max(first, n_sinks), last, device=k_pos.device)
        return torch.cat([torch.arange(n_sinks, device=k_pos.device), window_part])

    def _block_size(self, batch: int, queries: int, keys: int) -> int:
        """Queries per block so that one block's scores stay near _SCORE_BLOCK_ELEMENTS: with a window a
        block of c queries reads c + w + s - 1 keys, otherwise up to all `keys`."""
        cfg = self.config
        budget = _SCORE_BLOCK_ELEMENTS // (batch * cfg.heads * (cfg.head_dim if cfg.rope_scaling == "dynamic" else 1))
        if cfg.window is None:
            return max(1, min(queries, budget // max(keys, 1)))
        seen = cfg.window + cfg.sinks
        # Blocks of about w queries read about 2w keys: close to the L * w floor, few Python iterations.
        fits = int((math.sqrt(seen * seen + 4 * budget) - seen) / 2)
        return max(1, min(queries, fits, max(64, cfg.window)))

    @property
    def _fused_blocks(self) -> bool:
        """One logit formula per block (no second RoPE pass): the fused kernel with a mask or bias."""
        cfg = self.config
        two_pass = cfg.positional == "rerope" or cfg.rope_scaling == "dynamic" or (
            cfg.positional == "rope" and cfg.sinks)
        return not two_pass

    def _attend_blocked(self, q, k, v, q_pos, k_pos) -> torch.Tensor:
        """Explicit softmax over blocks of queries; q (B, H, L, E) raw, k, v (B, G, T, E) as cached."""
        cfg = self.config
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        block = self._block_size(q.shape[0], q.shape[2], k.shape[2])
        outputs = []
        for start in range(0, q.shape[2], block):
            rows = slice(start, start + block)
            index = self._block_keys(q_pos[rows], k_pos)
            kb_pos = k_pos[index]
            allowed = attention_mask(q_pos[rows], kb_pos, cfg.window, cfg.sinks)  # (Lb, Tb)
            bias = None
            if cfg.positional == "alibi":
                distance = key_distance(q_pos[rows], kb_pos, cfg.window, cfg.sinks)
                bias = alibi_bias(self.slopes, distance).to(q.dtype)  # (H, Lb, Tb)
            if self._fused_blocks:
                q_block = self._rotate(q[:, :, rows], q_pos[rows]) if cfg.positional == "rope" else q[:, :, rows]
                mask = allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))
                outputs.append(F.scaled_dot_product_attention(q_block, k[:, :, index], v[:, :, index],
                                                              attn_mask=mask, scale=self._scale))
                continue
            scores = self._scores(q[:, :, rows], k[:, :, index], q_pos[rows], kb_pos) * self._scale
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            outputs.append(weights @ v[:, :, index])
        return torch.cat(outputs, dim=2)

    def _attend_plain(self, q, k, v, query_start: int) -> torch.Tensor:
        """RoPE (static) or NoPE over the whole cache with the fused kernel; k rotated, q raw."""
        seqlen, total = q.shape[2], k.shape[2]
        q_pos = torch.arange(query_start, query_start + seqlen, device=q.device)
        if self.inv_freq is not None:
            q = self._rotate(q, q_pos)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        if query_start == 0 and seqlen == total:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale)
        if seqlen == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=self._scale)
        mask = attention_mask(q_pos, torch.arange(total, device=q.device))  # (L, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self._scale)

    # --- the contract -------------------------------------------------------------------------------
    def _cache_positions(self, state: KVCache, device) -> torch.Tensor:
        return retained_positions(state.position, self.config.window, self.config.sinks, device)

    def _run(self, x: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Attend x (B, L, D) at positions state.position.. to the cache and itself; the new cache."""
        cfg = self.config
        if cfg.knn_top_k is not None:
            return self._run_knn(x, state)
        q, k, v = self._project(x)
        q_pos = torch.arange(state.position, state.position + x.shape[1], device=x.device)
        if self.rotate_cached_keys:
            k = self._rotate(k, q_pos)
        key = torch.cat([state.key, k.to(state.key.dtype)], dim=2)
        value = torch.cat([state.value, v.to(state.value.dtype)], dim=2)
        if self._plain:
            out = self._attend_plain(q, key.to(q.dtype), value.to(q.dtype), state.position)
        else:
            k_pos = torch.cat([self._cache_positions(state, x.device), q_pos])
            out = self._attend_blocked(q, key.to(q.dtype), value.to(q.dtype), q_pos, k_pos)
            keep = (k_pos < cfg.sinks) | (k_pos > q_pos[-1] + 1 - cfg.window) if cfg.window else slice(None)
            key, value = key[:, :, keep], value[:, :, keep]
        y = self.out_proj(rearrange(out, "b h l e -> b l (h e)"))
        return y, KVCache(key=key, value=value, position=state.position + x.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "attention.forward")
        if self.training and self.config.s2_group is not None:
            q, k, v = self._project(x)
            positions = torch.arange(x.shape[1], device=x.device)
            if self.inv_freq is not None:
                q, k = self._rotate(q, positions), self._rotate(k, positions)
            out = s2_attention(q, self._repeat_kv(k), self._repeat_kv(v), self.config.s2_group, self._scale)
            return self.out_proj(rearrange(out, "b h l e -> b l (h e)"))
        return self._run(x, self.init_state(x.shape[0], device=x.device, dtype=x.dtype))[0]

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        cfg = self.config
        empty = torch.zeros(batch_size, cfg.kv_heads, 0, cfg.head_dim, **self.state_factory(device, dtype))
        if cfg.knn_top_k is not None:
            return MemoryKVCache(key=empty, value=empty.clone(), position=0, memory_key=empty.clone(),
                                 memory_value=empty.clone())
        return KVCache(key=empty, value=empty.clone(), position=0)

    def prefill(self, x: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        check_input(x, self.d_model, 3, "attention.prefill")
        check_state(state, MemoryKVCache if self.config.knn_top_k is not None else KVCache, x.shape[0],
                    "attention.prefill")
        return self._run(x, state)

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        check_input(x_t, self.d_model, 2, "attention.step")
        check_state(state, MemoryKVCache if self.config.knn_top_k is not None else KVCache, x_t.shape[0],
                    "attention.step")
        y, state = self._run(x_t.unsqueeze(1), state)
        return y.squeeze(1), state

    def cached_entries(self, seq_len: int) -> int:
        """(key, value) entries held after `seq_len` tokens."""
        cfg = self.config
        if cfg.window is not None:
            return min(seq_len, cfg.sinks + cfg.window - 1)
        if cfg.knn_top_k is not None:
            done = seq_len // cfg.knn_chunk * cfg.knn_chunk
            return seq_len - done + min(done, cfg.knn_memory_size)
        return seq_len

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = element_size(dtype)
        return 2 * batch_size * cfg.kv_heads * self.cached_entries(seq_len) * cfg.head_dim * element

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): q k^T and the weighted sum
        of values over the L keys, 4 L H E (full attention at context L, as the accounting reports it)."""
        return 4 * seq_len * self.config.heads * self.config.head_dim

    # --- kNN memory ------------------------------------------------------------------------------------
    def _run_knn(self, x: torch.Tensor, state: MemoryKVCache) -> tuple[torch.Tensor, MemoryKVCache]:
        """Pieces of x up to each chunk boundary: local causal attention inside the chunk plus the top-k
        of the memory; a completed chunk moves into the memory (the oldest entries beyond M drop)."""
        cfg = self.config
        q, k, v = self._project(x)
        positions = torch.arange(state.position, state.position + x.shape[1], device=x.device)
        if self.inv_freq is not None:
            q, k = self._rotate(q, positions), self._rotate(k, positions)
        local_k, local_v = state.key, state.value
        memory_k, memory_v = state.memory_key, state.memory_value
        outputs, start, position = [], 0, state.position
        while start < x.shape[1]:
            stop = min(x.shape[1], start + cfg.knn_chunk - position % cfg.knn_chunk)
            local_k = torch.cat([local_k, k[:, :, start:stop].to(local_k.dtype)], dim=2)
            local_v = torch.cat([local_v, v[:, :, start:stop].to(local_v.dtype)], dim=2)
            local_pos = torch.arange(position - (local_k.shape[2] - (stop - start)), position + stop - start,
                                     device=x.device)
            allowed = attention_mask(positions[start:stop], local_pos)
            kv = [self._repeat_kv(t.to(q.dtype)) for t in (local_k, local_v, memory_k, memory_v)]
            outputs.append(knn_attention(q[:, :, start:stop], kv[0], kv[1], allowed, kv[2], kv[3], cfg.knn_top_k,
                                         self._scale))
            position += stop - start
            start = stop
            if position % cfg.knn_chunk == 0:
                memory_k = torch.cat([memory_k, local_k], dim=2)[:, :, -cfg.knn_memory_size:]
                memory_v = torch.cat([memory_v, local_v], dim=2)[:, :, -cfg.knn_memory_size:]
                local_k, local_v = local_k[:, :, :0], local_v[:, :, :0]
        y = self.out_proj(rearrange(torch.cat(outputs, dim=2), "b h l e -> b l (h e)"))
        return y, MemoryKVCache(key=local_k, value=local_v, position=position, memory_key=memory_k,
                                memory_value=memory_v)

    # --- reference -------------------------------------------------------------------------------------
    def forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        """Every variant by its definition, one query at a time (slow; for tests).

        For query t: the keys it sees (causal, window, sinks; for kNN the chunk so far plus the top-k of
        the memory by q . k); the distance of each key as the positional encoding sees it (StreamingLLM:
        cache slots; ReRoPE: clipped / compressed); RoPE applied as a rotation of q by that distance
        (with dynamic NTK's base for length t + 1); ALiBi as -slope * distance; one softmax.
        """
        cfg = self.config
        q, k, v = self._project(x)
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        length = x.shape[1]
        positions = torch.arange(length, device=x.device)
        outputs = []
        for t in range(length):
            if cfg.knn_top_k is not None:
                chunk_start = t // cfg.knn_chunk * cfg.knn_chunk
                local = torch.arange(chunk_start, t + 1, device=x.device)
                memory = torch.arange(max(0, chunk_start - cfg.knn_memory_size), chunk_start, device=x.device)
                keys = self._retrieve_ref(q[:, :, t], k, t, local, memory)
            else:
                seen = positions[: t + 1]
                if cfg.window is not None:
                    seen = seen[(seen > t - cfg.window) | (seen < cfg.sinks)]
                keys = seen.expand(q.shape[0], q.shape[1], -1)  # (B, H, n)
            if cfg.sinks:
                distance = torch.arange(keys.shape[-1] - 1, -1, -1, device=x.device).expand_as(keys)  # cache slots
            else:
                distance = t - keys
            k_seen = torch.gather(k, 2, keys[..., None].expand(-1, -1, -1, cfg.head_dim))  # (B, H, n, E)
            v_seen = torch.gather(v, 2, keys[..., None].expand(-1, -1, -1, cfg.head_dim))
            logits = self._logits_ref(q[:, :, t], k_seen, distance, t)
            outputs.append(torch.einsum("bhn,bhne->bhe", logits.softmax(-1), v_seen))
        out = torch.stack(outputs, dim=2)
        return self.out_proj(rearrange(out, "b h l e -> b l (h e)"))

    def _logits_ref(self, q_t, k_seen, distance, t: int):
        """q_t (B, H, E), k_seen (B, H, n, E) raw, distance (B, H, n) -> scaled logits (B, H, n)."""
        cfg = self.config
        if cfg.positional in ("rope", "rerope"):
            inv_freq = self.inv_freq
            if cfg.rope_scaling == "dynamic":
                inv_freq = dynamic_ntk_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_factor, cfg.max_position,
                                                torch.tensor([t + 1]))[0].to(q_t.device)
            if cfg.positional == "rerope":
                distance = rerope_distance(distance, cfg.rerope_window, cfg.rerope_leak)
            cos, sin = rope_cos_sin(distance, inv_freq, q_t.dtype)  # (B, H, n, E)
            q_rotated = apply_rope(q_t[:, :, None], cos, sin)  # rotating q by the distance, k by 0
            return (q_rotated * k_seen).sum(-1) * self._scale
        logits = (q_t[:, :, None] * k_seen).sum(-1) * self._scale
        if cfg.positional == "alibi":
            logits = logits - self.slopes[:, None].to(logits.dtype) * distance
        return logits

    def _retrieve_ref(self, q_t, k, t: int, local: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Key positions (B, H, n) for kNN query t: the local ones, then the top-k memory entries by
        the RoPE score of distance t - s."""
        batch, heads = q_t.shape[:2]
        local = local.expand(batch, heads, -1)
        if len(memory) == 0:
            return local
        distance = (t - memory).expand(batch, heads, -1)
        k_memory = k[:, :, memory]
        scores = self._logits_ref(q_t, k_memory, distance, t)
        top = scores.topk(min(self.config.knn_top_k, len(memory)), dim=-1).indices
        return torch.cat([local, memory[top]], dim=-1)


Attention = AttentionMixer  # the class's earlier name, kept as an alias for one release
