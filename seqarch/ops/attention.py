"""Causal softmax attention with position-dependent logits, and the long-context helpers around it:
masks, windows, sinks, ALiBi bias, two-pass RoPE scores, S2-Attn, kNN retrieval.

Legend: B batch, H query heads, G key/value heads, L queries, T keys, E head dim, Lb / Tb queries /
keys of one block, S2 group size (`group`), M memory entries, K retrieved entries per query.

`attention(q, k, v, q_pos, k_pos, positions, scale, window, sinks, backend=)` is the entry point; how
the logit of query t and key s depends on their positions is a `LogitPositions` (RoPE with a static
or a dynamic-NTK base, ReRoPE, ALiBi or none). `backend=` (`resolve_backend`) picks the path:

- "fused": one `F.scaled_dot_product_attention` over all keys with a causal mask; only where one
  logit formula serves every (query, key) pair: static RoPE or none, no window.
- "blocked": blocks of queries, each reading only the keys it may see, so a window of w keys and s
  sinks costs O(L (w + s)) instead of O(L T). Where one logit formula serves a block (static RoPE,
  ALiBi, none) the block runs the fused kernel with a mask or an ALiBi bias; RoPE with sinks, ReRoPE
  and dynamic NTK need explicit scores in two passes (`two_pass_scores`).
- "sequential": `attention_ref`, one query at a time by the definition (slow; for tests).
- "auto": "fused" where it applies, else "blocked".

Positions are absolute token indices. A query at position t may see key s when s <= t and

- sliding window w (Mistral; Beltagy et al., 2020): t - s < w, i.e. the w most recent keys, itself included;
- attention sinks s0 (Xiao et al., 2023, "StreamingLLM", sec. 3.2): also every s < s0, whatever t.

StreamingLLM assigns positions inside the cache: with the cache full (t >= s0 + w - 1) the query sits at
slot s0 + w - 1, so a sink key s that left the window is at distance min(t, s0 + w - 1) - s, while keys
in the window keep their true distance t - s (`key_distance`).

Dynamic NTK (exact form): query t uses the RoPE base of length t + 1 for itself and every key it
sees, so its keys are rotated per query (O(Lb Tb E) elementwise work per block instead of a matmul).

S2-Attn (Chen et al., 2023, "LongLoRA", sec. 3.2) splits the sequence into groups of G tokens and
attends inside each group; the second half of the heads uses groups shifted by G/2. LongLoRA rolls
the shifted heads' tokens, which wraps the last group around to the first tokens and lets them see
the end of the sequence; for a causal model we shift without wrapping: the shifted heads' first group
is tokens [0, G/2) and the others are [G/2 + nG, G/2 + (n + 1)G).

kNN memory attention (Wu et al., 2022, "Memorizing Transformers"; Tworkowski et al., 2023, "Focused
Transformer"): each query also attends to the top-K (key, value) pairs of a memory of earlier chunks,
ranked by q . k, in the same softmax as its local keys (the Focused Transformer's merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange

from seqarch.backends import check_backend
from seqarch.positional import apply_rope, dynamic_ntk_inv_freq, rerope_angles, rerope_distance, rope_cos_sin

Backend = Literal["auto", "fused", "blocked", "sequential"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# Elements of one block of explicit scores (B * H * queries * keys); bounds the blocked path's memory.
SCORE_BLOCK_ELEMENTS = 1 << 22


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None = None,
                   sinks: int = 0) -> torch.Tensor:
    """Boolean (L, T): query at query_positions[i] may see the key at key_positions[j]."""
    distance = query_positions[:, None] - key_positions[None, :]  # (L, T)
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & ((distance < window) | (key_positions[None, :] < sinks))
    return allowed


def sink_only(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None,
              sinks: int) -> torch.Tensor:
    """Boolean (L, T): the key is a sink the query sees outside its window."""
    if window is None or sinks == 0:
        return torch.zeros(len(query_positions), len(key_positions), dtype=torch.bool,
                           device=query_positions.device)
    distance = query_positions[:, None] - key_positions[None, :]
    return (key_positions[None, :] < sinks) & (distance >= window)


def sink_query_positions(query_positions: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """The query's slot in a StreamingLLM cache of sinks + window entries: min(t, s0 + w - 1)."""
    return query_positions.clamp(max=sinks + window - 1)


