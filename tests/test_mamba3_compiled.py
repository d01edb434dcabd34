"""The compiled Mamba-3 scan (seqarch/ops/csrc/mamba3.cpp) at sizes that reach its vector tiles.

tests/test_mamba3_scan.py runs every backend at tiny head and state sizes (only the kernel's scalar
column loops run there); here P, N and the rows per chunk span whole 64-byte vectors, blocks of four
of them and a remainder, so the register-tiled products and their lower-triangular bounds run too.
Compiled, chunked and sequential paths are held to each other, forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from seqarch.ops.mamba3 import mamba3_scan
from tests.compiled import needs_compiler
from tests.mamba3_helpers import Sizes, run_with_grads, scan_inputs
from tests.tolerance import assert_close

pytestmark = needs_compiler

# P = 20 and N = 72: one or two vectors plus a remainder (float32: 16 lanes, float64: 8); S = 20 angles.
BATCH, HEADS, HEADDIM, GROUPS, DSTATE, ANGLES = SIZES = Sizes(2, 2, 20, 1, 72, 20)


def make_inputs(length: int, dtype, rank: int = 1, seed: int = 0) -> dict:
    """Random inputs at the mixer's scales (tests/mamba3_helpers.scan_inputs), with a carried-in state."""
    return scan_inputs(SIZES, length, dtype, rank, seed, initial_state=True)


def check_against(reference: str, inputs: dict, dtype, label: str, **options) -> None:
    y_ref, final_ref, grads_ref = run_with_grads(mamba3_scan, inputs, backend=reference, **options)
    y, final, grads = run_with_grads(mamba3_scan, inputs, backend="compiled", **options)
    label = f"compiled vs {reference} {label}"
    assert_close(y, y_ref, f"{label} y", dtype=dtype)
    assert_close(torch.cos(final.angle), torch.cos(final_ref.angle), f"{label} final angle", dtype=dtype)
    for field in ("ssm", "k", "x"):
        assert_close(getattr(final, field), getattr(final_ref, field), f"{label} final {field}", dtype=dtype)
    assert set(grads) == set(grads_ref)
    for name, grad_ref in grads_ref.items():
        assert grads[name] is not None, f"{label}: no gradient for {name}"
        assert grad_ref.abs().max() > 0, f"{label}: the reference gradient of {name} is zero (a test that cannot fail)"
        assert_close(grads[name], grad_ref, f"{label} d{name}", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rank, rotary, chunk", [(1, "pairwise", 32), (1, "pairwise", 20), (2, "halves", 24),
                                                 (3, "pairwise", 8)])
def test_compiled_matches_sequential_at_vector_sizes(rank, rotary, chunk, dtype):
    """Rows per chunk Q R = 32, 20, 48, 24: whole vectors, a remainder, and (MIMO) time blocks of R rows
    inside the lower block-triangular products; L = 77 pads the last chunk."""
    inputs = make_inputs(77, dtype, rank=rank)
    check_against("sequential", inputs, dtype, f"R={rank} {rotary} Q={chunk}", rotary=rotary, chunk_size=chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_compiled_matches_chunked_over_many_chunks(dtype):
    """L = 700 in chunks of 64 (11 chunks, the last padded), the default chunk length: the state is
    passed through the kernel's loop as through the PyTorch path's two-level scan."""
    check_against("chunked", make_inputs(700, dtype, seed=1), dtype, "L=700 Q=64", chunk_size=64)


def test_compiled_forward_without_gradients_matches():
    """Under no_grad the kernel keeps no entering states; the outputs are the same."""
    inputs = make_inputs(45, torch.float64)
    with torch.no_grad():
        y, final = mamba3_scan(**inputs, chunk_size=16, backend="compiled", output_final_state=True)
    y_ref, final_ref = mamba3_scan(**inputs, chunk_size=16, backend="sequential", output_final_state=True)
    assert_close(y, y_ref, "no_grad y")
    assert_close(final.ssm, final_ref.ssm, "no_grad final ssm")


def test_compiled_refuses_half_precision_and_auto_falls_back():
    inputs = {name: value.to(torch.bfloat16) for name, value in make_inputs(9, torch.float32).items()
              if name != "initial_state"}
    with pytest.raises(ValueError, match="float32 or float64"):
        mamba3_scan(**inputs, backend="compiled")
    y = mamba3_scan(**inputs, backend="auto")[0]
    assert_close(y.float(), mamba3_scan(**inputs, backend="chunked")[0].float(), "auto on bfloat16 runs chunked")
