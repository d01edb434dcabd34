"""Positional encodings: RoPE and its long-context scalings, ReRoPE, ALiBi, sinusoidal positions.

Legend: B batch, H heads, L length, T key length, E head dim, D model width.

RoPE (Su et al., 2021, "RoFormer", eq. 34) rotates each pair of channels (i, i + E/2) of a query or
key at position t by the angle t * inv_freq[i], inv_freq[i] = base^(-2i/E), so that q_s . k_t depends
on s - t only. We use the "rotate half" pairing of GPT-NeoX / Llama.

The scalings change the angle f(t, i) = g(t) * h(i) (the unified view of the YaRN paper, sec. 2-3):

- linear, Position Interpolation (Chen et al., 2023, eq. 2): g(t) = t / s, i.e. inv_freq / s.
- ntk, NTK-aware scaled RoPE (bloc97, 2023): base' = base * s^(E / (E - 2)).
- dynamic NTK (emozilla, 2023): the ntk base change with s replaced, at sequence length l > L_train,
  by s * l / L_train - (s - 1); unchanged inside the trained length. It depends on `seq_len`.
- yarn (Peng et al., 2023, "YaRN", eq. 18-20): a per-frequency ramp between interpolation (inv_freq / s)
  and extrapolation (inv_freq) set by beta_fast / beta_slow, plus the attention temperature
  sqrt(1/t) = 0.1 ln(s) + 1 that multiplies queries and keys (so the logits by its square). The ramp
  is taken over the dimension index between the floor / ceil of the correction dimensions, as the
  authors' code and HF transformers compute it (the paper states it in terms of r(d) = L / lambda_d).
  The temperature follows HF transformers' `_compute_yarn_parameters`: an explicit `attention_factor`
  wins; else, when both `mscale` and `mscale_all_dim` are set (the DeepSeek-V2/V3 form), it is
  (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1); else 0.1 ln s + 1, `mscale` alone being ignored.
  DeepSeek's attention also multiplies its softmax scale by (0.1 mscale_all_dim ln s + 1)^2 inside the
  attention layer; that factor is not part of RoPE and is not applied here.
- llama3 (Meta's Llama 3.1 RoPE, HF's `_compute_llama3_parameters`): with wavelength lambda = 2 pi / inv_freq
  and L = original_max_position, frequencies with lambda < L / high_freq_factor are kept, those with
  lambda > L / low_freq_factor divided by s, and those between blended linearly in L / lambda:
  (1 - a) inv_freq / s + a inv_freq with a = (L / lambda - low_freq_factor) / (high_freq_factor - low_freq_factor).

ReRoPE (Su, 2023, "Rectified Rotary Position Embeddings") clips the relative position at a window w:
relative distance r becomes min(r, w); Leaky ReRoPE continues with slope 1/k beyond w:
r -> w + (r - w) / k. It needs a second pass of attention scores (see `rerope_angles`).

ALiBi (Press et al., 2022, "Train Short, Test Long", sec. 3) adds -m_h * (t - s) to the logits with
head slopes m_h = 2^(-8h/H), h = 1..H, and for H not a power of two the slopes of the closest lower
power of two followed by every other slope of twice that count.

Sinusoidal positions (Vaswani et al., 2017, sec. 3.5) are absolute and belong at the embedding, not
in an attention layer: `sinusoidal_positions` gives the table; see docs/long-context.md.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

RopeScaling = Literal["linear", "ntk", "dynamic", "yarn", "llama3"]
ROPE_SCALING_TYPES: tuple[str, ...] = get_args(RopeScaling)

# Fields each scaling type accepts in the `scaling` dict of rope_frequencies (besides "type").
_SCALING_FIELDS = {
    "linear": {"factor"},
    "ntk": {"factor"},
    "dynamic": {"factor", "original_max_position"},
    "yarn": {"factor", "original_max_position", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor"},
    "llama3": {"factor", "original_max_position", "low_freq_factor", "high_freq_factor"},
}


def _plain_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    """base^(-2i/E) for i < E/2, float64."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return 1.0 / base**exponents


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_dim(num_rotations: float, head_dim: int, base: float, original_max_position: int) -> float:
    """The dimension index whose wavelength fits `num_rotations` times into the trained length:
    E * ln(L_train / (2 pi num_rotations)) / (2 ln base)."""
    return head_dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None,
                          attention_factor: float | None = None) -> float:
    """YaRN's factor on queries and keys, as HF transformers infers it: `attention_factor` if given;
    else mscale(s, mscale) / mscale(s, mscale_all_dim) when both are set and non-zero (DeepSeek's form);
    else 0.1 ln(s) + 1 (`mscale` alone is ignored, as in HF)."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def llama3_inv_freq(plain: torch.Tensor, factor: float, original_max_position: int, low_freq_factor: float,
                    high_freq_factor: float) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of the plain inverse frequencies `plain` (E/2,): long wavelengths
    (> L / low_freq_factor) interpolated by s, short ones (< L / high_freq_factor) kept, a linear blend
    in L / wavelength between."""
    wavelength = 2 * math.pi / plain
    blend = (original_max_position / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * plain / factor + blend * plain
    low_limit, high_limit = original_max_position / low_freq_factor, original_max_position / high_freq_factor
    return torch.where(wavelength > low_limit, plain / factor, torch.where(wavelength < high_limit, plain, blended))


def dynamic_ntk_inv_freq(head_dim: int, base: float, factor: float, original_max_position: int,
                         seq_lens: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK inverse frequencies (N, E/2) float32, one row per sequence length in `seq_lens` (N,).

    base(l) = base * (s * max(l, L_train) / L_train - (s - 1))^(E / (E - 2)).
    """
    lengths = seq_lens.to(torch.float64).clamp(min=original_max_position)
    grown = (factor * lengths / original_max_position - (factor - 1)) ** (head_dim / (head_dim - 2))  # (N,)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=seq_lens.device) / head_dim
    return (1.0 / (base * grown[:, None]) ** exponents).to(torch.float32)


def rope_frequencies(head_dim: int, base: float = 10000.0, max_position: int = 2048,
                     scaling: dict | None = None, device=None,
                     seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (E/2,) float32 and the attention scale factor (1.0 except for YaRN).

    Missing fields take the defaults of HF transformers: YaRN beta_fast 32, beta_slow 1, its factor as
    `yarn_attention_factor` infers it; llama3 low_freq_factor 1, high_freq_factor 4 (Llama 3.1's values).

    `max_position` is the context length the model is trained for; it is the default of the
    scaling's `original_max_position`. `scaling` is None or a dict {"type": one of
    ROPE_SCALING_TYPES, "factor": s >= 1, ...}; "dynamic" uses `seq_len` (the current sequence length,
    None = within the trained length). The attention scale multiplies queries and keys (as HF's
    `attention_factor`), so the logits get its square.
    """
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim}")
    if scaling is None:
        return _plain_inv_freq(head_dim, base, device).to(torch.float32), 1.0
    if not isinstance(scaling, dict) or scaling.get("type") not in ROPE_SCALING_TYPES:
        kind = scaling.get("type") if isinstance(scaling, dict) else scaling
        raise ValueError(f"unknown RoPE scaling {kind!r}; valid: None or a dict with type in {ROPE_SCALING_TYPES}")
    kind = scaling["type"]
    unknown = sorted(set(scaling) - _SCALING_FIELDS[kind] - {"type"})
    if unknown:
        raise ValueError(f"RoPE scaling {kind!r} got unknown field {unknown[0]!r}; valid: "
                         f"{', '.join(sorted(_SCALING_FIELDS[kind]))}")
    factor = float(scaling.get("factor", 1.0))
    if factor < 1:
        raise ValueError(f"RoPE scaling factor must be >= 1, got {factor}")
    original = int(scaling.get("original_max_position", max_position))
    plain = _plain_inv_freq(head_dim, base, device)
    if kind == "linear":
        return (plain / factor).to(torch.float32), 1.0
    if kind == "ntk":
        return _plain_inv_freq(head_dim, base * factor ** (head_dim / (head_dim - 2)), device).to(torch.float32), 1.0
    if kind == "dynamic":
        length = torch.tensor([original if seq_len is None else seq_len], device=device)
        return dynamic_ntk_inv_freq(head_dim, base, factor, original, length)[0], 1.0
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        if not 0 < low < high:
            raise ValueError(f"RoPE scaling 'llama3' needs 0 < low_freq_factor < high_freq_factor, got {low}, {high}")
        return llama3_inv_freq(plain, factor, original, low, high).to(torch.float32), 1.0
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0))
    low = max(math.floor(yarn_correction_dim(beta_fast, head_dim, base, original)), 0)
    high = min(math.ceil(yarn_correction_dim(beta_slow, head_dim, base, original)), head_dim - 1)
    span = high - low if high > low else 0.001  # a zero-width ramp becomes a step
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device=device) - low) / span).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the high frequency as trained; 0: interpolate the low one
    inv_freq = plain / factor * ramp + plain * extrapolate
    scale = yarn_attention_factor(factor, scaling.get("mscale"), scaling.get("mscale_all_dim"),
                                  scaling.get("attention_factor"))
    return inv_freq.to(torch.float32), scale


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (*positions.shape, E) for integer or real `positions`.

    Angles are formed in float64 when `dtype` is float64, else in float32.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    angles = positions.to(compute)[..., None] * inv_freq.to(compute)  # (..., E/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., E)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, E) by angles whose cos/sin are (L, E) (or broadcastable)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos + rotated_half * sin


