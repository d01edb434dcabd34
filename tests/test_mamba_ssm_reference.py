"""seqarch's Mamba ops and layer against mamba-ssm's own pure-PyTorch code, read from its installed source.

mamba-ssm 2.3.2.post1 is installed without its CUDA build (README's test command); its package imports CUDA
and triton kernels, so each file is loaded by path with those imports replaced (tests/references.py):
`selective_scan_ref` (ops/selective_scan_interface.py), `ssd_minimal_discrete` (modules/ssd_minimal.py, the
SSD paper's listing 1) and the `Mamba` module (modules/mamba_simple.py, its non-fused path and decode step).
`selective_scan_ref` computes in float32 whatever its inputs (it casts u and delta), so the Mamba comparisons run
in float32 with a float32 tolerance for a scan (1e-4 of the largest value); the SSD listing runs in float64.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_mixer
from seqarch.ops.selective_scan import selective_scan
from seqarch.ops.ssd import ssd
from tests.references import load_mamba_ssm_file
from tests.tolerance import assert_close

FLOAT32_SCAN = 1e-4  # relative to the largest value: float32 sums along a scan of up to 130 steps


def _decorator(function=None, **_):
    """mamba_ssm.utils.torch's custom_fwd / custom_bwd, as plain pass-through decorators (autocast does not matter)."""
    return function if function is not None else (lambda inner: inner)


def mamba_ssm_selective_scan_ref(monkeypatch):
    module = load_mamba_ssm_file("ops/selective_scan_interface.py", monkeypatch, {
        "mamba_ssm.utils.torch": {"custom_fwd": _decorator, "custom_bwd": _decorator},
        "mamba_ssm.ops.triton.layer_norm": {"_layer_norm_fwd": None},
        "selective_scan_cuda": {},
    })
    return module.selective_scan_ref


@pytest.mark.parametrize("length", [1, 7, 63, 130])
@pytest.mark.parametrize("groups", [None, 2])
def test_selective_scan_equals_mamba_ssm_reference(monkeypatch, length, groups):
    reference = mamba_ssm_selective_scan_ref(monkeypatch)
    gen = torch.Generator().manual_seed(length)
    batch, dim, state = 2, 8, 6
    shape_bc = (batch, state, length) if groups is None else (batch, groups, state, length)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    # Mamba's own scales: A = -exp(A_log) with A_log = log(1..N), dt of order 1e-3..1e-1 before softplus' bias
    u, z = randn(batch, dim, length), randn(batch, dim, length)
    delta = randn(batch, dim, length, scale=0.5)
    A = (-torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1)).requires_grad_()
    B, C = randn(*shape_bc), randn(*shape_bc)
    D = randn(dim)
    delta_bias = (torch.log(torch.expm1(torch.empty(dim).uniform_(1e-3, 1e-1, generator=gen)))
                  ).requires_grad_()
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    expected, expected_state = reference(*inputs, delta_softplus=True, return_last_state=True)
    weights = torch.randn(expected.shape, generator=gen)
    expected_grads = torch.autograd.grad((expected * weights).sum() + expected_state.sum(), inputs)
    for backend in ("sequential", "chunked", "compiled"):
        out, last = selective_scan(*inputs, delta_softplus=True, return_last_state=True, backend=backend)
        assert_close(out, expected, f"selective_scan[{backend}] vs mamba-ssm out", tolerance=FLOAT32_SCAN)
        assert_close(last, expected_state, f"selective_scan[{backend}] vs mamba-ssm last state", tolerance=FLOAT32_SCAN)
        grads = torch.autograd.grad((out * weights).sum() + last.sum(), inputs)
        for name, ours, theirs in zip("u delta A B C D z delta_bias".split(), grads, expected_grads, strict=True):
            assert_close(ours, theirs, f"selective_scan[{backend}] vs mamba-ssm d{name}", tolerance=FLOAT32_SCAN)


