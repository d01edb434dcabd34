"""The chunked Mamba-3 scan (PyTorch and compiled) against its sequential reference (outputs, final
states and gradients), at odd lengths, float32 and float64, SISO and MIMO; carried states; the one-step function; the
reduction to Mamba-2's SSD; the rotation as complex multiplication; backend selection."""

from __future__ import annotations

import pytest
import torch

from seqarch.ops.mamba3 import (
    Mamba3ScanState,
    _linear_scan,
    mamba3_scan,
    mamba3_scan_ref,
    mamba3_step,
    resolve_backend,
    rotate,
)
from seqarch.ops.ssd import ssd_ref
from tests.compiled import compiled, needs_compiler
from tests.mamba3_helpers import Sizes, run_with_grads, scan_inputs
from tests.tolerance import assert_close

BATCH, HEADS, HEADDIM, GROUPS, DSTATE, ANGLES = SIZES = Sizes(2, 4, 3, 2, 8, 2)
CHUNK = 16  # small, so that 63 and 257 cross several chunk boundaries and pad the last one


def make_inputs(length: int, dtype, rank: int = 1, seed: int = 0, initial_state: bool = False) -> dict:
    return scan_inputs(SIZES, length, dtype, rank, seed, initial_state)


def compare(inputs: dict, label: str, dtype, backend: str = "chunked", chunk_size: int = CHUNK, **options) -> None:
    """`backend` against the sequential reference: outputs, final states and every gradient."""
    label = f"{backend} {label}"
    y_ref, final_ref, grads_ref = run_with_grads(mamba3_scan_ref, inputs, **options)
    y, final, grads = run_with_grads(mamba3_scan, inputs, chunk_size=chunk_size, backend=backend, **options)
    assert_close(y, y_ref, f"{label} y", dtype=dtype)
    assert_close(torch.cos(final.angle), torch.cos(final_ref.angle), f"{label} final angle", dtype=dtype)
    for field in ("ssm", "k", "x"):
        assert_close(getattr(final, field), getattr(final_ref, field), f"{label} final {field}", dtype=dtype)
    for name, grad_ref in grads_ref.items():
        assert grads[name] is not None, f"{label}: no gradient for {name}"
        assert_close(grads[name], grad_ref, f"{label} d{name}", dtype=dtype)


FAST_PATHS = ["chunked", compiled("compiled")]


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("length", [1, 7, 63, 257])
def test_chunked_matches_reference_siso(length, dtype, backend):
    compare(make_inputs(length, dtype), f"siso L={length}", dtype, backend)


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("length", [1, 63])
def test_chunked_matches_reference_with_initial_state(length, dtype, backend):
    compare(make_inputs(length, dtype, initial_state=True), f"initial state L={length}", dtype, backend)


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("rotary", ["pairwise", "halves"])
@pytest.mark.parametrize("length", [7, 63])
def test_chunked_matches_reference_mimo(length, rotary, backend):
    inputs = make_inputs(length, torch.float64, rank=3, initial_state=True)
    compare(inputs, f"mimo R=3 {rotary} L={length}", torch.float64, backend, rotary=rotary)


