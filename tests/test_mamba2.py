"""Mamba-2 mixer specifics: the contract for its variants, chunked == sequential, dispatch,
initialisation, the gated group RMSNorm, config validation, and (on a GPU) CUDA-kernel parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_mixer
from seqarch.backends import cuda_kernels_usable
from tests.compiled import compiled, needs_compiler
from tests.contract_checks import (
    check_causal,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
)
from tests.tolerance import assert_close

WIDTH = 64
VARIANTS = {
    "ngroups2": {"ngroups": 2},
    "chunked": {"backend": "chunked", "ngroups": 2},
    "sequential": {"backend": "sequential"},
    "small_chunks": {"chunk_size": 8, "ngroups": 2, "d_state": 16},
}


def make(dtype=torch.float32, **overrides):
    return build_mixer("mamba2", d_model=WIDTH, **overrides).to(dtype)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_keeps_the_contract(variant):
    mixer = make(**VARIANTS[variant])
    for length in (1, 7, 33):
        check_paths_agree(mixer, length, f"mamba2 {variant}")
    check_paths_agree(make(torch.float64, **VARIANTS[variant]), 21, f"mamba2 {variant} float64", torch.float64)
    for split in ((1, 6), (13, 9)):
        check_prefill_then_continue(mixer, *split, f"mamba2 {variant}")
    check_causal(mixer, f"mamba2 {variant}")
    check_gradients(mixer, f"mamba2 {variant}")
    check_state_bytes(mixer, f"mamba2 {variant}")


@pytest.mark.parametrize("backend", [compiled("compiled"), "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_chunked_and_sequential_mixers_agree_with_gradients(dtype, backend):
    chunked = make(dtype, chunk_size=16, ngroups=2, backend=backend)
    sequential = make(dtype, chunk_size=16, ngroups=2, backend="sequential")
    sequential.load_state_dict(chunked.state_dict())
    x = torch.randn(2, 45, WIDTH, dtype=dtype)
    cotangent = torch.randn(2, 45, WIDTH, dtype=dtype)
    outputs = {}
    for name, mixer in (("chunked", chunked), ("sequential", sequential)):
        leaf = x.clone().requires_grad_(True)
        y = mixer(leaf)
        (y * cotangent).sum().backward()
        outputs[name] = (y, leaf.grad, {k: p.grad for k, p in mixer.named_parameters()})
    y, dx, grads = outputs["chunked"]
    y_ref, dx_ref, grads_ref = outputs["sequential"]
    assert_close(y, y_ref, "mamba2 chunked vs sequential output")
    assert_close(dx, dx_ref, "mamba2 chunked vs sequential dx")
    for name, grad_ref in grads_ref.items():
        assert_close(grads[name], grad_ref, f"mamba2 chunked vs sequential d{name}")


@needs_compiler
def test_auto_runs_the_compiled_kernels_on_cpu_and_says_so(capsys, monkeypatch):
    from seqarch import backends

    monkeypatch.setattr(backends, "_NOTICES_SHOWN", set())
    mixer = make()
    with torch.no_grad():
        mixer(torch.randn(1, 5, WIDTH))
    err = capsys.readouterr().err
    assert "ssd runs the compiled C++ CPU kernel" in err
    assert "gated_rms_norm runs the compiled C++ CPU kernel" in err
    assert mixer.describe_paths("cpu") == ("SSD backend=auto: compiled C++ CPU kernel (built on first use, cached); "
                                           "chunked SSD if the build fails")


@needs_compiler
def test_compiled_path_keeps_a_nan_from_reaching_earlier_positions():
    """The compiled SSD never forms the masked upper triangle of its (Q, Q) blocks, so a NaN at position 8
    leaves positions 0-7 finite (the chunked path multiplies masked entries by zero: docs/contract.md)."""
    torch.manual_seed(0)
    mixer = build_mixer("mamba2", d_model=32, backend="compiled")
    x = torch.randn(1, 16, 32)
    x[0, 8, 3] = float("nan")
    with torch.no_grad():
        y = mixer(x)
    assert torch.isfinite(y[0, :8]).all()
    assert not torch.isfinite(y[0, 8]).all()


def test_old_config_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning) as caught:
        mixer = make(headdim=16, scan="sequential")
    messages = sorted(str(w.message) for w in caught)
    assert "'headdim' for mixer 'mamba2' is deprecated" in messages[0] and "use 'head_dim'" in messages[0]
    assert "'scan' for mixer 'mamba2' is deprecated" in messages[1] and "use 'backend'" in messages[1]
    assert (mixer.config.head_dim, mixer.config.n_heads, mixer.config.backend) == (16, 8, "sequential")


def test_initialisation_follows_mamba2():
    mixer = build_mixer("mamba2", d_model=256, head_dim=16, dt_min=1e-3, dt_max=1e-1, A_init_range=(1, 16))
    heads = 2 * 256 // 16
    dt = F.softplus(mixer.dt_bias.detach())
    assert dt.shape == (heads,)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    # log-uniform: the mean of log dt sits near the middle of [log 1e-3, log 1e-1] (32 draws).
    assert abs(dt.log().mean().item() - math.log(1e-2)) < 1.0
    A = -torch.exp(mixer.A_log.detach())
    assert (A <= -1).all() and (A >= -16).all()
    assert_close(mixer.D.detach(), torch.ones(heads), "D starts at 1")
    for name in ("dt_bias", "A_log", "D"):
        assert getattr(mixer, name)._no_weight_decay, f"{name} must be excluded from weight decay"
    projected = 2 * 512 + 2 * 1 * 64 + heads  # [z, x, B, C, dt] as in mamba-ssm
    assert mixer.in_proj.weight.shape == (projected, 256)
    assert mixer.conv1d.weight.shape == (512 + 2 * 64, 1, 4)


def test_defaults_give_several_heads_at_width_64():
    mixer = make()
    assert mixer.config.n_heads >= 2
    assert mixer.config.d_state == 64 and mixer.config.d_conv == 4 and mixer.config.expand == 2


def test_gated_rmsnorm_normalises_each_group():
    mixer = make(ngroups=2)
    with torch.no_grad():
        mixer.norm.weight.copy_(torch.randn(mixer.config.d_inner))
    y, z = torch.randn(3, mixer.config.d_inner), torch.randn(3, mixer.config.d_inner)
    gated = y * z * torch.sigmoid(z)
    half = mixer.config.d_inner // 2
    pieces = []
    for group in (gated[:, :half], gated[:, half:]):
        pieces.append(group / torch.sqrt((group**2).mean(-1, keepdim=True) + mixer.config.norm_eps))
    expected = torch.cat(pieces, -1) * mixer.norm.weight
    assert_close(mixer.norm(y, z), expected, "gated RMSNorm per group")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"head_dim": 48}, "expand \\* d_model = 128 is not divisible by head_dim=48"),
        ({"ngroups": 3}, "the 4 heads are not divisible into ngroups=3"),
        ({"backend": "fast"},
         "'backend' for mixer 'mamba2' must be 'auto' \\| 'compiled' \\| 'chunked' \\| 'sequential'"),
        ({"d_state": 0}, "d_state must be >= 1"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"A_init_range": (0.0, 16.0)}, "A_init_range must be"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min <= dt_max"),
        ({"d_stat": 16}, "unknown config key 'd_stat'"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_kernels_usable("mamba_ssm", "cuda"),
                    reason="needs a CUDA device with mamba-ssm and causal-conv1d")
def test_cuda_kernels_match_the_pytorch_path():
    torch.manual_seed(0)
    kernels = build_mixer("mamba2", d_model=256, ngroups=2, device="cuda")
    pytorch = build_mixer("mamba2", d_model=256, ngroups=2, backend="chunked", device="cuda")
    pytorch.load_state_dict(kernels.state_dict())
    x = torch.randn(2, 333, 256, device="cuda")
    assert_close(kernels(x), pytorch(x), "mamba2 CUDA kernels vs PyTorch chunked", tolerance=1e-4)
    state = kernels.init_state(2, device="cuda")
    y_kernels, state_kernels = kernels.prefill(x, state)
    y_pytorch, state_pytorch = pytorch.prefill(x, state)
    assert_close(y_kernels, y_pytorch, "mamba2 CUDA prefill", tolerance=1e-4)
    assert_close(state_kernels.ssm, state_pytorch.ssm, "mamba2 CUDA prefill ssm state", tolerance=1e-4)
