"""selective_scan: the compiled and chunked paths against the sequential reference, forward and
gradients of every input, on odd lengths, shared and grouped B/C, with and without D / z /
delta_bias, from an initial state and returning the last one; plus numerics and dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqarch.ops.selective_scan as scan_module
from seqarch.ops.selective_scan import resolve_backend, selective_scan, selective_scan_ref
from tests.compiled import compiled, needs_compiler
from tests.tolerance import assert_close

# "compiled-portable" is the compiled kernel built with -DSEQARCH_PORTABLE_KERNELS: the plain loops
# that CPUs without AVX-512 run, checked here on machines that have it as well.
FAST_SCANS = [compiled("compiled"), compiled("compiled-portable"), "chunked"]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
PORTABLE_KERNEL = scan_module.KERNEL.variant("portable", "-DSEQARCH_PORTABLE_KERNELS")


def use(scan: str, monkeypatch) -> str:
    """The `backend` argument for the test variant `scan`, loading the portable kernel in place of
    the native one for "compiled-portable"."""
    if scan == "compiled-portable":
        monkeypatch.setattr(scan_module, "KERNEL", PORTABLE_KERNEL)
        return "compiled"
    return scan


def make_inputs(batch=2, dim=6, length=67, state=5, groups=None, dtype=torch.float32, seed=0):
    """Random inputs (never zeros); groups None means B, C shared as (B, N, L)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) * 0.5,
        "A": -torch.rand(dim, state, generator=gen, dtype=dtype) * 2 - 0.2,
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": randn(dim) * 0.3,
        "initial_state": randn(batch, dim, state),
    }


