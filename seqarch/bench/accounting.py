"""Analytic accounting: parameters, state / KV-cache bytes and FLOPs per token, without allocating.

Legend: L context length, D model width, V vocabulary, H query heads, E head dim.

Models are built on the "meta" device (shapes only, no storage), so a 13B-parameter stack at
128K tokens costs nothing to account for. State bytes come from the mixers themselves
(`SeqLM.state_nbytes`, i.e. each mixer's `state_nbytes(B, L)`), so a new mixer is covered the
moment it registers.

FLOPs per generated token at context L (forward only) are the sum of
  - matmul FLOPs: 2 x the weights of every `nn.Linear` in the stack, plus the output head
    (the "2N" rule of Kaplan et al., 2020, "Scaling Laws for Neural Language Models", sec. 2.1);
  - the sequence-mixing FLOPs the weights do not show: each mixer's `flops_per_token(seq_len)`,
    part of the contract (for attention 4 L H E per layer: q k^T and the weighted sum of values
    over L keys; for the recurrent mixers the step's multiply-adds, plus weights held as
    Parameters rather than Linear layers).
Linear layers inside a module with `per_token_weights = False` (Hyena's filter MLP, which maps
positions to taps and is memoised when decoding) are not charged per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqarch.mixers.base import SequenceMixer
from seqarch.models import SeqLM


@dataclass(frozen=True)
class ModelShape:
    """A stack shape to account for: every layer uses the same mixer."""

    d_model: int  # width D
    n_layers: int  # number of blocks
    vocab_size: int  # embedding rows V
    dtype: str  # parameter / state dtype name, e.g. "float16"
    tie_embeddings: bool  # head shares the embedding matrix
    mlp: bool = True  # SwiGLU MLP in each block
    mixer_overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per-mixer config keys


# Well-known shapes for `seqarch memory model=...` and the report's analytic section.
# Llama 2 (Touvron et al., 2023, table 1 and the released configs): 4096 context, fp16 weights.
PRESETS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(4096, 32, 32000, "float16", False,
                             mixer_overrides=(("attention", (("n_heads", 32),)),)),
    "llama-2-13b": ModelShape(5120, 40, 32000, "float16", False,
                              mixer_overrides=(("attention", (("n_heads", 40),)),)),
    "gpt2-small": ModelShape(768, 12, 50257, "float32", True,
                             mixer_overrides=(("attention", (("n_heads", 12),)),)),
}


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; valid: float32, float64, bfloat16, float16")
    return dtype


def build_model(mixer: str, d_model: int, n_layers: int, vocab_size: int, mlp: bool = True,
                tie_embeddings: bool = True, mixer_kwargs: dict[str, Any] | None = None,
                device=None, dtype=None) -> SeqLM:
    """The benchmark model: SeqLM with `n_layers` blocks of `mixer` (the one place bench builds models)."""
    return SeqLM(vocab_size, d_model=d_model, n_layers=n_layers, mixer=mixer, mlp=mlp,
                 tie_embeddings=tie_embeddings, device=device, dtype=dtype, **{mixer: dict(mixer_kwargs or {})})


def parameter_counts(model: SeqLM) -> dict[str, int]:
    """Total parameters, and those outside the embedding and head (the ones the mixer choice changes)."""
    total = model.num_parameters()
    table = {id(model.embedding.weight), id(model.head.weight)}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in table)
    return {"params": total, "params_non_embedding": non_embedding}


def count_parameters(mixer: str, d_model: int, n_layers: int, vocab_size: int, mlp: bool = True,
                     mixer_kwargs: dict[str, Any] | None = None) -> int:
    """Parameters of the benchmark model, counted on the meta device."""
    return build_model(mixer, d_model, n_layers, vocab_size, mlp, mixer_kwargs=mixer_kwargs,
                       device="meta").num_parameters()


def match_width(mixer: str, target_params: int, n_layers: int, vocab_size: int, mlp: bool = True,
                mixer_kwargs: dict[str, Any] | None = None, multiple_of: int = 8,
                max_width: int = 16384) -> int:
    """The width (a multiple of `multiple_of`) whose model has the parameter count closest to
    `target_params`. Widths the mixer's config rejects (e.g. not divisible by its heads) are skipped.
    Parameters grow with width, so the scan stops at the first valid width above the target."""
    best: tuple[int, int] | None = None  # (|params - target|, width)
    for width in range(multiple_of, max_width + 1, multiple_of):
        try:
            params = count_parameters(mixer, width, n_layers, vocab_size, mlp, mixer_kwargs)
        except ValueError:
            continue
        if best is None or abs(params - target_params) < best[0]:
            best = (abs(params - target_params), width)
        if params >= target_params:
            break
    if best is None:
        raise ValueError(f"match_params: no width up to {max_width} is valid for mixer {mixer!r}")
    return best[1]


def mixing_flops_per_token(mixer: SequenceMixer, seq_len: int) -> int:
    """Sequence-mixing FLOPs of one layer for one token at context `seq_len` (forward): the mixer's
    own `flops_per_token` (declared by the contract, seqarch.mixers.base)."""
    return int(mixer.flops_per_token(seq_len))


def _per_token_linears(module: nn.Module):
    """The Linear layers applied to every token: all of them except inside a module that declares
    `per_token_weights = False` (Hyena's filter MLP, which maps positions to filter taps)."""
    if not getattr(module, "per_token_weights", True):
        return
    if isinstance(module, nn.Linear):
        yield module
    for child in module.children():
        yield from _per_token_linears(child)


def matmul_flops_per_token(model: SeqLM) -> int:
    """2 x the per-token Linear weights of the blocks and the head: one multiply-add per weight."""
    block_weights = sum(module.weight.numel() for module in _per_token_linears(model.layers))
    return 2 * (block_weights + model.head.weight.numel())


def account(mixer: str, shape: ModelShape, seq_lens: list[int], batch_size: int = 1) -> list[dict[str, Any]]:
    """One row per length: parameters, weight bytes, state bytes, FLOPs per token. Allocates nothing."""
    dtype = torch_dtype(shape.dtype)
    mixer_kwargs = dict(dict(shape.mixer_overrides).get(mixer, ()))
    model = build_model(mixer, shape.d_model, shape.n_layers, shape.vocab_size, shape.mlp, shape.tie_embeddings,
                        mixer_kwargs, device="meta", dtype=dtype)
    counts = parameter_counts(model)
    element = torch.empty((), dtype=dtype).element_size()
    matmul = matmul_flops_per_token(model)
    rows = []
    for seq_len in seq_lens:
        mixing_total = sum(mixing_flops_per_token(block.mixer, seq_len) for block in model.layers)
        rows.append({
            "mixer": mixer,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "d_model": shape.d_model,
            "n_layers": shape.n_layers,
            "dtype": shape.dtype,
            **counts,
            "weight_bytes": counts["params"] * element,
            "state_bytes": model.state_nbytes(batch_size, seq_len, dtype),
            "state_grows_with_length": bool(model.layers[0].state_grows_with_length),
            "matmul_flops_per_token": matmul,
            "mixing_flops_per_token": mixing_total,
            "flops_per_token": matmul + mixing_total,
        })
    return rows


def shape_from(preset: str | None, overrides: dict[str, Any]) -> ModelShape:
    """A preset's shape with fields replaced by `overrides` (d_model, n_layers, vocab_size, dtype, ...)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid: {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else ModelShape(256, 2, 256, "float32", True)
    values = {**base.__dict__, **overrides}
    torch_dtype(values["dtype"])
    return ModelShape(**values)