def rerope_distance(distance: torch.Tensor, window: int, leak: float = 0.0) -> torch.Tensor:
    """ReRoPE's relative distance: r below the window, w + (r - w) * leak from it on (leak = 1/k;
    0 is ReRoPE, which clips at w)."""
    distance = distance.to(torch.float64) if distance.dtype == torch.float64 else distance.float()
    return torch.where(distance < window, distance, window + (distance - window) * leak)


def rerope_angles(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int, leak: float = 0.0):
    """Positions of the second ReRoPE pass: rotating the query at w + leak * (t - w) and the key at
    leak * s gives q . k the angle of distance w + (t - s - w) * leak; the first pass is plain RoPE."""
    return window + leak * (query_positions - window), leak * key_positions


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (H,) float64: 2^(-8h/H) for h = 1..H when H is a power of two; otherwise
    those of the closest lower power of two P followed by the first H - P of every other slope of 2P."""
    if n_heads < 1:
        raise ValueError(f"ALiBi needs n_heads >= 1, got {n_heads}")
    power = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * h / power) for h in range(1, power + 1)]
    if power < n_heads:
        slopes += alibi_slopes(2 * power).tolist()[0::2][: n_heads - power]
    return torch.tensor(slopes, dtype=torch.float64)


def sinusoidal_positions(positions: torch.Tensor, d_model: int, base: float = 10000.0,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal absolute position embeddings (*positions.shape, D), D even:
    PE[t, 2i] = sin(t / base^(2i/D)), PE[t, 2i + 1] = cos(t / base^(2i/D))."""
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
    inv_freq = _plain_inv_freq(d_model, base, positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., D/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (..., D/2, 2)
    return table.flatten(-2).to(dtype)