@pytest.mark.parametrize("chunks,chunk", [(1, 8), (5, 16)])
@pytest.mark.parametrize("initial", [False, True])
def test_ssd_equals_mamba_ssm_minimal_ssd(monkeypatch, chunks, chunk, initial):
    module = load_mamba_ssm_file("modules/ssd_minimal.py", monkeypatch, {
        "mamba_ssm.ops.triton.ssd_combined": {"mamba_chunk_scan_combined": None},
    })
    gen = torch.Generator().manual_seed(chunks * chunk)
    batch, length, heads, head_dim, state = 2, chunks * chunk, 3, 4, 5
    x = torch.randn(batch, length, heads, head_dim, generator=gen, dtype=torch.float64)
    dt = F.softplus(torch.randn(batch, length, heads, generator=gen, dtype=torch.float64) - 2.0)
    A = -torch.exp(torch.rand(heads, generator=gen, dtype=torch.float64) * 2.0)  # A_log ~ log U(1, 16)-like range
    B = torch.randn(batch, length, heads, state, generator=gen, dtype=torch.float64)
    C = torch.randn(batch, length, heads, state, generator=gen, dtype=torch.float64)
    h0 = torch.randn(batch, heads, head_dim, state, generator=gen, dtype=torch.float64) if initial else None
    # the listing takes the discretised inputs: X = x dt, A dt, and an initial state with a chunk axis
    expected, expected_final = module.ssd_minimal_discrete(x * dt[..., None], A * dt, B, C, chunk,
                                                           None if h0 is None else h0[:, None])
    for backend in ("sequential", "chunked", "compiled"):
        y, final = ssd(x, dt, A, B, C, chunk_size=chunk, initial_states=h0, return_final_states=True, backend=backend)
        assert_close(y, expected, f"ssd[{backend}] vs mamba-ssm ssd_minimal_discrete y")
        assert_close(final, expected_final, f"ssd[{backend}] vs mamba-ssm ssd_minimal_discrete final state")


def mamba_ssm_mamba_class(monkeypatch):
    selective_scan_ref = mamba_ssm_selective_scan_ref(monkeypatch)
    module = load_mamba_ssm_file("modules/mamba_simple.py", monkeypatch, {
        "mamba_ssm.ops.selective_scan_interface": {"selective_scan_fn": selective_scan_ref, "mamba_inner_fn": None},
        "mamba_ssm.ops.triton.selective_state_update": {},  # missing name -> its own torch fallback
        "mamba_ssm.ops.triton.layer_norm": {},
    })
    return module.Mamba


@pytest.mark.parametrize("length", [1, 9, 40])
def test_mamba_layer_equals_mamba_ssm_module(monkeypatch, length):
    """mamba-ssm's Mamba module (its unfused path, causal_conv1d absent) with the same weights: forward and gradients
    in float32, then prefill + decode steps against its inference cache."""
    Mamba = mamba_ssm_mamba_class(monkeypatch)
    torch.manual_seed(length)
    reference = Mamba(d_model=24, d_state=8, use_fast_path=False, layer_idx=0)
    ours = build_mixer("mamba", d_model=24, d_state=8)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, length, 24, requires_grad=True)
    expected = reference(x)
    got = ours(x)
    assert_close(got, expected, "mamba vs mamba-ssm Mamba forward", tolerance=FLOAT32_SCAN)
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *reference.parameters()])
    got_grads = torch.autograd.grad((got * weights).sum(), [x, *ours.parameters()])
    names = ["x", *(name for name, _ in reference.named_parameters())]
    for name, mine, theirs in zip(names, got_grads, expected_grads, strict=True):
        assert_close(mine, theirs, f"mamba vs mamba-ssm d{name}", tolerance=FLOAT32_SCAN)

    # decoding: prefill the prompt, then three tokens one at a time, against mamba-ssm's cache
    cache = SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    tokens = torch.randn(2, 3, 24)
    with torch.no_grad():
        expected_prompt = reference(x, inference_params=cache)
        got_prompt, state = ours.prefill(x, ours.init_state(2))
        assert_close(got_prompt, expected_prompt, "mamba vs mamba-ssm prefill", tolerance=FLOAT32_SCAN)
        for t in range(3):
            cache.seqlen_offset = length + t
            expected_t = reference(tokens[:, t:t + 1], inference_params=cache)[:, 0]
            got_t, state = ours.step(tokens[:, t], state)
            assert_close(got_t, expected_t, f"mamba vs mamba-ssm decode step {t}", tolerance=FLOAT32_SCAN)
