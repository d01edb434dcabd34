"""The standard pre-norm residual block around any mixer; `build_block(name, ...)` builds one by mixer name.

    x = x + mixer(RMSNorm(x))
    x = x + mlp(RMSNorm(x))        (SwiGLU; off with mlp=False, as in Mamba; or the mixer's own)

A Block follows the SequenceMixer contract itself (forward / init_state / prefill / step), so a
stack of blocks decodes token by token. A mixer that brings its own channel mixer (RWKV's
channel-mix, which has a token-shift state) returns it from `own_mlp()`; the block uses it in
place of SwiGLU and carries its state.

`context` (optional on forward / prefill / step): a dict that a model shares among its blocks for one
call, passed on to a mixer whose class sets `uses_layer_context = True` (RWKV-7 leaves its first layer's
value there for the value residual of the later ones); other mixers never see it.

Initialisation (`init_weights`, run at construction and again by SeqLM with the model's depth) follows
GPT-2 / Zoology / mamba-ssm's `_init_weights`: every nn.Linear of the mixer and the MLP is drawn from
N(0, 0.02) with a zero bias, except modules and parameters tagged `_no_reinit = True` (their owner's
reference init is kept, e.g. Mamba's projections as mamba-ssm keeps them, Hyena's implicit filter) and
modules tagged `_model_init = fn` (their reference's model init has its own rule for them, e.g. RWKV-LM's
orthogonal and zero projections: `fn(weight)` draws it in place of N(0, 0.02)). Every module tagged
`_is_residual_projection = True` (a mixer's output projection, the MLP's down projection: the ones that
write into the residual stream) is then scaled by 1 / sqrt(N), N the number of residual branches of the
whole model (2 per layer with an MLP, 1 without: mamba-ssm's n_residuals_per_layer * n_layer), so the
residual stream's variance does not grow with depth; one with a `_model_init` rule is not (the rule is its
reference's whole init, RWKV-LM's zero included). Other parameters (A_log, dt biases, decays, token-shift
mixes, norms, convolutions) keep their mixer's init. The mixers say which module is which by these tags,
so the block never matches parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqarch.mixers.base import MixerState, SequenceMixer
from seqarch.models.mlp import SwiGLU
from seqarch.registry import build_mixer


@dataclass
class BlockState(MixerState):
    mixer: MixerState
    mlp: MixerState | None  # only for a stateful channel mixer


class Block(nn.Module):
    def __init__(self, mixer: SequenceMixer, mlp: bool = True, mlp_ratio: float = 8 / 3,
                 norm_eps: float = 1e-5, mlp_hidden: int | None = None, mlp_bias: bool = False,
                 device=None, dtype=None):
        """mlp_hidden: the SwiGLU width exactly (None: mlp_ratio * d_model rounded up to a multiple of 8);
        mlp_bias: biases in the SwiGLU projections."""
        super().__init__()
        d_model = mixer.d_model
        self.d_model = d_model
        self.mixer = mixer
        self.norm_mixer = nn.RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        own = mixer.own_mlp()
        self.stateful_mlp = own is not None
        if own is not None:
            self.mlp = own
        elif mlp:
            self.mlp = SwiGLU(d_model, mlp_ratio, hidden=mlp_hidden, bias=mlp_bias, device=device, dtype=dtype)
        else:
            self.mlp = None
        self.norm_mlp = (nn.RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
                         if self.mlp is not None else None)
        self.init_weights(self.residual_branches)

    @property
    def residual_branches(self) -> int:
        """Branches this block adds to the residual stream: the mixer, and the MLP if any."""
        return 1 + (self.mlp is not None)

    def residual_projections(self) -> list[nn.Module]:
        """The modules whose output is added to the residual stream (tagged by their owner)."""
        return [module for module in self.modules() if getattr(module, "_is_residual_projection", False)]

    @torch.no_grad()
    def init_weights(self, total_residual_branches: int, std: float = 0.02) -> None:
        """(Re-)initialise the projections for a model with `total_residual_branches` residual branches
        (sum of `residual_branches` over its blocks); see the module docstring. Calling it again (SeqLM
        does, once it knows its depth) redraws the N(0, std) and rule-drawn projections and moves a kept-init residual
        projection from its previous scale to the new one, so the result does not depend on call order."""
        redrawn = _reinitialised_linears(self)
        for linear in redrawn:
            rule = getattr(linear, "_model_init", None)
            if rule is None:
                nn.init.normal_(linear.weight, std=std)
            else:
                rule(linear.weight)
            if linear.bias is not None and not getattr(linear.bias, "_no_reinit", False):
                nn.init.zeros_(linear.bias)
        scale = 1.0 / math.sqrt(total_residual_branches)
        for module in self.residual_projections():
            if getattr(module, "_model_init", None) is not None:
                continue  # its rule already is the reference's init for this depth
            previous = 1.0 if any(module is linear for linear in redrawn) else getattr(module, "_residual_scale", 1.0)
            module.weight.mul_(scale / previous)
            module._residual_scale = scale

    @property
    def state_grows_with_length(self) -> bool:
        return self.mixer.state_grows_with_length

    def _context(self, context: dict | None) -> dict:
        """The keyword that hands a model's per-call context to the mixer, if the mixer takes one."""
        return {"context": context} if context is not None and getattr(self.mixer, "uses_layer_context", False) else {}

    def forward(self, x: torch.Tensor, context: dict | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        x = x + self.mixer(self.norm_mixer(x), **self._context(context))
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x

    def init_state(self, batch_size: int, device=None, dtype=None) -> BlockState:
        mlp_state = self.mlp.init_state(batch_size, device=device, dtype=dtype) if self.stateful_mlp else None
        return BlockState(mixer=self.mixer.init_state(batch_size, device=device, dtype=dtype), mlp=mlp_state)

    def _run(self, x, state: BlockState, method: str, context: dict | None):
        y, mixer_state = getattr(self.mixer, method)(self.norm_mixer(x), state.mixer, **self._context(context))
        x = x + y
        mlp_state = None
        if self.stateful_mlp:
            y, mlp_state = getattr(self.mlp, method)(self.norm_mlp(x), state.mlp)
            x = x + y
        elif self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x, BlockState(mixer=mixer_state, mlp=mlp_state)

    def prefill(self, x: torch.Tensor, state: BlockState,
                context: dict | None = None) -> tuple[torch.Tensor, BlockState]:
        """x (B, L, D) continuing from `state`."""
        return self._run(x, state, "prefill", context)

    def step(self, x_t: torch.Tensor, state: BlockState,
             context: dict | None = None) -> tuple[torch.Tensor, BlockState]:
        """One token x_t (B, D)."""
        return self._run(x_t, state, "step", context)

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        total = self.mixer.state_nbytes(batch_size, seq_len, dtype)
        if self.stateful_mlp:
            total += self.mlp.state_nbytes(batch_size, seq_len, dtype)
        return total


def _reinitialised_linears(module: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear below `module` that the model init redraws (N(0, std), or its `_model_init` rule): not
    tagged `_no_reinit`, and not inside a module tagged `_no_reinit` (a mixer part that owns its init, such as
    an implicit filter)."""
    found = []
    for child in module.children():
        if getattr(child, "_no_reinit", False):
            continue
        if isinstance(child, nn.Linear):
            found.append(child)
        else:
            found += _reinitialised_linears(child)
    return found


def build_block(name: str, *, mlp: bool = True, mlp_ratio: float = 8 / 3, norm_eps: float = 1e-5,
                mlp_hidden: int | None = None, mlp_bias: bool = False, device=None, dtype=None, **overrides: Any):
    """Mixer `name` (built by the registry; keyword arguments override its config) wrapped in the pre-norm
    residual Block."""
    mixer = build_mixer(name, device=device, dtype=dtype, **overrides)
    return Block(mixer, mlp=mlp, mlp_ratio=mlp_ratio, norm_eps=norm_eps, mlp_hidden=mlp_hidden, mlp_bias=mlp_bias,
                 device=device, dtype=dtype)
