"""SeqLM: a language model over any registered mixer, or a per-layer hybrid of them.

    tokens (B, L) -> embedding -> n_layers x Block(mixer, MLP) -> RMSNorm -> head -> logits (B, L, V)

`mixer` is a registry name (every layer the same) or a list with one name per layer, e.g.
`["mamba"] * 3 + ["attention"]` repeated for a Jamba-style hybrid. Keyword arguments configure
the mixers: a plain key (`d_state=16`) goes to every layer, a key that names a mixer takes a dict
for the layers of that kind only (`attention={"n_heads": 4}`), and `layer_overrides` takes a dict per
layer index for single layers, applied last (`layer_overrides={2: {"knn_top_k": 32}}`: kNN memory on
layer 2 only, as the Memorizing Transformer does).

`position_embedding="sinusoidal"` adds Vaswani et al.'s absolute position table to the token
embedding (positions counted from the first prefilled token, carried in the state); "none" leaves
positions to the mixers (RoPE / ALiBi inside attention, or none at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqarch.mixers.base import MixerState
from seqarch.positional import sinusoidal_positions
from seqarch.registry import build_block, list_mixers

POSITION_EMBEDDINGS = ("none", "sinusoidal")


@dataclass
class LMState(MixerState):
    layers: list  # one BlockState per layer
    position: int = 0  # tokens consumed so far: the position of the next one


def _layer_overrides(overrides: dict | None, n_layers: int) -> dict[int, dict]:
    """{layer index (int or digit string, as YAML and key=value give it): {config key: value}}."""
    checked = {}
    for key, value in (overrides or {}).items():
        index = int(key) if str(key).isdigit() else -1
        if not 0 <= index < n_layers:
            raise ValueError(f"layer_overrides: key {key!r} must be a layer index in 0..{n_layers - 1}")
        if not isinstance(value, dict):
            raise ValueError(f"layer_overrides[{key!r}] must be a dict of config keys, got {value!r}")
        checked[index] = dict(value)
    return checked


class SeqLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, mixer: str | list[str] = "attention",
                 mlp: bool = True, tie_embeddings: bool = True, norm_eps: float = 1e-5,
                 position_embedding: str = "none", layer_overrides: dict | None = None,
                 device=None, dtype=None, **mixer_kwargs: Any):
        super().__init__()
        names = [mixer] * n_layers if isinstance(mixer, str) else list(mixer)
        if len(names) != n_layers:
            raise ValueError(f"mixer lists {len(names)} layers but n_layers={n_layers}")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding={position_embedding!r}; valid: "
                             f"{', '.join(map(repr, POSITION_EMBEDDINGS))}")
        if position_embedding == "sinusoidal" and d_model % 2:
            raise ValueError(f"position_embedding='sinusoidal' needs an even d_model, got {d_model}")
        per_layer = _layer_overrides(layer_overrides, n_layers)
        registered = set(list_mixers())
        shared = {key: value for key, value in mixer_kwargs.items() if key not in registered}
        for key, value in mixer_kwargs.items():
            if key in registered and not isinstance(value, dict):
                raise ValueError(f"per-mixer settings {key}=... must be a dict of config keys, got {value!r}")
        self.init_kwargs = {"vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers, "mixer": mixer,
                            "mlp": mlp, "tie_embeddings": tie_embeddings, "norm_eps": norm_eps,
                            "position_embedding": position_embedding, "layer_overrides": layer_overrides,
                            **mixer_kwargs}
        self.layer_names = names
        self.position_embedding = position_embedding
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(vocab_size, d_model, **factory)
        self.layers = nn.ModuleList(
            build_block(name, mlp=mlp, norm_eps=norm_eps, d_model=d_model, **factory,
                        **{**shared, **mixer_kwargs.get(name, {}), **per_layer.get(index, {})})
            for index, name in enumerate(names)
        )
        self.norm = nn.RMSNorm(d_model, eps=norm_eps, **factory)
        self.head = nn.Linear(d_model, vocab_size, bias=False, **factory)
        if tie_embeddings:
            self.head.weight = self.embedding.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self, std: float = 0.02) -> None:
        """GPT-2 / mamba-ssm's model init: embedding (and an untied head) N(0, std); each block's
        projections N(0, std) unless their mixer keeps its own, residual projections scaled by
        1/sqrt(residual branches of the whole model) (see seqarch.models.block)."""
        nn.init.normal_(self.embedding.weight, std=std)
        if self.head.weight is not self.embedding.weight:
            nn.init.normal_(self.head.weight, std=std)
        branches = sum(layer.residual_branches for layer in self.layers)
        for layer in self.layers:
            layer.init_weights(branches, std=std)

    @classmethod
    def from_config(cls, config: dict[str, Any], device=None, dtype=None) -> SeqLM:
        """Rebuild a model from its `init_kwargs` (as saved in checkpoints)."""
        return cls(**config, device=device, dtype=dtype)

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (B, L) at positions start.. -> (B, L, D)."""
        x = self.embedding(tokens)
        if self.position_embedding == "sinusoidal":
            positions = torch.arange(start, start + tokens.shape[-1], device=tokens.device)
            x = x + sinusoidal_positions(positions, x.shape[-1], dtype=x.dtype)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 -> logits (B, L, V)."""
        x = self._embed(tokens, 0)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

    def init_state(self, batch_size: int, device=None, dtype=None) -> LMState:
        device = device if device is not None else self.embedding.weight.device
        dtype = dtype if dtype is not None else self.embedding.weight.dtype
        return LMState(layers=[layer.init_state(batch_size, device=device, dtype=dtype) for layer in self.layers])

    def prefill(self, tokens: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """tokens (B, L) continuing from `state` -> (logits (B, L, V), new state)."""
        x = self._embed(tokens, state.position)
        new_states = []
        for layer, layer_state in zip(self.layers, state.layers, strict=True):
            x, layer_state = layer.prefill(x, layer_state)
            new_states.append(layer_state)
        return self.head(self.norm(x)), LMState(layers=new_states, position=state.position + tokens.shape[1])

    def step(self, token: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """token (B,) -> (logits (B, V), new state)."""
        x = self._embed(token[:, None], state.position)[:, 0]
        new_states = []
        for layer, layer_state in zip(self.layers, state.layers, strict=True):
            x, layer_state = layer.step(x, layer_state)
            new_states.append(layer_state)
        return self.head(self.norm(x)), LMState(layers=new_states, position=state.position + 1)

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return sum(layer.state_nbytes(batch_size, seq_len, dtype) for layer in self.layers)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prefill `prompt` (B, T) once, then sample `max_new_tokens` through the recurrent path.

        temperature=0 is greedy decoding. Returns (B, T + max_new_tokens).
        """
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must be (B, T) with T >= 1, got shape {tuple(prompt.shape)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        state = self.init_state(prompt.shape[0])
        logits, state = self.prefill(prompt, state)
        logits = logits[:, -1]
        generated = []
        for index in range(max_new_tokens):
            token = _sample(logits, temperature, top_k, generator)
            generated.append(token)
            if index + 1 < max_new_tokens:
                logits, state = self.step(token, state)
        if not generated:
            return prompt
        return torch.cat([prompt, torch.stack(generated, dim=1)], dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        threshold = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
