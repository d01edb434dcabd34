"""The SequenceMixer contract and the state types every mixer shares.

Legend: B batch, L length, D model width.

A mixer maps (B, L, D) -> (B, L, D) causally and offers two ways to compute the same function:

    y = mixer(x)                                  parallel path (training)
    state = mixer.init_state(B, device=, dtype=)
    y, state = mixer.prefill(x, state)            parallel over a chunk, continuing from `state`
    y_t, state = mixer.step(x_t, state)           recurrent path, one token: (B, D) -> (B, D)

`forward(x) == prefill(x, init_state)[0] == stack(step(x_t))` to float32 tolerance; the contract
suite in tests/test_contract.py holds every registered mixer to it (docs/contract.md).

The rest of the contract, declared here once:
- `init_state(batch_size, device=None, dtype=None)`: None means the device / dtype of the mixer's
  own parameters (`state_factory`).
- `step` / `prefill` call `check_state` first: a state of another type (another mixer's), another
  batch size or an unusable dtype raises ValueError naming the mismatch; `check_input` rejects
  other shapes and empty sequences.
- `state_nbytes(batch_size, seq_len, dtype)`, `flops_per_token(seq_len)` and
  `describe_paths(device)` are the accounting the benchmarks and `seqarch list` read.
- Algorithm choice is the config field `backend`, passed through to the op, which resolves it.
- Stack position: a mixer whose initialisation depends on where it sits in a model (RWKV's) declares
  the config fields `layer_id: int = 0` and `n_layers: int = 1` (STACK_POSITION_FIELDS, checked by
  `check_stack_position`); SeqLM fills them per layer with the block index and the model's depth
  unless the layer's config gives them (`takes_stack_position`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype` (for `state_nbytes`, without allocating)."""
    return torch.empty((), dtype=dtype).element_size()


def complex_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The complex dtype that follows a real precision: complex128 for float64, else complex64."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _tensor_nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, MixerState):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_tensor_nbytes(item) for item in value)
    return 0


def _cast(value: Any, device, dtype):
    if isinstance(value, torch.Tensor):
        if dtype is None or not value.is_floating_point() and not value.is_complex():
            return value.to(device=device)
        if value.is_complex():
            return value.to(device=device, dtype=complex_dtype(dtype))
        return value.to(device=device, dtype=dtype)
    if isinstance(value, MixerState):
        return value.to(device, dtype)
    if isinstance(value, list):
        return [_cast(item, device, dtype) for item in value]
    if isinstance(value, tuple):
        return tuple(_cast(item, device, dtype) for item in value)
    return value


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, MixerState):
        for field in dataclasses.fields(value):
            found = _first_tensor(getattr(value, field.name))
            if found is not None:
                return found
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


@dataclasses.dataclass
class MixerState:
    """Base of every recurrent state: a dataclass whose fields are tensors (batch first),
    nested states, lists of those, or plain Python numbers (e.g. a position counter).

    Complex tensors keep their complex type under `to(dtype=float...)`: they follow the
    precision (complex64 for float32/16, complex128 for float64). Integer tensors keep theirs.
    """

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(_tensor_nbytes(getattr(self, f.name)) for f in dataclasses.fields(self))

    @property
    def batch_size(self) -> int:
        tensor = _first_tensor(self)
        if tensor is None:
            raise ValueError(f"{type(self).__name__} holds no tensor, so it has no batch size")
        return tensor.shape[0]

    def to(self, device=None, dtype=None):
        """A copy on `device` with floating tensors cast to `dtype` (None keeps each)."""
        return dataclasses.replace(
            self, **{f.name: _cast(getattr(self, f.name), device, dtype) for f in dataclasses.fields(self)}
        )


