"""Causal multi-head self-attention with positional variants, long-context policies and a KV cache.

Legend: B batch, L new tokens, T keys (cached + new), D model width, H query heads,
G key/value heads (H % G == 0), E head dim, C kNN chunk, M memory entries.

Default: q, k, v projections, RoPE at positions 0..L-1, `F.scaled_dot_product_attention` with a
causal mask (Vaswani et al., 2017; RoPE: Su et al., 2021; GQA: Ainslie et al., 2023, the cache
holding only the G key/value heads). Variants, all in this one class, chosen by the config:

- positions: RoPE with the linear / ntk / dynamic / yarn / llama3 scalings, ReRoPE and Leaky ReRoPE
  (two score passes), ALiBi, or none (seqarch/positional.py has the formulas);
- sliding window of w keys with a rolling cache of w - 1 entries; attention sinks (StreamingLLM)
  on top of it, with the sink distances taken inside the cache;
- S2-Attn (LongLoRA) in training mode; full attention in eval mode and for prefill / step;
- kNN memory (Memorizing / Focused Transformer): chunk-local attention plus the top-k of a memory
  of earlier chunks, in one softmax.

The module projects, rotates and keeps the cache; the attention itself is seqarch.ops.attention's
`attention` (fused, blocked or per-query reference, `backend=`), `s2_attention` or `knn_attention`,
and `forward_ref` runs the op's per-query reference `attention_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from einops import rearrange
from torch import nn

from seqarch.mixers.base import MixerState, SequenceMixer, check_input, check_positive, check_state, element_size
from seqarch.ops.attention import (
    BACKENDS,
    SCORE_BLOCK_ELEMENTS,
    Backend,
    DynamicNTK,
    KnnMemory,
    LogitPositions,
    attention,
    attention_mask,
    attention_ref,
    block_size,
    describe_backend,
    dot_scale,
    knn_attention,
    repeat_kv,
    retained_positions,
    rotate,
    s2_attention,
)
from seqarch.positional import ROPE_SCALING_TYPES, RopeScaling, alibi_slopes, rope_frequencies
from seqarch.registry import register

Positional = Literal["rope", "rerope", "alibi", "none"]
POSITIONAL: tuple[str, ...] = get_args(Positional)
# Elements of one block of explicit scores on the blocked path; read at each call (tests shrink it).
_SCORE_BLOCK_ELEMENTS = SCORE_BLOCK_ELEMENTS


@dataclass(frozen=True)
class AttentionConfig:
    # Heads and widths
    d_model: int = 256
    n_heads: int | None = None  # query heads; None: d_model // 64, at least 1
    n_kv_heads: int | None = None  # key/value heads (GQA); None: n_heads (plain MHA); 1: MQA
    head_dim: int | None = None  # E, width of each head; None: d_model // n_heads (Mistral-Nemo-like models differ)
    bias: bool = False  # biases in the q/k/v/o projections

    # Positions: RoPE and its scalings, ReRoPE, ALiBi or none (sinusoidal lives at the embedding)
    positional: Positional = "rope"  # "rope", "rerope", "alibi" or "none" (NoPE)
    rope_base: float = 10000.0  # RoPE base θ; frequencies θ^(-2i/E)
    max_position: int = 2048  # context length trained for: the scalings' original length, ReRoPE's default
    rope_scaling: RopeScaling | None = None  # None, "linear" (PI), "ntk", "dynamic" (dynamic NTK), "yarn", "llama3"
    rope_factor: float = 1.0  # scaling factor s = target length / trained length
    dynamic_ntk_mode: Literal["exact", "per_call"] = "exact"  # rope_scaling "dynamic" only: base(t + 1) per query,
    # or one base per call from its length (HF's dynamic_rope_update; docs/long-context.md)
    yarn_beta_fast: float = 32.0  # YaRN: dimensions rotating more than this often in max_position extrapolate
    yarn_beta_slow: float = 1.0  # YaRN: dimensions rotating less than this often interpolate
    yarn_mscale: float = 1.0  # YaRN (DeepSeek form, with yarn_mscale_all_dim): numerator 0.1 * mscale * ln(s) + 1
    yarn_mscale_all_dim: float = 0.0  # YaRN (DeepSeek form): denominator's mscale; 0: off, factor 0.1 ln(s) + 1 (HF)
    yarn_attention_factor: float | None = None  # YaRN: explicit factor on q and k (HF's attention_factor); None: infer
    llama3_low_freq_factor: float = 1.0  # llama3: wavelengths above max_position / this are divided by rope_factor
    llama3_high_freq_factor: float = 4.0  # llama3: wavelengths below max_position / this are kept
    rerope_window: int = 512  # ReRoPE: relative distances from this on are clipped / compressed
    rerope_leak: float = 0.0  # Leaky ReRoPE slope 1/k beyond the window; 0: ReRoPE (clip)

    # Masks: sliding window, attention sinks, S2-Attn (one long-context policy at a time)
    window: int | None = None  # sliding window: each query sees its `window` most recent keys; None: all
    sinks: int = 0  # StreamingLLM attention sinks: the first `sinks` tokens stay visible (needs a window)
    s2_group: int | None = None  # LongLoRA S2-Attn group size (even) in training mode; None: off

    # Memory: kNN retrieval from earlier chunks
    knn_top_k: int | None = None  # kNN memory: entries retrieved per query; None: no memory
    knn_chunk: int = 512  # kNN memory: local attention runs inside chunks of this many tokens
    knn_memory_size: int = 8192  # kNN memory: most recent (key, value) pairs of earlier chunks kept

    # Backend
    backend: Backend = "auto"  # seqarch.ops.attention.resolve_backend: "fused", "blocked", "sequential"; kNN: "auto"

    @classmethod
    def invalid_value_hint(cls, key: str, value) -> str:
        """A pointer added to make_config's message for a value outside a field's choices."""
        if key == "positional" and value == "sinusoidal":
            return "sinusoidal positions are absolute: add them at the embedding (SeqLM position_embedding)"
        if key == "rope_scaling":
            return f"rope_scaling={value!r} is not a scaling seqarch implements"
        return ""

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
        if self.dynamic_ntk_mode not in ("exact", "per_call"):
            raise ValueError(f"attention: dynamic_ntk_mode={self.dynamic_ntk_mode!r}; valid: 'exact', 'per_call'")
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
        if self.backend not in BACKENDS:
            raise ValueError(f"attention: backend={self.backend!r}; valid: {BACKENDS}")
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
        if self.knn_top_k is not None and self.backend != "auto":
            raise ValueError(f"attention: knn_top_k runs its own retrieval path; backend must be 'auto', "
                             f"got {self.backend!r}")
        per_query_base = self.rope_scaling == "dynamic" and self.dynamic_ntk_mode == "exact"
        one_formula = self.positional in ("rope", "none") and not per_query_base and self.window is None
        if self.backend == "fused" and not one_formula:
            raise ValueError("attention: backend='fused' needs positional 'rope' (static scalings) or 'none' and no "
                             "window; use 'blocked' or 'auto'")
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
        ntk = None
        if config.rope_scaling == "dynamic":
            ntk = DynamicNTK(head_dim, config.rope_base, config.rope_factor, config.max_position)
        self.dynamic = ntk if config.dynamic_ntk_mode == "exact" else None  # a base per query
        self.dynamic_per_call = ntk if config.dynamic_ntk_mode == "per_call" else None  # one base per call
        # Dynamic NTK and ReRoPE rotate a key differently for different queries (exact) or calls
        # (per call): cache it unrotated.
        self.rotate_cached_keys = config.positional == "rope" and ntk is None

    @property
    def positions(self) -> LogitPositions:
        """How a logit depends on the positions, for seqarch.ops.attention (buffers follow .to())."""
        cfg = self.config
        return LogitPositions(cfg.positional, self.inv_freq, self.slopes, self.dynamic, cfg.rerope_window,
                              cfg.rerope_leak)

    def _call_positions(self, length: int) -> LogitPositions:
        """`positions` for a call ending at sequence length `length`: per-call dynamic NTK (HF's
        `dynamic_rope_update`) takes the base of that length for every query and key of the call."""
        if self.dynamic_per_call is None:
            return self.positions
        inv_freq = self.dynamic_per_call.inv_freq(torch.tensor([length]))[0].to(self.inv_freq.device)
        return replace(self.positions, inv_freq=inv_freq)

    @property
    def state_grows_with_length(self) -> bool:
        return self.config.cached_entries_bound is None

    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        cfg = self.config
        if cfg.knn_top_k is not None:
            return "kNN memory attention (chunk-local keys + top-k of the memory); same path for decoding"
        return f"attention {describe_backend(cfg.backend, device, self._call_positions(1), cfg.window)}; KV-cache step"

    # --- projections and rotations ------------------------------------------------------------
    def _project(self, x: torch.Tensor):
        """x (B, L, D) -> q (B, H, L, E), k, v (B, G, L, E), before RoPE."""
        cfg = self.config
        q = rearrange(self.q_proj(x), "b l (h e) -> b h l e", h=cfg.heads)
        k, v = rearrange(self.kv_proj(x), "b l (two g e) -> two b g l e", two=2, g=cfg.kv_heads)
        return q, k, v

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor):
        """RoPE of x (..., N, E) at `positions` (N,) (real allowed)."""
        return rotate(x, positions, self.inv_freq)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        return repeat_kv(t, self.config.heads)

    @property
    def _scale(self) -> float:
        return dot_scale(self.config.head_dim, self.attention_scale)

    def _block_size(self, batch: int, queries: int, keys: int) -> int:
        """Queries per block of the blocked path (seqarch.ops.attention.block_size)."""
        cfg = self.config
        return block_size(batch, cfg.heads, cfg.head_dim, queries, keys, cfg.window, cfg.sinks,
                          self.dynamic is not None, _SCORE_BLOCK_ELEMENTS)

    # --- the contract -------------------------------------------------------------------------------
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
        k_pos = torch.cat([retained_positions(state.position, cfg.window, cfg.sinks, x.device), q_pos])
        positions = self._call_positions(state.position + x.shape[1])
        keys = key.to(q.dtype)
        if self.dynamic_per_call is not None:  # the raw cache rotated with this call's base
            keys = rotate(keys, k_pos, positions.inv_freq)
        out = attention(q, keys, value.to(q.dtype), q_pos, k_pos, positions, self._scale, cfg.window, cfg.sinks,
                        cfg.backend, _SCORE_BLOCK_ELEMENTS)
        if cfg.window is not None:
            keep = (k_pos < cfg.sinks) | (k_pos > q_pos[-1] + 1 - cfg.window)
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
        """Every variant by its definition, one query at a time (seqarch.ops.attention.attention_ref; slow,
        for tests)."""
        cfg = self.config
        q, k, v = self._project(x)
        positions = torch.arange(x.shape[1], device=x.device)
        knn = None if cfg.knn_top_k is None else KnnMemory(cfg.knn_top_k, cfg.knn_chunk, cfg.knn_memory_size)
        out = attention_ref(q, self._repeat_kv(k), self._repeat_kv(v), positions, positions,
                            self._call_positions(x.shape[1]),
                            self._scale, cfg.window, cfg.sinks, knn)
        return self.out_proj(rearrange(out, "b h l e -> b l (h e)"))


Attention = AttentionMixer  # the class's earlier name, kept as an alias for one release
