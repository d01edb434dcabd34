"""The reference implementations the tests compare against, found once for every test file.

They are installed by the README's test command (`pip install --no-deps -r requirements-reference.txt`,
and transformers / safetensors through the `dev` extra). A test that needs one and does not find it
fails, naming the install command: a comparison silently skipped is a comparison that did not happen.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

INSTALL = "pip install --no-deps -r requirements-reference.txt (the README's test command does)"


def fla_root() -> Path:
    """flash-linear-attention's `fla` folder (fla-core + flash-linear-attention 0.6.0), without importing
    `fla` itself, which would pull triton."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"fla-core==0.6.0 is not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_fla_file(relative: str) -> ModuleType:
    """A pure-PyTorch file of fla (an ops/*/naive.py), loaded by path."""
    path = fla_root() / relative
    if not path.exists():
        pytest.fail(f"fla/{relative} not found: {INSTALL}")
    spec = importlib.util.spec_from_file_location(f"fla_ref_{relative.replace('/', '_')[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # plain torch + einops
    return module


def fla_layer_source(name: str) -> str:
    """The text of fla/layers/<name> (its classes import triton, so tests read, not import, them)."""
    path = fla_root() / "layers" / name
    if not path.exists():
        pytest.fail(f"fla/layers/{name} not found: flash-linear-attention==0.6.0 is not installed: {INSTALL}")
    return path.read_text()


def require(module: str) -> ModuleType:
    """Import a reference package (transformers, torchscale's retention, ...) or fail naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        pytest.fail(f"{module} is needed by this comparison and does not import ({error}): {INSTALL}")
