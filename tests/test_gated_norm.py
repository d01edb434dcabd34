"""The gated group RMSNorm op (Mamba-2's output norm): its reference against the definition written
by hand, the compiled kernel and the eager path against the reference forward and backward, the
layouts the mixer hands it, bad input, and which backend runs."""

from __future__ import annotations

import pytest
import torch

import seqarch.ops.gated_norm as norm_module
from seqarch import backends
from seqarch.ops.gated_norm import gated_rms_norm, gated_rms_norm_ref, resolve_backend
from tests.compiled import FakeKernel, compiled, needs_compiler
from tests.references import load_mamba_ssm_file
from tests.tolerance import assert_close

BACKENDS = [compiled("compiled"), "eager"]


def make_inputs(rows: int, channels: int, dtype, z_scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, channels, generator=gen, dtype=dtype)
    z = torch.randn(2, rows, channels, generator=gen, dtype=dtype) * z_scale
    weight = 1 + 0.5 * torch.randn(channels, generator=gen, dtype=dtype)
    return x, z, weight


def run_with_grads(fn, x, z, weight, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, z, weight)]
    out = fn(*leaves, **kwargs)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    (out * cotangent).sum().backward()
    return out, [None if t is None else t.grad for t in leaves]


def test_reference_is_the_definition():
    """Each group of C channels divided by its own root mean square, written out channel by channel."""
    x, z, weight = make_inputs(3, 12, torch.float64)
    out = gated_rms_norm_ref(x, z, weight, eps=1e-5, group_size=4)
    gated = x * z / (1 + torch.exp(-z))
    for group in range(3):
        cols = slice(4 * group, 4 * group + 4)
        rms = torch.sqrt((gated[..., cols] ** 2).sum(-1, keepdim=True) / 4 + 1e-5)
        assert_close(out[..., cols], gated[..., cols] / rms * weight[cols], f"gated norm group {group}")


def mamba_ssm_rms_norm_ref(monkeypatch):
    """mamba-ssm's own pure-PyTorch `rms_norm_ref` (ops/triton/layernorm_gated.py), loaded by path with
    triton replaced by pass-through decorators (its kernels are defined, never run)."""
    def passthrough(*args, **kwargs):
        return lambda function: function

    module = load_mamba_ssm_file("ops/triton/layernorm_gated.py", monkeypatch, {
        "triton": {"heuristics": passthrough, "jit": lambda function: function},
        "triton.language": {"constexpr": object},
    })
    return module.rms_norm_ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [None, 8], ids=["one_group", "groups_of_8"])