def key_distance(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None = None,
                 sinks: int = 0) -> torch.Tensor:
    """Distance (L, T) the positional encoding sees: t - s, or min(t, s0 + w - 1) - s for a sink key
    outside the window (StreamingLLM's positions inside the cache)."""
    distance = query_positions[:, None] - key_positions[None, :]
    if window is None or sinks == 0:
        return distance
    in_cache = sink_query_positions(query_positions, window, sinks)[:, None] - key_positions[None, :]
    return torch.where(sink_only(query_positions, key_positions, window, sinks), in_cache, distance)


def retained_positions(position: int, window: int | None, sinks: int, device=None) -> torch.Tensor:
    """Positions a cache keeps after `position` tokens: all of them, or the s0 sinks and the w - 1
    most recent (all the next query needs)."""
    if window is None:
        return torch.arange(position, device=device)
    recent_start = max(min(sinks, position), position - window + 1)
    return torch.cat([torch.arange(min(sinks, position), device=device),
                      torch.arange(recent_start, position, device=device)])


def alibi_bias(slopes: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """ALiBi's additive logit bias (H, L, T) = -slope_h * distance."""
    return -slopes[:, None, None] * distance.to(slopes.dtype)


def softmax_attention(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax over the allowed keys of scores (..., L, T), applied to v (..., T, E)."""
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def s2_group_ids(length: int, n_heads: int, group: int, device=None) -> torch.Tensor:
    """Group index (H, L) of each token per head: t // G for the first H/2 heads, (t + G/2) // G for
    the shifted second half."""
    positions = torch.arange(length, device=device)
    plain, shifted = positions // group, (positions + group // 2) // group
    half = n_heads // 2
    return torch.cat([plain.expand(n_heads - half, length), shifted.expand(half, length)])


def s2_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float) -> torch.Tensor:
    """S2-Attn by its definition: causal attention restricted to same-group keys per head (LongLoRA
    sec. 3.2, without wrap-around). q, k, v (B, H, L, E) -> (B, H, L, E)."""
    length, heads = q.shape[2], q.shape[1]
    groups = s2_group_ids(length, heads, group, q.device)  # (H, L)
    allowed = (groups[:, :, None] == groups[:, None, :]) & attention_mask(
        torch.arange(length, device=q.device), torch.arange(length, device=q.device))
    return softmax_attention(q @ k.transpose(-1, -2) * scale, allowed, v)


def _grouped_causal(q, k, v, group: int, scale: float) -> torch.Tensor:
    """Causal attention inside consecutive groups of `group` tokens (last group may be short)."""
    length = q.shape[2]
    pad = -length % group
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # padding at the end is never seen causally
    grouped = (rearrange(t, "b h (n g) e -> (b n) h g e", g=group) for t in (q, k, v))
    out = F.scaled_dot_product_attention(*grouped, is_causal=True, scale=scale)
    return rearrange(out, "(b n) h g e -> b h (n g) e", n=(length + pad) // group)[:, :, :length]


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float) -> torch.Tensor:
    """S2-Attn as batched per-group attention; q, k, v (B, H, L, E) -> (B, H, L, E). Cost O(L G E)."""
    half = q.shape[1] // 2
    split = q.shape[1] - half
    plain = _grouped_causal(q[:, :split], k[:, :split], v[:, :split], group, scale)
    shift = min(group // 2, q.shape[2])
    head = [t[:, split:, :shift] for t in (q, k, v)]
    tail = [t[:, split:, shift:] for t in (q, k, v)]
    shifted = [F.scaled_dot_product_attention(*head, is_causal=True, scale=scale)]
    if tail[0].shape[2]:
        shifted.append(_grouped_causal(*tail, group, scale))
    return torch.cat([plain, torch.cat(shifted, dim=2)], dim=1)


def knn_attention(q: torch.Tensor, local_k: torch.Tensor, local_v: torch.Tensor, local_allowed: torch.Tensor,
                  memory_k: torch.Tensor, memory_v: torch.Tensor, top_k: int, scale: float) -> torch.Tensor:
    """Local attention merged with the top-k memory entries per query, one softmax.

    q (B, H, L, E); local_k, local_v (B, H, T, E) with local_allowed (L, T); memory_k, memory_v
    (B, H, M, E). Each query keeps the min(top_k, M) memory entries of largest q . k.
    """
    local_scores = (q @ local_k.transpose(-1, -2) * scale).masked_fill(~local_allowed, float("-inf"))
    retrieved = min(top_k, memory_k.shape[2])
    if retrieved == 0:
        return local_scores.softmax(dim=-1) @ local_v
    memory_scores = q @ memory_k.transpose(-1, -2) * scale  # (B, H, L, M)
    top_scores, top_index = memory_scores.topk(retrieved, dim=-1)  # (B, H, L, K)
    weights = torch.cat([local_scores, top_scores], dim=-1).softmax(dim=-1)
    local_weights, top_weights = weights.split([local_k.shape[2], retrieved], dim=-1)
    memory_weights = torch.zeros_like(memory_scores).scatter(-1, top_index, top_weights)  # (B, H, L, M)
    return local_weights @ local_v + memory_weights @ memory_v


def knn_attention_ref(q: torch.Tensor, local_k: torch.Tensor, local_v: torch.Tensor, local_allowed: torch.Tensor,
                      memory_k: torch.Tensor, memory_v: torch.Tensor, top_k: int, scale: float) -> torch.Tensor:
    """`knn_attention` one query at a time: rank the memory, keep the top k, softmax over the local
    keys and the kept entries."""
    batch, heads, length, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                query = q[b, h, i]
                local = local_allowed[i].nonzero().flatten()
                keys, values = local_k[b, h, local], local_v[b, h, local]
                if memory_k.shape[2]:
                    ranked = (memory_k[b, h] @ query).argsort(descending=True)[:top_k]
                    keys = torch.cat([keys, memory_k[b, h, ranked]])
                    values = torch.cat([values, memory_v[b, h, ranked]])
                out[b, h, i] = torch.softmax(keys @ query * scale, dim=0) @ values
    return out


def dot_scale(head_dim: int, attention_scale: float = 1.0) -> float:
    """Logit scale: attention_scale multiplies queries and keys (YaRN's sqrt(1/t)), so the logits
    get its square, over sqrt(E)."""
    return attention_scale**2 / math.sqrt(head_dim)


# --- position-dependent logits ------------------------------------------------------------------------
@dataclass(frozen=True)
class DynamicNTK:
    """Dynamic NTK's base as a function of the sequence length (seqarch.positional.dynamic_ntk_inv_freq)."""

    head_dim: int
    base: float
    factor: float
    original_max_position: int

    def inv_freq(self, lengths: torch.Tensor) -> torch.Tensor:
        """(N, E/2) float32, one row per length in `lengths` (N,)."""
        return dynamic_ntk_inv_freq(self.head_dim, self.base, self.factor, self.original_max_position, lengths)


@dataclass(frozen=True, eq=False)
class LogitPositions:
    """How the logit of a query at t and a key at s depends on t and s.

    kind "rope": rotations by `inv_freq` (E/2,), or with `dynamic` set, by the dynamic-NTK base of
    length t + 1 for query t (exact dynamic NTK); "rerope": RoPE inside `rerope_window`, beyond it the
    clipped (leak 0) or compressed distance; "alibi": -slopes[h] * distance added to the logits;
    "none": no positions (NoPE).
    """

    kind: Literal["rope", "rerope", "alibi", "none"] = "none"
    inv_freq: torch.Tensor | None = None  # (E/2,) RoPE / ReRoPE inverse frequencies
    slopes: torch.Tensor | None = None  # (H,) ALiBi head slopes
    dynamic: DynamicNTK | None = None  # exact dynamic NTK: a base per query
    rerope_window: int = 512  # ReRoPE: distances from this on are clipped / compressed
    rerope_leak: float = 0.0  # Leaky ReRoPE slope beyond the window; 0: clip

    @property
    def keys_rotated(self) -> bool:
        """Whether keys arrive rotated at their own positions (static RoPE, as a KV cache holds them);
        otherwise raw, since dynamic NTK and ReRoPE rotate one key differently for different queries."""
        return self.kind == "rope" and self.dynamic is None

    @property
    def single_formula(self) -> bool:
        """One logit formula for every (query, key) pair without a window: what the fused kernel needs."""
        return self.kind in ("rope", "none") and self.dynamic is None


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of x (..., N, E) at `positions` (N,) (real allowed)."""
    cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)
    return apply_rope(x, cos, sin)


def repeat_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, G, T, E) -> (B, H, T, E): each key/value head serves H / G query heads (GQA)."""
    groups = n_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def dynamic_scores(q, k, q_pos, k_pos, positions: LogitPositions) -> torch.Tensor:
    """Dynamic NTK logits before the scale (B, H, Lb, Tb): query t uses the base of length t + 1 for
    itself and every key it sees; q (B, H, Lb, E), k (B, H, Tb, E) raw."""
    dynamic = positions.dynamic
    if q_pos[-1] < dynamic.original_max_position:  # all inside the trained length: one base
        inv_freq = positions.inv_freq
        return rotate(q, q_pos, inv_freq) @ rotate(k, k_pos, inv_freq).transpose(-1, -2)
    inv_freq = dynamic.inv_freq(q_pos + 1)  # (Lb, E/2) float32
    inv_freq = inv_freq.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    angles_q = q_pos[:, None] * inv_freq  # (Lb, E/2)
    q_rot = apply_rope(q, *(torch.cat([a, a], -1).to(q.dtype) for a in (angles_q.cos(), angles_q.sin())))
    angles_k = k_pos[None, :, None] * inv_freq[:, None, :]  # (Lb, Tb, E/2)
    cos_k, sin_k = (torch.cat([a, a], -1).to(q.dtype) for a in (angles_k.cos(), angles_k.sin()))
    k_rot = apply_rope(k[:, :, None], cos_k, sin_k)  # (B, H, Lb, Tb, E)
    return torch.einsum("bhle,bhlte->bhlt", q_rot, k_rot)


def two_pass_scores(q, k, q_pos, k_pos, positions: LogitPositions, window: int | None = None,
                    sinks: int = 0) -> torch.Tensor:
    """Logits before the scale (B, H, Lb, Tb) of the RoPE variants one rotation cannot serve (dynamic NTK,
    ReRoPE, RoPE with sinks): raw queries q against keys k as a cache holds them (`keys_rotated`)."""
    if positions.dynamic is not None:
        return dynamic_scores(q, k, q_pos, k_pos, positions)
    inv_freq = positions.inv_freq
    if positions.kind == "rerope":
        near = rotate(q, q_pos, inv_freq) @ rotate(k, k_pos, inv_freq).transpose(-1, -2)
        q_far, k_far = rerope_angles(q_pos, k_pos, positions.rerope_window, positions.rerope_leak)
        far = rotate(q, q_far, inv_freq) @ rotate(k, k_far, inv_freq).transpose(-1, -2)
        return torch.where(key_distance(q_pos, k_pos) < positions.rerope_window, near, far)
    scores = rotate(q, q_pos, inv_freq) @ k.transpose(-1, -2)
    # Sinks outside the window: second pass with the query at its slot in the cache.
    n_sinks = int((k_pos < sinks).sum())
    q_slot = rotate(q, sink_query_positions(q_pos, window, sinks), inv_freq)
    sink_scores = q_slot @ k[:, :, :n_sinks].transpose(-1, -2)
    outside = sink_only(q_pos, k_pos[:n_sinks], window, sinks)
    return torch.cat([torch.where(outside, sink_scores, scores[..., :n_sinks]), scores[..., n_sinks:]], -1)


# --- the blocked and fused paths -------------------------------------------------------------------------
def block_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None, sinks: int = 0) -> torch.Tensor:
    """Indices of the keys a block of queries may see (k_pos sorted): all up to the last query, or the
    sinks and the window."""
    last = int(torch.searchsorted(k_pos, q_pos[-1], right=True))
    if window is None:
        return torch.arange(last, device=k_pos.device)
    first = int(torch.searchsorted(k_pos, q_pos[0] - window + 1))
    n_sinks = int((k_pos < sinks).sum())
    window_part = torch.arange(max(first, n_sinks), last, device=k_pos.device)
    return torch.cat([torch.arange(n_sinks, device=k_pos.device), window_part])


def block_size(batch: int, heads: int, head_dim: int, queries: int, keys: int, window: int | None = None,
               sinks: int = 0, dynamic: bool = False, budget: int = SCORE_BLOCK_ELEMENTS) -> int:
    """Queries per block so that one block's scores stay near `budget` elements (dynamic NTK's per-query
    keys count E times): with a window a block of c queries reads c + w + s - 1 keys, otherwise up to
    all `keys`."""
    budget = budget // (batch * heads * (head_dim if dynamic else 1))
    if window is None:
        return max(1, min(queries, budget // max(keys, 1)))
    seen = window + sinks
    # Blocks of about w queries read about 2w keys: close to the L * w floor, few Python iterations.
    fits = int((math.sqrt(seen * seen + 4 * budget) - seen) / 2)
    return max(1, min(queries, fits, max(64, window)))


def blocked_attention(q, k, v, q_pos, k_pos, positions: LogitPositions, scale: float, window: int | None = None,
                      sinks: int = 0, block_elements: int = SCORE_BLOCK_ELEMENTS) -> torch.Tensor:
    """Softmax attention over blocks of queries: q (B, H, L, E) raw, k, v (B, G, T, E) as a cache holds
    them, at positions q_pos (L,), k_pos (T,) sorted -> (B, H, L, E)."""
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    block = block_size(q.shape[0], heads, q.shape[3], q.shape[2], k.shape[2], window, sinks,
                       positions.dynamic is not None, block_elements)
    two_pass = positions.kind == "rerope" or positions.dynamic is not None or (positions.kind == "rope" and sinks)
    outputs = []
    for start in range(0, q.shape[2], block):
        rows = slice(start, start + block)
        index = block_keys(q_pos[rows], k_pos, window, sinks)
        kb_pos = k_pos[index]
        allowed = attention_mask(q_pos[rows], kb_pos, window, sinks)  # (Lb, Tb)
        if two_pass:
            scores = two_pass_scores(q[:, :, rows], k[:, :, index], q_pos[rows], kb_pos, positions, window,
                                     sinks) * scale
            outputs.append(softmax_attention(scores, allowed, v[:, :, index]))
            continue
        q_block = q[:, :, rows]
        if positions.kind == "rope":
            q_block = rotate(q_block, q_pos[rows], positions.inv_freq)
        mask = allowed
        if positions.kind == "alibi":
            bias = alibi_bias(positions.slopes, key_distance(q_pos[rows], kb_pos, window, sinks)).to(q.dtype)
            mask = bias.masked_fill(~allowed, float("-inf"))  # (H, Lb, Tb)
        outputs.append(F.scaled_dot_product_attention(q_block, k[:, :, index], v[:, :, index], attn_mask=mask,
                                                      scale=scale))
    return torch.cat(outputs, dim=2)


def fused_attention(q, k, v, query_start: int, positions: LogitPositions, scale: float) -> torch.Tensor:
    """Static RoPE or none over keys at positions 0..T-1 with the fused kernel: q (B, H, L, E) raw at
    positions query_start.., k (rotated for RoPE), v (B, G, T, E) -> (B, H, L, E)."""
    heads, seqlen, total = q.shape[1], q.shape[2], k.shape[2]
    q_pos = torch.arange(query_start, query_start + seqlen, device=q.device)
    if positions.kind == "rope":
        q = rotate(q, q_pos, positions.inv_freq)
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    if query_start == 0 and seqlen == total:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if seqlen == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = attention_mask(q_pos, torch.arange(total, device=q.device))  # (L, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def resolve_backend(backend: str, device: torch.device | str = "cpu", positions: LogitPositions | None = None,
                    window: int | None = None) -> str:
    """The path `backend` runs: "fused", "blocked" or "sequential" (the same on every device). "auto" is
    "fused" where one logit formula serves all pairs (static RoPE or none, no window), else "blocked";
    an explicit "fused" elsewhere raises, naming why."""
    check_backend("attention", backend, BACKENDS)
    fits = positions is None or (positions.single_formula and window is None)
    if backend == "fused" and not fits:
        raise ValueError("attention: backend='fused' needs static RoPE or no positions and no window (one logit "
                         "formula for every pair); use 'blocked' or 'auto'")
    if backend == "auto":
        return "fused" if fits else "blocked"
    return backend


def describe_backend(backend: str, device: torch.device | str = "cpu", positions: LogitPositions | None = None,
                     window: int | None = None) -> str:
    """What `resolve_backend` picks, in words."""
    words = {"fused": "fused causal kernel (scaled_dot_product_attention)",
             "blocked": "query blocks over the visible keys", "sequential": "per-query reference"}
    return f"backend={backend}: {words[resolve_backend(backend, device, positions, window)]}"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              positions: LogitPositions, scale: float, window: int | None = None, sinks: int = 0,
              backend: Backend = "auto", block_elements: int = SCORE_BLOCK_ELEMENTS) -> torch.Tensor:
    """Causal softmax attention with position-dependent logits.

    Args:
        q: (B, H, L, E) queries before RoPE, at positions `q_pos` (L,).
        k, v: (B, G, T, E) keys and values as a KV cache holds them (keys rotated at their positions for
            static RoPE, raw otherwise: `positions.keys_rotated`), at sorted positions `k_pos` (T,).
        positions: the logits' dependence on positions; scale: the logit scale (`dot_scale`).
        window, sinks: each query sees its `window` most recent keys and the first `sinks` tokens.
        backend: "auto", "fused", "blocked" or "sequential" (`resolve_backend`).
        block_elements: elements of one block of scores on the blocked path.
    Returns:
        (B, H, L, E).
    """
    backend = resolve_backend(backend, q.device, positions, window)
    if backend == "fused":
        return fused_attention(q, k, v, int(q_pos[0]), positions, scale)
    if backend == "blocked":
        return blocked_attention(q, k, v, q_pos, k_pos, positions, scale, window, sinks, block_elements)
    if positions.keys_rotated:  # the reference wants raw keys
        k = rotate(k, -k_pos, positions.inv_freq)
    return attention_ref(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), q_pos, k_pos, positions, scale,
                         window, sinks)


# --- reference ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnnMemory:
    """kNN memory attention's sizes: entries retrieved per query, chunk length, memory entries kept."""

    top_k: int
    chunk: int
    memory_size: int


def attention_ref(q, k, v, q_pos, k_pos, positions: LogitPositions, scale: float, window: int | None = None,
                  sinks: int = 0, knn: KnnMemory | None = None) -> torch.Tensor:
    """Every variant by its definition, one query at a time (slow; for tests).

    q (B, H, L, E), k, v (B, H, T, E), both before RoPE, at positions q_pos (L,), k_pos (T,). For the
    query at t: the keys it sees (causal, window, sinks; for kNN the chunk so far plus the top-k of the
    memory of earlier chunks by the logit); the distance of each key as the positional encoding sees it
    (StreamingLLM: cache slots; ReRoPE: clipped / compressed); RoPE applied as a rotation of q by that
    distance (with dynamic NTK's base for length t + 1); ALiBi as -slope * distance; one softmax.
    """
    batch, heads, _, head_dim = q.shape
    outputs = []
    for i, t in enumerate(q_pos.tolist()):
        if knn is not None:
            chunk_start = t // knn.chunk * knn.chunk
            local = ((k_pos >= chunk_start) & (k_pos <= t)).nonzero().flatten()
            memory = ((k_pos < chunk_start) & (k_pos >= chunk_start - knn.memory_size)).nonzero().flatten()
            keys = _retrieve_ref(q[:, :, i], k, k_pos, t, local, memory, positions, scale, knn.top_k)
        else:
            seen = k_pos <= t
            if window is not None:
                seen = seen & ((k_pos > t - window) | (k_pos < sinks))
            keys = seen.nonzero().flatten().expand(batch, heads, -1)  # (B, H, n)
        if sinks:
            distance = torch.arange(keys.shape[-1] - 1, -1, -1, device=q.device).expand_as(keys)  # cache slots
        else:
            distance = t - k_pos[keys]
        k_seen = torch.gather(k, 2, keys[..., None].expand(-1, -1, -1, head_dim))  # (B, H, n, E)
        v_seen = torch.gather(v, 2, keys[..., None].expand(-1, -1, -1, head_dim))
        logits = logits_ref(q[:, :, i], k_seen, distance, t, positions, scale)
        outputs.append(torch.einsum("bhn,bhne->bhe", logits.softmax(-1), v_seen))
    return torch.stack(outputs, dim=2)


def logits_ref(q_t, k_seen, distance, t: int, positions: LogitPositions, scale: float) -> torch.Tensor:
    """q_t (B, H, E), k_seen (B, H, n, E) raw, distance (B, H, n) -> scaled logits (B, H, n)."""
    if positions.kind in ("rope", "rerope"):
        inv_freq = positions.inv_freq
        if positions.dynamic is not None:
            inv_freq = positions.dynamic.inv_freq(torch.tensor([t + 1]))[0].to(q_t.device)
        if positions.kind == "rerope":
            distance = rerope_distance(distance, positions.rerope_window, positions.rerope_leak)
        cos, sin = rope_cos_sin(distance, inv_freq, q_t.dtype)  # (B, H, n, E)
        q_rotated = apply_rope(q_t[:, :, None], cos, sin)  # rotating q by the distance, k by 0
        return (q_rotated * k_seen).sum(-1) * scale
    logits = (q_t[:, :, None] * k_seen).sum(-1) * scale
    if positions.kind == "alibi":
        logits = logits - positions.slopes[:, None].to(logits.dtype) * distance
    return logits


def _retrieve_ref(q_t, k, k_pos, t: int, local: torch.Tensor, memory: torch.Tensor, positions: LogitPositions,
                  scale: float, top_k: int) -> torch.Tensor:
    """Key indices (B, H, n) for kNN query t: the local ones, then the top-k memory entries by the
    logit at distance t - s."""
    batch, heads = q_t.shape[:2]
    local = local.expand(batch, heads, -1)
    if len(memory) == 0:
        return local
    distance = (t - k_pos[memory]).expand(batch, heads, -1)
    scores = logits_ref(q_t, k[:, :, memory], distance, t, positions, scale)
    top = scores.topk(min(top_k, len(memory)), dim=-1).indices
    return torch.cat([local, memory[top]], dim=-1)
