"""SeqLM: a language model over any registered mixer, or a per-layer hybrid of them.

    tokens (B, L) -> embedding -> n_layers x Block(mixer, MLP) -> RMSNorm -> head -> logits (B, L, V)

`mixer` is a registry name (every layer the same) or a list with one name per layer, e.g.
`["mamba"] * 3 + ["attention"]` repeated for a Jamba-style hybrid. Keyword arguments configure
the mixers: a plain key (`d_state=16`) goes to every layer, a key that names a mixer takes a dict
for the layers of that kind only (`attention={"n_heads": 4}`), and `layer_overrides` takes a dict per
layer index for single layers, applied last (`layer_overrides={2: {"knn_top_k": 32}}`: kNN memory on
layer 2 only, as the Memorizing Transformer does).

Layers pass values on within one call through a `context` dict (seqarch.models.block): RWKV-7's first
layer leaves its value there for the value residual of the later rwkv7 layers, as RWKV-LM's model.

A mixer whose initialisation depends on its depth (RWKV-6, RWKV-7) declares the config fields `layer_id`
and `n_layers` (seqarch.mixers.base.STACK_POSITION_FIELDS); SeqLM sets them to the block's index and the
model's depth, counted over the whole stack as RWKV-LM counts its blocks (in a hybrid, an rwkv layer's
position among all layers, not among the rwkv ones), unless the layer's config gives them.

`position_embedding="sinusoidal"` adds Vaswani et al.'s absolute position table to the token
embedding (positions counted from the first prefilled token, carried in the state); "none" leaves
positions to the mixers (RoPE / ALiBi inside attention, or none at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqarch.mixers.base import MixerState, takes_stack_position
from seqarch.models.block import Block
from seqarch.positional import sinusoidal_positions
from seqarch.registry import build_mixer, get_entry, list_mixers

POSITION_EMBEDDINGS = ("none", "sinusoidal")
# Mixers that compute in complex numbers: torch has no complex bfloat16, and complex float16 lacks the ops
# they need, so they run with float32 / float64 weights (autocast, e.g. bf16-mixed, keeps weights float32).
COMPLEX_MIXERS = ("s4d",)


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


def _thread_value_residual(names: list[str], configs: list[dict]) -> None:
    """RWKV-7's value residual across the stack, as RWKV-LM's model: the first rwkv7 layer produces
    v_first, every later one mixes towards it (`value_residual=True`), unless its config sets the key."""
    rwkv7_layers = [index for index, name in enumerate(names) if name == "rwkv7"]
    for index in rwkv7_layers[1:]:
        configs[index].setdefault("value_residual", True)


def _thread_stack_position(names: list[str], configs: list[dict]) -> None:
    """Each layer's place in the stack, for mixers whose init depends on it (RWKV-LM's layer_id / n_layer): block
    index and model depth over the whole stack, unless the layer's config sets the key."""
    for index, name in enumerate(names):
        if takes_stack_position(get_entry(name).config_cls):
            configs[index].setdefault("layer_id", index)
            configs[index].setdefault("n_layers", len(names))


class SeqLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, mixer: str | list[str] = "attention",
                 mlp: bool = True, tie_embeddings: bool = True, norm_eps: float = 1e-5,
                 position_embedding: str = "none", layer_overrides: dict | None = None,
                 mlp_hidden: int | None = None, mlp_bias: bool = False,
                 device=None, dtype=None, **mixer_kwargs: Any):
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SeqLM: {key} must be an int >= 1, got {value!r}")
        names = [mixer] * n_layers if isinstance(mixer, str) else list(mixer)
        if len(names) != n_layers:
            raise ValueError(f"mixer lists {len(names)} layers but n_layers={n_layers}")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding={position_embedding!r}; valid: "
                             f"{', '.join(map(repr, POSITION_EMBEDDINGS))}")
        if position_embedding == "sinusoidal" and d_model % 2:
            raise ValueError(f"position_embedding='sinusoidal' needs an even d_model, got {d_model}")
        runnable = device is None or torch.device(device).type != "meta"  # meta models are for accounting only
        if runnable and dtype in (torch.float16, torch.bfloat16) and set(names) & set(COMPLEX_MIXERS):
            raise ValueError(f"SeqLM: mixer {sorted(set(names) & set(COMPLEX_MIXERS))[0]!r} computes in complex "
                             f"numbers and cannot hold {dtype} weights; use float32 or float64 (or autocast)")
        per_layer = _layer_overrides(layer_overrides, n_layers)
        registered = set(list_mixers())
        shared = {key: value for key, value in mixer_kwargs.items() if key not in registered}
        for key, value in mixer_kwargs.items():
            if key in registered and not isinstance(value, dict):
                raise ValueError(f"per-mixer settings {key}=... must be a dict of config keys, got {value!r}")
        self.init_kwargs = {"vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers, "mixer": mixer,
                            "mlp": mlp, "tie_embeddings": tie_embeddings, "norm_eps": norm_eps,
                            "position_embedding": position_embedding, "layer_overrides": layer_overrides,
                            **({"mlp_hidden": mlp_hidden} if mlp_hidden is not None else {}),
                            **({"mlp_bias": mlp_bias} if mlp_bias else {}), **mixer_kwargs}
        self.layer_names = names
        self.position_embedding = position_embedding
        # Debug switch (not saved with the model): raise on a non-finite activation after any layer, naming
        # the first layer that produced one. Parallel paths can spread a NaN to earlier positions
        # (docs/contract.md, "Non-finite values"), so the layer is the reliable clue, not the position.
        self.check_finite = False
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(vocab_size, d_model, **factory)
        configs = [{**shared, **mixer_kwargs.get(name, {}), **per_layer.get(index, {})}
                   for index, name in enumerate(names)]
        _thread_value_residual(names, configs)
        _thread_stack_position(names, configs)
        # The mixer is built first and wrapped here (not through build_block), so a mixer config key that shares
        # a name with a block argument (Mamba-2's own `norm_eps`) reaches the mixer instead of colliding.
        self.layers = nn.ModuleList(
            Block(build_mixer(name, d_model=d_model, **factory, **config),
                  mlp=mlp, norm_eps=norm_eps, mlp_hidden=mlp_hidden, mlp_bias=mlp_bias, **factory)
            for name, config in zip(names, configs, strict=True)
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

    @classmethod
    def from_hf(cls, path, dtype: torch.dtype = torch.float32, device=None) -> SeqLM:
        """Load a Hugging Face save_pretrained directory (Llama, Mistral, Mamba, Mamba-2); see seqarch.models.hf."""
        from seqarch.models.hf import from_hf

        return from_hf(path, dtype=dtype, device=device)

    def to_hf(self, path):
        """Write this model as a Hugging Face save_pretrained directory; see seqarch.models.hf."""
        from seqarch.models.hf import to_hf

        return to_hf(self, path)

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"SeqLM: tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)][0].item()
            raise ValueError(f"SeqLM: token id {bad} is out of the vocabulary; valid ids are 0..{self.vocab_size - 1}")

    def _checked(self, x: torch.Tensor, where: str) -> torch.Tensor:
        if self.check_finite and not torch.isfinite(x).all():
            positions = (~torch.isfinite(x)).any(-1).any(0).nonzero().flatten().tolist() if x.ndim == 3 else []
            at = f" at positions {positions[:8]}{'...' if len(positions) > 8 else ''}" if positions else ""
            raise FloatingPointError(f"SeqLM: non-finite activation after {where}{at} (check_finite=True)")
        return x

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (B, L) at positions start.. -> (B, L, D)."""
        self._check_tokens(tokens)
        x = self.embedding(tokens)
        if self.position_embedding == "sinusoidal":
            positions = torch.arange(start, start + tokens.shape[-1], device=tokens.device)
            x = x + sinusoidal_positions(positions, x.shape[-1], dtype=x.dtype)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 -> logits (B, L, V)."""
        x = self._checked(self._embed(tokens, 0), "the embedding")
        context = {}  # what layers pass on within this call (RWKV-7's v_first); see seqarch.models.block
        for index, layer in enumerate(self.layers):
            x = self._checked(layer(x, context=context), f"layer {index} ({self.layer_names[index]})")
        return self.head(self.norm(x))

    def init_state(self, batch_size: int, device=None, dtype=None) -> LMState:
        device = device if device is not None else self.embedding.weight.device
        dtype = dtype if dtype is not None else self.embedding.weight.dtype
        return LMState(layers=[layer.init_state(batch_size, device=device, dtype=dtype) for layer in self.layers])

    def prefill(self, tokens: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """tokens (B, L) continuing from `state` -> (logits (B, L, V), new state)."""
        x = self._checked(self._embed(tokens, state.position), "the embedding")
        new_states, context = [], {}
        for index, (layer, layer_state) in enumerate(zip(self.layers, state.layers, strict=True)):
            x, layer_state = layer.prefill(x, layer_state, context=context)
            self._checked(x, f"layer {index} ({self.layer_names[index]})")
            new_states.append(layer_state)
        return self.head(self.norm(x)), LMState(layers=new_states, position=state.position + tokens.shape[1])

    def step(self, token: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """token (B,) -> (logits (B, V), new state)."""
        x = self._checked(self._embed(token[:, None], state.position)[:, 0], "the embedding")
        new_states, context = [], {}
        for index, (layer, layer_state) in enumerate(zip(self.layers, state.layers, strict=True)):
            x, layer_state = layer.step(x, layer_state, context=context)
            self._checked(x, f"layer {index} ({self.layer_names[index]})")
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
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
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