@pytest.mark.parametrize("backend", FAST_PATHS)
@pytest.mark.parametrize("rank, rotary, length", [(1, "pairwise", 7), (2, "halves", 5)])
def test_chunked_backward_passes_gradcheck(rank, rotary, length, backend):
    """The hand-written backward of the chunked path against finite differences (float64, small sizes,
    chunks of 2 so that state passing, padding and the carried-in state are all crossed)."""
    inputs = make_inputs(length, torch.float64, rank=rank, seed=5, initial_state=True)
    names = [name for name in inputs if name != "initial_state"]
    state = inputs["initial_state"]

    def scan(*tensors):
        arguments = dict(zip(names, tensors[: len(names)], strict=True))
        initial = Mamba3ScanState(*tensors[len(names):])
        y, final = mamba3_scan(**arguments, initial_state=initial, output_final_state=True, rotary=rotary,
                               chunk_size=2, backend=backend)
        return y, torch.cos(final.angle), final.ssm, final.k

    leaves = [inputs[name].detach().clone().requires_grad_(True) for name in names]
    leaves += [t.detach().clone().requires_grad_(True) for t in state]
    assert torch.autograd.gradcheck(scan, leaves, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("chunks", [1, 7, 12, 64])
def test_two_level_state_passing_matches_the_plain_recurrence(chunks, reverse):
    gen = torch.Generator().manual_seed(chunks)
    x = torch.randn(2, 3, chunks, 4, 5, generator=gen, dtype=torch.float64)
    a = torch.rand(2, 3, chunks, 1, 1, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    for start in (h0, None):
        state = torch.zeros_like(h0) if start is None else start
        expected = [None] * chunks
        for c in (range(chunks - 1, -1, -1) if reverse else range(chunks)):
            state = a[:, :, c] * state + x[:, :, c]
            expected[c] = state
        assert_close(_linear_scan(x, a, start, reverse), torch.stack(expected, dim=2),
                     f"K={chunks} reverse={reverse} h0={start is not None}")


def test_mimo_without_down_projection_returns_every_rank():
    inputs = make_inputs(19, torch.float64, rank=2)
    del inputs["mimo_o"]
    y = mamba3_scan(**inputs, chunk_size=CHUNK)[0]
    y_ref = mamba3_scan_ref(**inputs)[0]
    assert y.shape == (BATCH, 19, 2, HEADS, HEADDIM)
    assert_close(y, y_ref, "mimo per-rank outputs")


@pytest.mark.parametrize("backend", ["chunked", compiled("compiled"), "sequential"])
def test_split_sequence_continues_from_final_state(backend):
    """scan(a) then scan(b) from its final state == scan(a + b): the state carries the angle, the
    SSM state and the previous token's k and x (the trapezoid's second term)."""
    inputs = make_inputs(45, torch.float64)
    y, final = mamba3_scan(**inputs, output_final_state=True, chunk_size=CHUNK, backend=backend)
    per_step = {"x", "dt", "A", "B", "C", "trap", "angles", "z"}
    first = {k: (v[:, :20] if k in per_step else v) for k, v in inputs.items()}
    second = {k: (v[:, 20:] if k in per_step else v) for k, v in inputs.items()}
    y_a, state = mamba3_scan(**first, output_final_state=True, chunk_size=CHUNK, backend=backend)
    y_b, final_b = mamba3_scan(**second, initial_state=state, output_final_state=True, chunk_size=CHUNK,
                               backend=backend)
    assert_close(torch.cat([y_a, y_b], dim=1), y, f"{backend}: split vs whole")
    assert_close(final_b.ssm, final.ssm, f"{backend}: final ssm after split")


@pytest.mark.parametrize("rank", [1, 2])
def test_step_matches_reference(rank):
    inputs = make_inputs(9, torch.float64, rank=rank, initial_state=True)
    y_ref, final_ref = mamba3_scan_ref(**inputs, output_final_state=True, rotary="halves")
    state = inputs.pop("initial_state")
    per_step = {"x", "dt", "A", "B", "C", "trap", "angles", "z"}
    outputs = []
    for t in range(9):
        y_t, state = mamba3_step(**{k: (v[:, t] if k in per_step else v) for k, v in inputs.items()}, state=state,
                                 rotary="halves")
        outputs.append(y_t)
    assert_close(torch.stack(outputs, dim=1), y_ref, f"R={rank} steps vs reference")
    assert_close(state.ssm, final_ref.ssm, f"R={rank} step state")


@pytest.mark.parametrize("backend", ["chunked", compiled("compiled"), "sequential"])
def test_trapezoid_weight_one_and_no_rotation_is_mamba2(backend):
    """lam = 1 keeps only the current input (Euler's rule) and zero angles make the rotation the
    identity: the scan is then Mamba-2's SSD with the same x, dt, A, B, C, D, z (no biases)."""
    inputs = make_inputs(63, torch.float64)
    A = -(1 + torch.rand(HEADS, dtype=torch.float64))
    x, dt, B, C, D, z = (inputs[k] for k in ("x", "dt", "B", "C", "D", "z"))
    y3 = mamba3_scan(x, dt, A, B, C, torch.ones_like(dt), torch.zeros_like(inputs["angles"]), D=D, z=z,
                     chunk_size=CHUNK, backend=backend)[0]
    assert_close(y3, ssd_ref(x, dt, A, B, C, D=D, z=z), f"{backend}: lam=1, theta=0 vs ssd_ref")
    # and the trapezoid's second term is real: lam < 1 changes the output
    y_trap = mamba3_scan(x, dt, A, B, C, inputs["trap"], torch.zeros_like(inputs["angles"]), D=D, z=z,
                         backend=backend)[0]
    assert (y_trap - y3).abs().max() > 1e-2


@pytest.mark.parametrize("rotary", ["pairwise", "halves"])
def test_rotation_is_complex_multiplication(rotary):
    """Rot(theta) on a pair (a, b) is (a + i b) e^{i theta}; channels past the S pairs pass through."""
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    theta = torch.rand(5, 4, generator=gen, dtype=torch.float64) * 6
    out = rotate(t, theta, rotary)
    if rotary == "pairwise":
        first, second, rest_in, rest_out = t[:, 0:8:2], t[:, 1:8:2], t[:, 8:], out[:, 8:]
        out_first, out_second = out[:, 0:8:2], out[:, 1:8:2]
    else:
        first, second, rest_in, rest_out = t[:, :4], t[:, 6:10], t[:, [4, 5, 10, 11]], out[:, [4, 5, 10, 11]]
        out_first, out_second = out[:, :4], out[:, 6:10]
    expected = torch.complex(first, second) * torch.exp(1j * theta)
    assert_close(torch.complex(out_first, out_second), expected, f"{rotary} rotated pairs")
    assert torch.equal(rest_out, rest_in)
    if rotary == "pairwise":  # odd strides cannot be viewed as complex numbers: the real form runs
        odd = rotate(t[:, :11].contiguous(), theta, rotary)  # strides (11, 1)
        assert_close(odd[:, :8], out[:, :8], "pairwise rotation of an odd-strided tensor")
        assert torch.equal(odd[:, 8:], t[:, 8:11])


@needs_compiler
def test_backend_choice():
    assert resolve_backend("auto", "cpu") == "compiled"
    assert resolve_backend("compiled", "cpu") == "compiled"
    assert resolve_backend("auto", "meta") == "chunked"
    assert resolve_backend("chunked", "cpu") == "chunked"
    assert resolve_backend("sequential", "cpu") == "sequential"
    with pytest.raises(ValueError, match="valid: 'auto', 'compiled', 'chunked', 'sequential'"):
        resolve_backend("fused", "cpu")


def test_bad_shapes_are_named():
    inputs = make_inputs(5, torch.float32)
    with pytest.raises(ValueError, match="angles must be"):
        mamba3_scan(**{**inputs, "angles": torch.randn(BATCH, 5, HEADS, DSTATE)})
    with pytest.raises(ValueError, match="trap must be"):
        mamba3_scan(**{**inputs, "trap": torch.rand(BATCH, 5, 1)})