def test_matches_mamba_ssm_rms_norm_ref(monkeypatch, backend, group_size):
    """Against mamba-ssm's RMSNormGated reference with norm_before_gate=False (what its Mamba2 uses), float64."""
    reference = mamba_ssm_rms_norm_ref(monkeypatch)
    x, z, weight = make_inputs(11, 24, torch.float64, seed=4)
    weight = weight.float().double()  # the reference casts the weight to float32
    expected = reference(x, weight, None, z=z, eps=1e-5, group_size=group_size, norm_before_gate=False, upcast=False)
    assert_close(gated_rms_norm(x, z, weight, 1e-5, group_size, backend=backend), expected,
                 f"gated norm vs mamba-ssm rms_norm_ref ({backend})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("rows", "channels", "group_size"), [(7, 48, None), (33, 48, 16), (1, 20, 5), (5, 37, 37)])
@pytest.mark.parametrize("gated", [True, False], ids=["z", "no_z"])
def test_matches_the_reference_with_gradients(backend, dtype, rows, channels, group_size, gated):
    x, z, weight = make_inputs(rows, channels, dtype, seed=rows)
    z = z if gated else None
    out, grads = run_with_grads(gated_rms_norm, x, z, weight, eps=1e-5, group_size=group_size, backend=backend)
    out_ref, grads_ref = run_with_grads(gated_rms_norm_ref, x, z, weight, eps=1e-5, group_size=group_size)
    assert_close(out, out_ref, f"gated norm out ({backend})")
    for name, grad, grad_ref in zip(("x", "z", "weight"), grads, grads_ref, strict=True):
        if grad_ref is None:
            continue
        assert grad_ref.abs().max() > 0, f"reference d{name} is zero: the test would be vacuous"
        assert_close(grad, grad_ref, f"gated norm d{name} ({backend})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("z_scale", [1e-3, 30.0], ids=["tiny_gate", "saturated_gate"])
def test_extreme_gate_scales(backend, z_scale):
    """Gates near zero (the output is then tiny before the norm) and saturated ones (sigmoid at 0 or 1)."""
    x, z, weight = make_inputs(9, 32, torch.float64, z_scale=z_scale, seed=3)
    out, grads = run_with_grads(gated_rms_norm, x, z, weight, group_size=16, backend=backend)
    out_ref, grads_ref = run_with_grads(gated_rms_norm_ref, x, z, weight, group_size=16)
    assert_close(out, out_ref, f"gated norm out (z scale {z_scale})")
    for name, grad, grad_ref in zip(("x", "z", "weight"), grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, f"gated norm d{name} (z scale {z_scale})")


@needs_compiler
def test_strided_inputs_as_the_mixer_passes_them():
    """z a column slice of a wider projection output, x a transposed view: same result as contiguous
    copies, forward and backward (the kernel reads row strides; a non-unit channel stride is copied)."""
    gen = torch.Generator().manual_seed(11)
    projected = torch.randn(2, 17, 100, generator=gen)
    z = projected[..., 10:58]  # (2, 17, 48), row stride 100
    x = torch.randn(2, 48, 17, generator=gen).transpose(1, 2)  # channels not contiguous
    weight = torch.randn(48, generator=gen)
    out, grads = run_with_grads(gated_rms_norm, x, z, weight, group_size=24, backend="compiled")
    out_ref, grads_ref = run_with_grads(gated_rms_norm_ref, x.contiguous(), z.contiguous(), weight, group_size=24)
    assert_close(out, out_ref, "gated norm out (strided)")
    for name, grad, grad_ref in zip(("x", "z", "weight"), grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, f"gated norm d{name} (strided)")


def test_other_dtypes_run_eager():
    x, z, weight = make_inputs(4, 16, torch.bfloat16)
    out = gated_rms_norm(x, z, weight, group_size=8)
    assert out.dtype == torch.bfloat16
    expected = gated_rms_norm_ref(x.float(), z.float(), weight.float(), group_size=8)
    assert_close(out.float(), expected, "bfloat16 gated norm", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend='compiled' runs float32 and float64"):
        gated_rms_norm(x, z, weight, group_size=8, backend="compiled")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"z": torch.randn(2, 3, 8)}, r"z must have x's shape \(2, 3, 12\)"),
        ({"weight": torch.randn(8)}, r"weight must have shape \(12,\)"),
        ({"group_size": 5}, "group_size must divide the 12 channels, got 5"),
        ({"backend": "fast"}, "gated_rms_norm: backend='fast'; valid: 'auto', 'compiled', 'eager'"),
    ],
)
def test_bad_input_is_named(change, message):
    arguments = {"x": torch.randn(2, 3, 12), "z": torch.randn(2, 3, 12), "weight": torch.ones(12), **change}
    with pytest.raises(ValueError, match=message):
        gated_rms_norm(**arguments)


def test_auto_takes_the_kernel_on_cpu_and_falls_back_with_a_notice(monkeypatch, capsys):
    monkeypatch.setattr(backends, "notify_once", lambda key, message: print(message))
    monkeypatch.setattr(norm_module, "KERNEL", FakeKernel(True))
    assert resolve_backend("auto", "cpu") == "compiled"
    assert resolve_backend("eager", "cpu") == "eager"
    assert resolve_backend("auto", "meta") == "eager"
    monkeypatch.setattr(norm_module, "KERNEL", FakeKernel(False, "no C++ compiler on PATH"))
    assert resolve_backend("auto", "cpu") == "eager"
    assert "gated_rms_norm runs the eager PyTorch path (no C++ compiler on PATH)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="backend='compiled' was requested but the kernel is unavailable"):
        resolve_backend("compiled", "cpu")
