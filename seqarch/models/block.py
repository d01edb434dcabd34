"""The standard pre-norm residual block around any mixer.

    x = x + mixer(RMSNorm(x))
    x = x + mlp(RMSNorm(x))        (SwiGLU; off with mlp=False, as in Mamba; or the mixer's own)

A Block follows the SequenceMixer contract itself (forward / init_state / prefill / step), so a
stack of blocks decodes token by token. A mixer that brings its own channel mixer (RWKV's
channel-mix, which has a token-shift state) returns it from `own_mlp()`; the block uses it in
place of SwiGLU and carries its state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seqarch.mixers.base import MixerState, SequenceMixer
from seqarch.models.mlp import SwiGLU


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

    @property
    def state_grows_with_length(self) -> bool:
        return self.mixer.state_grows_with_length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D)."""
        x = x + self.mixer(self.norm_mixer(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x

    def init_state(self, batch_size: int, device=None, dtype=None) -> BlockState:
        mlp_state = self.mlp.init_state(batch_size, device=device, dtype=dtype) if self.stateful_mlp else None
        return BlockState(mixer=self.mixer.init_state(batch_size, device=device, dtype=dtype), mlp=mlp_state)

    def _run(self, x, state: BlockState, method: str):
        y, mixer_state = getattr(self.mixer, method)(self.norm_mixer(x), state.mixer)
        x = x + y
        mlp_state = None
        if self.stateful_mlp:
            y, mlp_state = getattr(self.mlp, method)(self.norm_mlp(x), state.mlp)
            x = x + y
        elif self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x, BlockState(mixer=mixer_state, mlp=mlp_state)

    def prefill(self, x: torch.Tensor, state: BlockState) -> tuple[torch.Tensor, BlockState]:
        """x (B, L, D) continuing from `state`."""
        return self._run(x, state, "prefill")

    def step(self, x_t: torch.Tensor, state: BlockState) -> tuple[torch.Tensor, BlockState]:
        """One token x_t (B, D)."""
        return self._run(x_t, state, "step")

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        total = self.mixer.state_nbytes(batch_size, seq_len, dtype)
        if self.stateful_mlp:
            total += self.mlp.state_nbytes(batch_size, seq_len, dtype)
        return total
