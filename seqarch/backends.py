"""Which compute backends exist here, and one-time notices saying which one runs.

Every op module (seqarch/ops) owns the choice of its kernel: one entry point with a `backend=`
switch and one `resolve_backend(backend, device)` saying which path runs; mixers pass their config's
`backend` through. The pieces those resolvers share live here: the compiled-kernel object
(`CompiledKernel`), the compiled-or-eager CPU dispatch, one-time notices. Nothing here changes
behaviour by environment variables, and nothing is imported or compiled at import time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from seqarch.configs import outside_stacklevel

_NOTICES_SHOWN: set[str] = set()


def module_available(name: str) -> bool:
    """True when `name` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_kernels_usable(module_name: str, device: torch.device | str) -> bool:
    """True when `device` is a CUDA device, CUDA works, and `module_name` (e.g. "mamba_ssm",
    "causal_conv1d") is installed: the only case where the optional CUDA kernels are used."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and module_available(module_name)


@cache
def cpp_compiler_available() -> bool:
    """True when a C++ compiler for `torch.utils.cpp_extension` is on PATH."""
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def notify_once(key: str, message: str) -> None:
    """Print `message` to stderr the first time `key` is seen in this process."""
    if key not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(key)
        print(f"seqarch: {message}", file=sys.stderr)


_EXTENSIONS: dict[str, object] = {}
_EXTENSION_ERRORS: dict[str, str] = {}


def _build_directory(name: str) -> Path:
    """torch's folder for extension `name` (its cache root, keyed by Python and CUDA versions)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@cache
def _sources_hash(source: str):
    """The sha256 state after a kernel's source and every header beside it, read once per process."""
    folder = Path(source).parent
    hashed = [Path(source), *sorted(folder.glob("*.h"))]
    return hashlib.sha256(b"".join(path.read_bytes() for path in hashed))


@dataclass(frozen=True)
class CompiledKernel:
    """One C++ CPU kernel of seqarch/ops/csrc, built on first use and cached on disk.

    `name` is the extension's name, `source` the .cpp file, `flags` extra compiler flags. The cache
    folder (`cache_name()`) is keyed by everything that makes a binary unusable elsewhere: the
    source and the headers beside it, the flags, the torch version, the Python ABI tag and the C++
    ABI, so two installs or two torch versions on one machine never load each other's binary.
    Nothing is built at import time: `load()` builds (printing one line while it does) or loads.
    """

    name: str
    source: str
    flags: tuple[str, ...] = ()

    def variant(self, suffix: str, *extra_flags: str) -> CompiledKernel:
        """The same kernel built under another name with more flags (e.g. a portable build)."""
        return CompiledKernel(f"{self.name}_{suffix}", self.source, (*self.flags, *extra_flags))

    @property
    def cflags(self) -> list[str]:
        return ["-O3", "-fopenmp", *self.flags]

    def cache_name(self) -> str:
        """The extension's versioned name: `name` plus a digest of source, headers, flags and ABI (the
        files are read once per process: `load()` runs on every kernel call, decode steps too)."""
        abi = (f"torch={torch.__version__};python={sys.implementation.cache_tag}-{sysconfig.get_config_var('SOABI')};"
               f"cxx11abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)};flags={' '.join(self.cflags)}")
        state = _sources_hash(self.source).copy()
        state.update(abi.encode())
        digest = state.hexdigest()[:12]
        return f"{self.name}_{digest}"

    def available(self) -> bool:
        """True when a compiler is present, so `load()` can try; never builds (for descriptions)."""
        return cpp_compiler_available()

    def load(self):
        """The extension module, built on first call and cached (per process and on disk); raises
        RuntimeError naming why it cannot be built here."""
        key = self.cache_name()
        if key in _EXTENSIONS:
            return _EXTENSIONS[key]
        if key in _EXTENSION_ERRORS:
            raise RuntimeError(_EXTENSION_ERRORS[key])
        if not cpp_compiler_available():
            _EXTENSION_ERRORS[key] = "no C++ compiler (c++ or g++) on PATH"
            raise RuntimeError(_EXTENSION_ERRORS[key])
        from torch.utils.cpp_extension import load

        if not any(_build_directory(key).glob(f"{key}*.so")):
            print(f"seqarch: building the compiled {self.name} kernel (about a minute, once)...", file=sys.stderr)
        try:
            module = load(name=key, sources=[self.source], extra_cflags=self.cflags, extra_ldflags=["-fopenmp"],
                          verbose=False)
        except Exception as error:  # the build's own message says what failed (compiler, headers, ninja)
            _EXTENSION_ERRORS[key] = f"building the C++ extension {self.name!r} failed: {str(error).strip()[-500:]}"
            raise RuntimeError(_EXTENSION_ERRORS[key]) from error
        _EXTENSIONS[key] = module
        return module

    def usable(self) -> tuple[bool, str]:
        """(True, "") when `load()` succeeds here (building the extension if needed), else (False, why)."""
        try:
            self.load()
        except RuntimeError as error:
            return False, str(error)
        return True, ""


