"""The compiled-or-eager CPU dispatch that selective_scan, wkv6 and causal_conv1d share
(seqarch.backends), through each op's own resolver: the kernel where it loads, else the op's eager
path with a notice naming why."""

from __future__ import annotations

import pytest

import seqarch.backends as backends
import seqarch.ops.causal_conv1d as conv_module
import seqarch.ops.selective_scan as scan_module
import seqarch.ops.wkv as wkv_module

OPS = [(scan_module, scan_module.resolve_scan, "selective_scan", "scan", "chunked"),
       (wkv_module, wkv_module.resolve_path, "wkv6", "path", "chunked"),
       (conv_module, conv_module.resolve_path, "causal_conv1d", "path", "eager")]
IDS = ["selective_scan", "wkv6", "causal_conv1d"]
EAGER_LABEL = {"chunked": "eager chunked", "eager": "eager"}


@pytest.mark.parametrize(("module", "resolve", "op", "argument", "fallback"), OPS, ids=IDS)
def test_auto_falls_back_to_eager_with_a_notice_and_explicit_compiled_raises(module, resolve, op, argument, fallback,
                                                                            monkeypatch, capsys):
    monkeypatch.setattr(module, "compiled_kernel_usable", lambda: (False, "no C++ compiler on PATH"))
    monkeypatch.setattr(backends, "notify_once", lambda key, message: print(message))
    assert resolve("auto", "cpu") == fallback
    assert f"{op} runs the {EAGER_LABEL[fallback]} PyTorch path (no C++ compiler on PATH)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=f"{argument}='compiled' was requested but the kernel is unavailable: no C"):
        resolve("compiled", "cpu")


@pytest.mark.parametrize(("module", "resolve", "op", "argument", "fallback"), OPS, ids=IDS)
def test_usable_kernel_runs_on_cpu_and_other_devices_run_eager(module, resolve, op, argument, fallback, monkeypatch):
    monkeypatch.setattr(module, "compiled_kernel_usable", lambda: (True, ""))
    monkeypatch.setattr(scan_module, "cuda_kernels_usable", lambda name, device: False)
    assert resolve("auto", "cpu") == "compiled"
    assert resolve("compiled", "cpu") == "compiled"
    assert resolve(fallback, "cpu") == fallback
    assert resolve("auto", "meta") == fallback
    with pytest.raises(ValueError, match=f"{op}: {argument}='compiled' is a CPU kernel; inputs are on meta"):
        resolve("compiled", "meta")
