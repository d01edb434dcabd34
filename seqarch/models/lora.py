"""LoRA adapters on the attention projections, in the LongLoRA setting.

Legend: B batch, L length, I input features, O output features, R adapter rank.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3): a frozen
linear layer W (O, I) gains a trainable low-rank update,

    y = x W^T + (alpha / R) x A^T B^T,    A (R, I) random (Kaiming-uniform), B (O, R) zero,

so an adapted model starts exactly equal to its base. `merge_lora` folds the update back,
W <- W + (alpha / R) B A, leaving a plain nn.Linear.

LongLoRA (Chen et al., 2023, "LongLoRA", section 3.3) found that LoRA alone does not extend the
context well unless the embeddings and the normalization layers are trainable too: `apply_lora`
with `train_embeddings_and_norms=True` (the default) leaves those trainable and freezes the rest.
Only the projections of attention mixers (q, kv, out) get adapters; other mixers stay frozen.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seqarch.mixers.attention import AttentionMixer

ATTENTION_PROJECTIONS = ("q_proj", "kv_proj", "out_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus (alpha / rank) * B A; called like the linear it wraps."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (R, I)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # (O, R)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., I) -> (..., O)."""
        return self.base(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T

    def merged(self) -> nn.Linear:
        """The base linear with the update folded into its weight (a new module; self unchanged)."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def apply_lora(model: nn.Module, rank: int, alpha: float, train_embeddings_and_norms: bool = True) -> int:
    """Freeze `model`, wrap every attention projection in a LoRALinear (in place) and, in the LongLoRA
    setting, unfreeze embeddings and norms. Returns the number of wrapped layers; ValueError when the
    model has no attention layer to adapt."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        if isinstance(module, AttentionMixer):
            for name in ATTENTION_PROJECTIONS:
                setattr(module, name, LoRALinear(getattr(module, name), rank, alpha))
                wrapped += 1
    if not wrapped:
        raise ValueError("lora: the model has no attention layer; LoRA adapts attention projections only "
                         "(set lora.rank=0 for a full fine-tune)")
    if train_embeddings_and_norms:
        for module in model.modules():
            if isinstance(module, (nn.Embedding, nn.RMSNorm, nn.LayerNorm)):
                for parameter in module.parameters(recurse=False):
                    parameter.requires_grad_(True)
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear in `model` by its merged nn.Linear (in place); returns how many."""
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                merged += 1
    return merged


__all__ = ["ATTENTION_PROJECTIONS", "LoRALinear", "apply_lora", "merge_lora"]
