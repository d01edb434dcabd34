"""Mamba specifics: the contract for every scan backend, backends agree (outputs and gradients), paper
initialisation, config validation, mamba-ssm parameter names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_mixer
from tests.compiled import compiled
from tests.contract_checks import (
    check_causal,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
)
from tests.tolerance import assert_close

WIDTH = 64
VARIANTS = ["chunked", "sequential"]


@pytest.mark.parametrize("backend", VARIANTS)
def test_contract_for_backend_variants(backend):
    mixer = build_mixer("mamba", d_model=WIDTH, backend=backend)
    name = f"mamba[{backend}]"
    for length in (1, 7, 63):
        check_paths_agree(mixer, length, name)
    for split in ((1, 6), (13, 9)):
        check_prefill_then_continue(mixer, *split, name)
    check_paths_agree(build_mixer("mamba", d_model=WIDTH, backend=backend).double(), 33, f"{name} float64",
                      dtype=torch.float64)
    check_causal(mixer, name)
    check_gradients(mixer, name)
    check_state_bytes(mixer, name)


@pytest.mark.parametrize("scan", [compiled("compiled"), "chunked"])
def test_backends_agree_with_sequential_forward_and_backward(scan):
    torch.manual_seed(1)
    reference = build_mixer("mamba", d_model=32, d_state=8, backend="sequential", chunk_size=8).double()
    fast = build_mixer("mamba", d_model=32, d_state=8, backend=scan, chunk_size=8).double()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    weights = torch.randn(2, 45, 32, dtype=torch.float64)
    outputs = []
    for mixer in (reference, fast):
        x_leaf = x.clone().requires_grad_(True)
        (mixer(x_leaf) * weights).sum().backward()
        outputs.append((mixer(x), x_leaf.grad, {k: p.grad for k, p in mixer.named_parameters()}))
    (y_ref, dx_ref, grads_ref), (y, dx, grads) = outputs
    assert_close(y, y_ref, f"mamba[{scan}] forward")
    assert_close(dx, dx_ref, f"mamba[{scan}] dx")
    for key, grad in grads.items():
        assert_close(grad, grads_ref[key], f"mamba[{scan}] d{key}")


def test_paper_initialisation():
    mixer = build_mixer("mamba", d_model=48, d_state=16, dt_min=1e-3, dt_max=0.1)
    cfg = mixer.config
    assert cfg.d_inner == 96 and cfg.rank == math.ceil(48 / 16)
    assert_close(mixer.A_log, torch.log(torch.arange(1, 17.0)).repeat(96, 1), "A_log = log(1..N)")
    assert_close(mixer.D, torch.ones(96), "D = 1")
    dt = F.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all(), "softplus(dt bias) in [dt_min, dt_max]"
    assert dt.max() / dt.min() > 10, "dt spread log-uniformly over the range"
    bound = cfg.rank**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.conv1d.bias is not None


def test_parameter_names_follow_mamba_ssm():
    mixer = build_mixer("mamba", d_model=32)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (128, 32),
        "conv1d.weight": (64, 1, 4),
        "conv1d.bias": (64,),
        "x_proj.weight": (2 + 32, 64),
        "dt_proj.weight": (64, 2),
        "dt_proj.bias": (64,),
        "A_log": (64, 16),
        "D": (64,),
        "out_proj.weight": (32, 64),
    }


def test_explicit_dt_rank_and_state_size():
    mixer = build_mixer("mamba", d_model=32, dt_rank=5, d_state=4, d_conv=2, expand=1)
    assert mixer.x_proj.weight.shape == (5 + 8, 32)
    check_paths_agree(mixer, 9, "mamba small")
    assert mixer.state_nbytes(3, 100) == 3 * 32 * (1 + 4) * 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backend": "fast"}, "'backend' for mixer 'mamba' must be 'auto' | 'compiled' | 'chunked' | 'sequential'"),
        ({"dt_rank": "big"}, "dt_rank='big'; valid: a positive int or 'auto'"),
        ({"dt_rank": 0}, "dt_rank must be >= 1"),
        ({"dt_min": 0.2}, "need 0 < dt_min <= dt_max"),
        ({"d_state": 0}, "d_state must be >= 1"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"dt_init_floor": 0.0}, "dt_init_floor must be > 0"),
        ({"expand": 1.5}, "config key 'expand' for mixer 'mamba' must be int"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_mixer("mamba", d_model=32, **overrides)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_cpu_path():
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    cpu = build_mixer("mamba", d_model=64, backend="sequential")
    gpu = build_mixer("mamba", d_model=64, backend="auto").cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 100, 64)
    with torch.no_grad():
        assert_close(gpu(x.cuda()).cpu(), cpu(x), "mamba on CUDA kernels", tolerance=1e-4)


def test_old_scan_key_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="config key 'scan' for mixer 'mamba' is deprecated.*use 'backend'"):
        mixer = build_mixer("mamba", d_model=32, scan="sequential")
    assert mixer.config.backend == "sequential"
    with pytest.raises(ValueError, match="'scan' and 'backend' .* give only 'backend'"):
        build_mixer("mamba", d_model=32, scan="sequential", backend="chunked")


def test_class_is_mamba_mixer_and_the_old_name_is_an_alias():
    from seqarch.mixers.mamba import Mamba, MambaMixer

    assert Mamba is MambaMixer and type(build_mixer("mamba", d_model=32)) is MambaMixer
