"""seqarch.backends: the compiled-or-eager CPU dispatch that selective_scan, wkv6 and causal_conv1d
share (through each op's own `resolve_backend`), and `CompiledKernel`, the one object that builds,
caches and loads a C++ kernel."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import seqarch.backends as backends
import seqarch.ops.causal_conv1d as conv_module
import seqarch.ops.selective_scan as scan_module
import seqarch.ops.wkv as wkv_module
from seqarch.backends import CompiledKernel, renamed_keyword
from tests.compiled import FakeKernel

OPS = [(scan_module, "selective_scan", "chunked"), (wkv_module, "wkv6", "chunked"),
       (conv_module, "causal_conv1d", "parallel")]
IDS = ["selective_scan", "wkv6", "causal_conv1d"]
EAGER_LABEL = {"chunked": "eager chunked", "parallel": "parallel"}


@pytest.mark.parametrize(("module", "op", "fallback"), OPS, ids=IDS)
def test_auto_falls_back_to_eager_with_a_notice_and_explicit_compiled_raises(module, op, fallback, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(module, "KERNEL", FakeKernel(False, "no C++ compiler on PATH"))
    monkeypatch.setattr(backends, "notify_once", lambda key, message: print(message))
    assert module.resolve_backend("auto", "cpu") == fallback
    assert f"{op} runs the {EAGER_LABEL[fallback]} PyTorch path (no C++ compiler on PATH)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="backend='compiled' was requested but the kernel is unavailable: no C"):
        module.resolve_backend("compiled", "cpu")
    assert module.describe_backend("auto", "cpu") == f"backend=auto: {EAGER_LABEL[fallback]} PyTorch path"


@pytest.mark.parametrize(("module", "op", "fallback"), OPS, ids=IDS)
def test_usable_kernel_runs_on_cpu_and_other_devices_run_eager(module, op, fallback, monkeypatch):
    monkeypatch.setattr(module, "KERNEL", FakeKernel(True))
    monkeypatch.setattr(module, "cuda_kernels_usable", lambda name, device: False, raising=False)
    assert module.resolve_backend("auto", "cpu") == "compiled"
    assert module.resolve_backend("compiled", "cpu") == "compiled"
    assert module.resolve_backend(fallback, "cpu") == fallback
    assert module.resolve_backend("auto", "meta") == fallback
    with pytest.raises(ValueError, match=f"{op}: backend='compiled' is a CPU kernel; inputs are on meta"):
        module.resolve_backend("compiled", "meta")
    assert module.describe_backend("auto", "cpu").startswith("backend=auto: compiled C++ CPU kernel")
    with pytest.raises(ValueError, match=f"{op}: backend='fast'; valid: 'auto', 'compiled'"):
        module.resolve_backend("fast", "cpu")


def test_cache_name_changes_with_torch_version_and_cxx_abi(monkeypatch):
    kernel = scan_module.KERNEL
    name = kernel.cache_name()
    assert name.startswith("seqarch_selective_scan_") and name == kernel.cache_name()
    monkeypatch.setattr(torch, "__version__", "9.9.9+other")
    other_torch = kernel.cache_name()
    assert other_torch != name
    monkeypatch.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI)
    assert kernel.cache_name() not in (name, other_torch)


def test_cache_name_changes_with_python_abi_and_flags(monkeypatch):
    kernel = wkv_module.KERNEL
    name = kernel.cache_name()
    assert kernel.variant("portable", "-DX").cache_name() != name
    monkeypatch.setattr(sys.implementation, "cache_tag", "cpython-399")
    assert kernel.cache_name() != name


def test_load_says_it_is_building_and_reports_a_failed_build(monkeypatch, tmp_path, capsys):
    """A kernel whose source does not compile: one line on stderr while building, then a RuntimeError
    naming the failure; `usable()` reports the same reason without raising."""
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    monkeypatch.setattr(backends, "_build_directory", lambda name: tmp_path / name)
    monkeypatch.setattr(backends, "cpp_compiler_available", lambda: True)

    def failing_load(**kwargs):
        raise RuntimeError("error: expected unqualified-id")

    monkeypatch.setattr("torch.utils.cpp_extension.load", failing_load)
    kernel = CompiledKernel("seqarch_broken_test", str(source))
    with pytest.raises(RuntimeError, match="building the C\\+\\+ extension 'seqarch_broken_test' failed: error"):
        kernel.load()
    assert "seqarch: building the compiled seqarch_broken_test kernel (about a minute, once)..." in \
        capsys.readouterr().err
    ok, reason = kernel.usable()
    assert not ok and "expected unqualified-id" in reason


def test_no_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "cpp_compiler_available", lambda: False)
    (tmp_path / "k.cpp").write_text("")
    assert CompiledKernel("seqarch_nocompiler_test", str(tmp_path / "k.cpp")).usable() == (
        False, "no C++ compiler (c++ or g++) on PATH")


def test_renamed_keyword_maps_old_values_and_warns():
    with pytest.warns(DeprecationWarning, match="op: the keyword mode= is deprecated.*use backend='chunked'"):
        assert renamed_keyword("op", "auto", "mode", "chunkwise", {"chunkwise": "chunked"}) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed_keyword("op", "parallel", "mode", None) == "parallel"
