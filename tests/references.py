"""The reference implementations the tests compare against, found once for every test file.

They are installed by the README's test command (see requirements-reference.txt for its install line,
and transformers / safetensors through the `dev` extra). A test that needs one and does not find it
fails, naming the install command: a comparison silently skipped is a comparison that did not happen.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

INSTALL = ("MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation "
           "-r requirements-reference.txt (the README's test command does)")


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


@functools.cache
def mamba_ssm_root() -> Path:
    """mamba-ssm's package folder (2.3.2.post1, installed without its CUDA build), without importing it:
    its package imports the CUDA / triton kernels. Found once: a test's placeholder `mamba_ssm` has no spec."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"mamba-ssm is not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_mamba_ssm_file(relative: str, monkeypatch, placeholders: dict[str, dict] | None = None) -> ModuleType:
    """A file of mamba-ssm (e.g. "modules/mamba_simple.py") loaded by path. Each module it imports that needs
    CUDA or triton is replaced, for this test only, by an empty module holding `placeholders[name]`; the
    mamba_ssm packages on the way are empty too, so importing them runs nothing."""
    import sys
    import types

    path = mamba_ssm_root() / relative
    if not path.exists():
        pytest.fail(f"mamba_ssm/{relative} not found: {INSTALL}")
    placeholders = placeholders or {}
    packages = {".".join(name.split(".")[:depth]) for name in placeholders for depth in range(1, name.count(".") + 1)}
    for name in sorted(packages | {"mamba_ssm"}) + sorted(placeholders):
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so its submodules resolve from sys.modules
        module.__dict__.update(placeholders.get(name, {}))
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(f"mamba_ssm_ref_{relative.replace('/', '_')[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