def run(fn, inputs, used, softplus, layout=None, **kwargs):
    """out, last_state and the gradient of every used input under a random projection of both.
    `layout` maps the leaf tensors to the tensors passed (same values, other strides)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k in used}
    passed = layout(leaves) if layout else leaves
    args = {k: passed.get(k) for k in ("D", "z", "delta_bias")}
    out, last = fn(passed["u"], passed["delta"], passed["A"], passed["B"], passed["C"], args["D"], args["z"],
                   args["delta_bias"], softplus, True, initial_state=passed.get("initial_state"), **kwargs)
    gen = torch.Generator().manual_seed(7)  # drawn in float64 whatever the dtype: one loss for every dtype
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)).sum()
    loss = loss + (last * torch.randn(last.shape, generator=gen, dtype=torch.float64).to(last.dtype)).sum()
    loss.backward()
    return out, last, {k: leaf.grad for k, leaf in leaves.items()}


OPTIONS = {  # name: (inputs used, delta_softplus)
    "plain": (("u", "delta", "A", "B", "C"), False),
    "D-z-no-softplus": (("u", "delta", "A", "B", "C", "D", "z"), False),
    "bias-no-softplus": (("u", "delta", "A", "B", "C", "delta_bias"), False),
    "D-z-bias-softplus": (("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), True),
    "all+initial-state": (NAMES, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("groups", [None, 1, 2], ids=["shared", "g1", "g2"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("scan", FAST_SCANS)
def test_fast_paths_match_reference(scan, options, groups, dtype, monkeypatch):
    inputs = make_inputs(groups=groups, dtype=dtype)
    used, softplus = OPTIONS[options]
    out, last, grads = run(selective_scan, inputs, used, softplus, backend=use(scan, monkeypatch), chunk_size=16)
    out_ref, last_ref, grads_ref = run(selective_scan_ref, inputs, used, softplus)
    assert out.dtype == dtype and last.dtype == dtype
    assert_close(out, out_ref, f"{scan} out")
    assert_close(last, last_ref, f"{scan} last state")
    assert set(grads) == set(used)
    for name in used:
        assert_close(grads[name], grads_ref[name], f"{scan} d{name}")


@pytest.mark.parametrize("scan", FAST_SCANS)
@pytest.mark.parametrize(("length", "chunk_size"), [(1, 16), (16, 16), (17, 16), (33, 1), (40, 64)])
def test_lengths_around_the_chunk(scan, length, chunk_size, monkeypatch):
    inputs = make_inputs(length=length, dtype=torch.float64)
    out, last, grads = run(selective_scan, inputs, NAMES, True, backend=use(scan, monkeypatch), chunk_size=chunk_size)
    out_ref, last_ref, grads_ref = run(selective_scan_ref, inputs, NAMES, True)
    assert_close(out, out_ref, f"{scan} out L={length} K={chunk_size}")
    assert_close(last, last_ref, f"{scan} last state L={length} K={chunk_size}")
    for name in NAMES:
        assert_close(grads[name], grads_ref[name], f"{scan} d{name} L={length} K={chunk_size}")


def channel_last_views(inputs):
    """u, delta as (B, D, L) views of (B, L, D) tensors and z as a strided half of a (B, L, 2D) one,
    the layouts the mamba layer hands over: same values, other strides."""
    views = dict(inputs)
    for name in ("u", "delta"):
        views[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.cat([inputs["z"].transpose(1, 2), inputs["u"].transpose(1, 2)], dim=-1)  # (B, L, 2D)
    views["z"] = wide[..., : inputs["z"].shape[1]].transpose(1, 2)
    return views


@needs_compiler
@pytest.mark.parametrize("groups", [None, 2], ids=["shared", "g2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_compiled_reads_channel_last_inputs_over_several_tiles(groups, dtype):
    """40 channels per group: two full tiles of 16 and a ragged one; u, delta, z channel-last."""
    inputs = make_inputs(batch=2, dim=80, length=45, state=4, groups=groups, dtype=dtype)
    views = channel_last_views(inputs)
    assert views["u"].stride(1) == 1 and views["delta"].stride(1) == 1 and views["z"].stride(1) == 1
    assert not views["z"].is_contiguous() and views["z"].stride(2) == 160
    out, last, grads = run(selective_scan, inputs, NAMES, True, layout=channel_last_views, backend="compiled",
                           chunk_size=16)
    out_ref, last_ref, grads_ref = run(selective_scan_ref, inputs, NAMES, True)
    assert out.stride(1) == 1, "channel-last inputs give a channel-last output"
    assert_close(out, out_ref, "compiled out, channel-last inputs")
    assert_close(last, last_ref, "compiled last state, channel-last inputs")
    for name in NAMES:
        assert_close(grads[name], grads_ref[name], f"compiled d{name}, channel-last inputs")


@pytest.mark.parametrize("scan", [compiled("compiled"), compiled("compiled-portable")])
@pytest.mark.parametrize("groups", [None, 2], ids=["shared", "g2"])
@pytest.mark.parametrize(("length", "chunk_size"), [(45, 16), (45, 40), (7, 64)])
def test_compiled_float32_full_tiles_against_float64(scan, groups, length, chunk_size, monkeypatch):
    """The float kernel where its fast paths apply: contiguous (B, D, L) rows with full tiles of 16
    channels (moved in 16 x 16 blocks, plus ragged step remainders), 13 states (a group of 8, one of
    4 and a single one), softplus over delta from about -25 to 25. Forward and gradients in float32
    against the reference in float64."""
    inputs = make_inputs(batch=2, dim=48, length=length, state=13, groups=groups, dtype=torch.float64)
    inputs["delta"] = inputs["delta"] * 16
    out64, last64, grads64 = run(selective_scan_ref, inputs, NAMES, True)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    out, last, grads = run(selective_scan, inputs32, NAMES, True, backend=use(scan, monkeypatch), chunk_size=chunk_size)
    assert_close(out, out64, f"{scan} out", dtype=torch.float32)
    assert_close(last, last64, f"{scan} last state", dtype=torch.float32)
    for name in NAMES:
        assert_close(grads[name], grads64[name], f"{scan} d{name}", dtype=torch.float32)


def cpu_has_avx512() -> bool:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx512f" in flags and "avx512dq" in flags


@needs_compiler
def test_native_kernel_takes_the_avx512_path_where_the_cpu_has_it():
    assert scan_module.KERNEL.load().avx512 == cpu_has_avx512()
    assert PORTABLE_KERNEL.load().avx512 is False


def test_reference_is_the_recurrence():
    """The oracle itself against the equations written out for one channel and two steps."""
    inputs = make_inputs(batch=1, dim=1, length=2, state=3, dtype=torch.float64)
    u, delta, A, B, C = (inputs[k][0] if k != "A" else inputs[k] for k in ("u", "delta", "A", "B", "C"))
    D, z, bias, h0 = inputs["D"], inputs["z"][0], inputs["delta_bias"], inputs["initial_state"][0]
    dt = F.softplus(delta[0] + bias[0])  # (L,)
    h1 = torch.exp(dt[0] * A[0]) * h0[0] + dt[0] * u[0, 0] * B[:, 0]
    h2 = torch.exp(dt[1] * A[0]) * h1 + dt[1] * u[0, 1] * B[:, 1]
    y = torch.stack([(C[:, 0] * h1).sum(), (C[:, 1] * h2).sum()]) + D[0] * u[0]
    expected = y * F.silu(z[0])
    out, last = selective_scan_ref(inputs["u"], inputs["delta"], A, inputs["B"], inputs["C"], D, inputs["z"], bias,
                                   True, True, initial_state=inputs["initial_state"])
    assert_close(out[0, 0], expected, "reference output")
    assert_close(last[0, 0], h2, "reference last state")


@pytest.mark.slow
@pytest.mark.parametrize("scan", FAST_SCANS)
def test_large_dt_and_16k_steps_stay_exact(scan, monkeypatch):
    """dt up to 10 with |A| up to 16 (decays down to exp(-160)) over 16k steps: no overflow, no
    underflow-to-NaN, and the fast paths match the reference in float64."""
    length = 16384
    inputs = make_inputs(batch=1, dim=2, length=length, state=4, dtype=torch.float64, seed=3)
    delta = torch.rand(1, 2, length, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 10
    A = -torch.tensor([[1.0, 4.0, 9.0, 16.0], [0.01, 0.1, 1.0, 16.0]], dtype=torch.float64)
    args = (inputs["u"], delta, A, inputs["B"], inputs["C"])
    path = use(scan, monkeypatch)
    out, last = selective_scan(*args, return_last_state=True, backend=path)
    out_ref, last_ref = selective_scan_ref(*args, return_last_state=True)
    assert_close(out, out_ref, f"{scan} out at L=16k, dt<=10")
    assert_close(last, last_ref, f"{scan} last state at L=16k, dt<=10")
    out32 = selective_scan(*(t.float() for t in args), backend=path)
    assert_close(out32, out_ref.float(), f"{scan} float32 out at L=16k, dt<=10", dtype=torch.float32)


@pytest.mark.parametrize("scan", FAST_SCANS)
def test_half_precision_inputs_compute_in_float32(scan, monkeypatch):
    inputs = make_inputs(dtype=torch.float32)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    low = [t.bfloat16() for t in args]
    out, last = selective_scan(*low, delta_softplus=True, return_last_state=True, backend=use(scan, monkeypatch))
    expected, expected_last = selective_scan_ref(*(t.float() for t in low), delta_softplus=True,
                                                 return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert_close(last, expected_last, f"{scan} bf16 inputs, last state in float32", dtype=torch.float32)
    assert_close(out.float(), expected.bfloat16().float(), f"{scan} bf16 output", dtype=torch.bfloat16)


def test_sequential_scan_is_the_reference():
    inputs = make_inputs(dtype=torch.float64)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    assert torch.equal(selective_scan(*args, True, backend="sequential"), selective_scan_ref(*args, True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"u": torch.randn(2, 6)}, r"u must be \(B, D, L\)"),
        ({"delta": torch.randn(2, 6, 66)}, "delta must have u's shape"),
        ({"A": torch.randn(5, 5)}, r"A must be \(D, N\) with D=6"),
        ({"A": torch.randn(6, 5, dtype=torch.complex64)}, "complex A is not supported"),
        ({"B": torch.randn(2, 4, 5, 67)}, "4 groups, which do not divide D=6"),
        ({"C": torch.randn(2, 5, 66)}, r"C must be \(B, N, L\)"),
        ({"B": torch.randn(2, 2, 5, 67), "C": torch.randn(2, 3, 5, 67)}, "same number of groups"),
        ({"D": torch.randn(5)}, r"D must be \(6,\)"),
        ({"z": torch.randn(2, 6, 3)}, "z must have u's shape"),
        ({"initial_state": torch.randn(2, 6, 4)}, r"initial_state must be \(B, D, N\)"),
    ],
)
def test_bad_inputs_are_named(change, message):
    inputs = make_inputs() | change
    with pytest.raises(ValueError, match=message):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
                       initial_state=inputs["initial_state"], backend="chunked")


def test_bad_backend_and_chunk_are_named():
    inputs = make_inputs()
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="backend='fast'; valid: 'auto', 'compiled', 'chunked', 'sequential'"):
        selective_scan(*args, backend="fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        selective_scan(*args, backend="chunked", chunk_size=0)


def test_old_scan_keyword_still_works_with_a_deprecation_warning():
    inputs = make_inputs(dtype=torch.float64)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with pytest.warns(DeprecationWarning, match="keyword scan= is deprecated.*backend='sequential'"):
        out = selective_scan(*args, True, scan="sequential")
    assert torch.equal(out, selective_scan_ref(*args, True))


# --- dispatch ------------------------------------------------------------------------------------
def test_auto_picks_cuda_kernel_only_when_usable_and_without_initial_state(monkeypatch):
    monkeypatch.setattr(scan_module, "cuda_kernels_usable", lambda module, device: module == "mamba_ssm")
    assert resolve_backend("auto", "cpu") == "cuda"
    assert resolve_backend("chunked", "cpu") == "chunked"
    assert resolve_backend("sequential", "cpu") == "sequential"


@needs_compiler
def test_auto_on_cpu_picks_compiled_kernel_when_it_builds():
    """Here, where it builds (the dispatch itself is tested in tests/test_backends.py)."""
    assert resolve_backend("auto", "cpu") == "compiled"
    assert resolve_backend("auto", "cpu", has_initial_state=True) == "compiled"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_reference():
    pytest.importorskip("mamba_ssm")
    inputs = {k: v.cuda() for k, v in make_inputs(groups=2).items()}
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    assert resolve_backend("auto", "cuda") == "cuda"
    out, last = selective_scan(*args, True, True, backend="auto")
    out_ref, last_ref = selective_scan_ref(*args, True, True)
    assert_close(out, out_ref, "cuda out", tolerance=1e-4)
    assert_close(last, last_ref, "cuda last state", tolerance=1e-4)
