"""Attention helpers for long context: masks, windows, sinks, ALiBi bias, S2-Attn, kNN retrieval.

Legend: B batch, H heads, L queries, T keys, E head dim, G S2-Attn group size, M memory entries,
K retrieved entries per query.

Positions are absolute token indices. A query at position t may see key s when s <= t and

- sliding window w (Mistral; Beltagy et al., 2020): t - s < w, i.e. the w most recent keys, itself included;
- attention sinks s0 (Xiao et al., 2023, "StreamingLLM", sec. 3.2): also every s < s0, whatever t.

StreamingLLM assigns positions inside the cache: with the cache full (t >= s0 + w - 1) the query sits at
slot s0 + w - 1, so a sink key s that left the window is at distance min(t, s0 + w - 1) - s, while keys
in the window keep their true distance t - s (`key_distance`).

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

import torch
import torch.nn.functional as F
from einops import rearrange


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