class _CheckpointedKernel(torch.autograd.Function):
    """A compiled recurrence whose forward stores the state every `chunk` tokens and whose backward
    replays each chunk from its checkpoint (the delta rule, generalized delta rule and wkv6 kernels).

    The kernel module's contract: `forward(*inputs, initial_state, scale, chunk, store_checkpoints) ->
    (out, final_state, checkpoints)` and `backward(*inputs, scale, checkpoints, dout, dfinal_state, chunk)
    -> (*d_inputs, d_initial_state)`; an input may be None (its gradient is then ignored)."""

    @staticmethod
    def forward(ctx, kernel: CompiledKernel, scale: float, chunk: int, initial_state, *inputs):
        needs_backward = any(ctx.needs_input_grad[3:])
        out, final_state, checkpoints = kernel.load().forward(*inputs, initial_state, scale, chunk, needs_backward)
        if needs_backward:
            ctx.save_for_backward(*inputs, checkpoints)
        ctx.kernel, ctx.scale, ctx.chunk, ctx.has_initial_state = kernel, scale, chunk, initial_state is not None
        ctx.out_shape = out.shape
        ctx.set_materialize_grads(False)
        return out, final_state

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal_state):
        *inputs, checkpoints = ctx.saved_tensors
        dout = checkpoints.new_zeros(ctx.out_shape) if dout is None else dout.contiguous()
        dfinal_state = None if dfinal_state is None else dfinal_state.contiguous()
        *grads, dinitial = ctx.kernel.load().backward(*inputs, ctx.scale, checkpoints, dout, dfinal_state, ctx.chunk)
        grads = [None if x is None else grad for x, grad in zip(inputs, grads, strict=True)]
        return None, None, None, (dinitial if ctx.has_initial_state else None), *grads


def run_checkpointed_kernel(kernel: CompiledKernel, inputs: tuple[torch.Tensor | None, ...],
                            initial_state: torch.Tensor | None, scale: float,
                            chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel` (see `_CheckpointedKernel`) on contiguous `inputs` of one compute dtype, differentiable
    in every input and `initial_state`: -> (out, final_state). Checkpoints are stored only when a
    gradient is needed."""
    return _CheckpointedKernel.apply(kernel, float(scale), chunk, initial_state, *inputs)


def check_backend(op: str, backend: str, valid: tuple[str, ...]) -> None:
    """Raise ValueError naming the valid values when `backend` is not one of `valid`."""
    if backend not in valid:
        raise ValueError(f"{op}: backend={backend!r}; valid: {', '.join(map(repr, valid))}")


def renamed_keyword(op: str, backend: str, old_name: str, old_value: str | None,
                    values: dict[str, str] | None = None) -> str:
    """The backend an op was asked for when called with its deprecated keyword `old_name` (e.g.
    selective_scan's `scan=`): warns once per call with a DeprecationWarning naming `backend=`, maps
    old values through `values` (e.g. retention's "chunkwise" -> "chunked"). Without the old
    keyword, returns `backend` unchanged."""
    if old_value is None:
        return backend
    new_value = (values or {}).get(old_value, old_value)
    warnings.warn(f"{op}: the keyword {old_name}= is deprecated and will be removed in the next release; use "
                  f"backend={new_value!r}", DeprecationWarning, stacklevel=outside_stacklevel())
    return new_value


def compiled_or_eager(op: str, requested: str, device: torch.device, kernel: CompiledKernel,
                      fallback: str = "chunked") -> str:
    """The CPU dispatch every op with a compiled kernel and an eager fallback path shares, for
    `requested` backend "auto" or "compiled": "compiled" on CPU where `kernel.usable()` says the
    kernel loads, else `fallback` (the op's name for its eager path, "chunked" for the scans) with a
    one-time notice saying why. An explicit "compiled" that cannot run raises, naming the reason."""
    label = "eager chunked" if fallback == "chunked" else fallback
    if device.type != "cpu":
        if requested == "compiled":
            raise ValueError(f"{op}: backend='compiled' is a CPU kernel; inputs are on {device}")
        notify_once(f"{op}:{fallback}:{device.type}", f"{op} on {device.type} runs the {label} PyTorch path")
        return fallback
    ok, reason = kernel.usable()
    if ok:
        notify_once(f"{op}:compiled", f"{op} runs the compiled C++ CPU kernel")
        return "compiled"
    if requested == "compiled":
        raise RuntimeError(f"{op}: backend='compiled' was requested but the kernel is unavailable: {reason}")
    notify_once(f"{op}:{fallback}", f"{op} runs the {label} PyTorch path ({reason})")
    return fallback


def describe_compiled_or_eager(requested: str, device: torch.device | str, kernel: CompiledKernel,
                               eager: str) -> str:
    """What `compiled_or_eager` would pick, in words, without building anything (for `seqarch list`)."""
    if requested != "auto":
        return f"backend={requested}"
    if torch.device(device).type == "cpu" and kernel.available():
        return f"backend=auto: compiled C++ CPU kernel (built on first use, cached); {eager} if the build fails"
    return f"backend=auto: {eager} PyTorch path"


def load_cpp_extension(name: str, source: str, extra_cflags: tuple[str, ...] = ()):
    """Deprecated (removed in the next release): `CompiledKernel(name, source, extra_cflags).load()`."""
    warnings.warn("seqarch.backends.load_cpp_extension is deprecated; use CompiledKernel(name, source, flags).load()",
                  DeprecationWarning, stacklevel=2)
    return CompiledKernel(name, source, tuple(extra_cflags)).load()
