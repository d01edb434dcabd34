"""Which compute backends exist here, and one-time notices saying which one runs.

Mixers choose an algorithm through a config field (`scan="auto|compiled|chunked|sequential"`);
"auto" asks the functions below. Nothing here changes behaviour by environment variables, and
nothing is imported or compiled at import time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

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


def load_cpp_extension(name: str, source: str, extra_cflags: tuple[str, ...] = ()):
    """Build (once per machine, cached by torch in its extension directory) and import the C++
    extension `name` from the file `source`; returns the module, or raises RuntimeError naming
    why it cannot be built here. Called on first use, never at import time."""
    if name in _EXTENSIONS:
        return _EXTENSIONS[name]
    if name in _EXTENSION_ERRORS:
        raise RuntimeError(_EXTENSION_ERRORS[name])
    if not cpp_compiler_available():
        _EXTENSION_ERRORS[name] = "no C++ compiler (c++ or g++) on PATH"
        raise RuntimeError(_EXTENSION_ERRORS[name])
    from torch.utils.cpp_extension import load

    cflags = ["-O3", "-fopenmp", *extra_cflags]
    # The build folder is named after the source, the headers beside it and the flags, so two
    # versions of the kernel (an upgrade, two checkouts) never load each other's binary from
    # torch's shared cache.
    folder = Path(source).parent
    hashed = [Path(source), *sorted(folder.glob("*.h"))]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in hashed) + " ".join(cflags).encode()).hexdigest()[:12]
    try:
        module = load(name=f"{name}_{digest}", sources=[source], extra_cflags=cflags,
                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # the build's own message says what failed (compiler, headers, ninja)
        _EXTENSION_ERRORS[name] = f"building the C++ extension {name!r} failed: {str(error).strip()[-500:]}"
        raise RuntimeError(_EXTENSION_ERRORS[name]) from error
    _EXTENSIONS[name] = module
    return module


def cpp_extension_usable(name: str, source: str, extra_cflags: tuple[str, ...] = ()) -> tuple[bool, str]:
    """(True, "") when `load_cpp_extension` succeeds here (building the extension if needed), else
    (False, the reason)."""
    try:
        load_cpp_extension(name, source, extra_cflags)
    except RuntimeError as error:
        return False, str(error)
    return True, ""


def compiled_or_chunked(op: str, argument: str, requested: str, device: torch.device,
                        usable: Callable[[], tuple[bool, str]], fallback: str = "chunked") -> str:
    """The CPU dispatch every op with a compiled kernel and an eager fallback path shares, for
    `requested` "auto" or "compiled" (`argument` is the op's keyword, e.g. "scan"): "compiled" on
    CPU where `usable()` says the kernel loads, else `fallback` (the op's name for its eager path,
    "chunked" for the scans) with a one-time notice saying why. An explicit "compiled" that cannot
    run raises, naming the reason."""
    label = "eager chunked" if fallback == "chunked" else fallback
    if device.type != "cpu":
        if requested == "compiled":
            raise ValueError(f"{op}: {argument}='compiled' is a CPU kernel; inputs are on {device}")
        notify_once(f"{op}:{fallback}:{device.type}", f"{op} on {device.type} runs the {label} PyTorch path")
        return fallback
    ok, reason = usable()
    if ok:
        notify_once(f"{op}:compiled", f"{op} runs the compiled C++ CPU kernel")
        return "compiled"
    if requested == "compiled":
        raise RuntimeError(f"{op}: {argument}='compiled' was requested but the kernel is unavailable: {reason}")
    notify_once(f"{op}:{fallback}", f"{op} runs the {label} PyTorch path ({reason})")
    return fallback