class SequenceMixer(nn.Module, ABC):
    """A causal (B, L, D) -> (B, L, D) map with a parallel and a recurrent path.

    Subclasses set `self.config` (their frozen dataclass) and `self.d_model`, and implement
    `forward`, `init_state`, `prefill`, `step`, `state_nbytes` and `flops_per_token`; mixers with a
    `backend` choice override `describe_paths`.
    """

    #: True when the state grows with the number of tokens seen (a full KV cache, Hyena's
    #: exact decoding); False for mixers whose state is constant in L. A mixer whose answer
    #: depends on its config or mode (attention windows, a distilled Hyena) overrides it with a
    #: property.
    state_grows_with_length: bool = False

    config: Any
    d_model: int

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Parallel path: x (B, L, D) -> y (B, L, D)."""

    @abstractmethod
    def init_state(self, batch_size: int, device=None, dtype=None) -> MixerState:
        """The state before any token (zeros, or an empty cache). `device` / `dtype` None: those of
        the mixer's parameters (see `state_factory`)."""

    @abstractmethod
    def prefill(self, x: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """Parallel over a chunk x (B, L, D) continuing from `state`; returns (y, new state)."""

    @abstractmethod
    def step(self, x_t: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """Recurrent path for one token x_t (B, D); returns (y_t (B, D), new state)."""

    @abstractmethod
    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state after `seq_len` tokens, computed without allocating."""

    @abstractmethod
    def flops_per_token(self, seq_len: int) -> int:
        """FLOPs of one decoding step at context `seq_len` beyond the mixer's nn.Linear weights (which
        seqarch.bench.accounting counts itself): the recurrence or attention over the cache, and
        weights held as Parameters."""

    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        """Which algorithm runs on `device` with this config, for `seqarch list` and notices.
        Mixers with a `backend` choice override it (asking their op); it never compiles anything."""
        return "PyTorch parallel path; recurrent step"

    def state_factory(self, device=None, dtype=None) -> dict[str, Any]:
        """{"device", "dtype"} for a new state: the given ones, else those of the mixer's parameters."""
        param = next(self.parameters(), None)
        if device is None and param is not None:
            device = param.device
        if dtype is None:
            dtype = param.dtype if param is not None else torch.get_default_dtype()
        return {"device": device, "dtype": dtype}

    def own_mlp(self) -> nn.Module | None:
        """The channel mixer this family brings in place of the default MLP (RWKV's
        channel-mix), or None. A returned module follows the SequenceMixer contract."""
        return None

    def extra_repr(self) -> str:
        return repr(self.config)


def check_input(x: torch.Tensor, d_model: int, ndim: int, what: str) -> None:
    """Raise a clear ValueError when `x` is not (B, L, D) / (B, D) with D == d_model, or when a
    sequence (B, L, D) is empty (L = 0)."""
    shape = "(B, L, D)" if ndim == 3 else "(B, D)"
    if x.ndim != ndim or x.shape[-1] != d_model:
        raise ValueError(f"{what} expects {shape} with D={d_model}, got shape {tuple(x.shape)}")
    if ndim == 3 and x.shape[1] == 0:
        raise ValueError(f"{what} got an empty sequence (L = 0, shape {tuple(x.shape)}); pass at least one token")


def check_state(state: Any, expected_cls: type | tuple[type, ...], batch_size: int, what: str,
                complex_fields: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the mismatch when `state` cannot continue this mixer on a batch of
    `batch_size`: a state of another type (e.g. another mixer's), another batch size, a state
    tensor that is not floating point, or a field of `complex_fields` that is not complex."""
    expected = expected_cls if isinstance(expected_cls, tuple) else (expected_cls,)
    names = " or ".join(cls.__name__ for cls in expected)
    if not isinstance(state, expected):
        raise ValueError(f"{what} expects a {names} (from init_state), got {type(state).__name__}")
    if state.batch_size != batch_size:
        raise ValueError(f"{what}: the state holds a batch of {state.batch_size}, the input a batch of {batch_size}")
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if not isinstance(value, torch.Tensor):
            continue
        if field.name in complex_fields and not value.is_complex():
            raise ValueError(f"{what}: state field {field.name!r} must be complex, got {value.dtype}")
        if not (value.is_floating_point() or value.is_complex()):
            raise ValueError(f"{what}: state field {field.name!r} must be floating point, got {value.dtype}")


def check_positive(owner: str, **sizes: int | float | None) -> None:
    """Raise ValueError naming the first size that is given (not None) and not > 0."""
    for name, value in sizes.items():
        if value is not None and not value > 0:
            bound = ">= 1" if isinstance(value, int) else "> 0"
            raise ValueError(f"{owner}: {name} must be {bound}, got {value}")


STACK_POSITION_FIELDS = ("layer_id", "n_layers")  # the config fields of a mixer whose init depends on its depth


def takes_stack_position(config_cls: type) -> bool:
    """Whether `config_cls` declares both stack-position fields (SeqLM then fills them per layer)."""
    names = {field.name for field in dataclasses.fields(config_cls)}
    return all(name in names for name in STACK_POSITION_FIELDS)


def check_stack_position(owner: str, layer_id: int, n_layers: int) -> None:
    """Raise ValueError unless 0 <= layer_id < n_layers (a block index in a model of n_layers blocks)."""
    if n_layers < 1 or not 0 <= layer_id < n_layers:
        raise ValueError(f"{owner}: need 0 <= layer_id < n_layers, got layer_id={layer_id}, n_layers={n_layers}")
