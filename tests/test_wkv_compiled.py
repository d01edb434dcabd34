"""wkv6's compiled C++ kernel against the sequential recurrence (autograd through `wkv6_ref`) and the
eager chunked path: output, final state and every gradient, on odd lengths and chunk sizes, with and
without initial and final states, under strong decays; plus finite differences and dispatch."""

from __future__ import annotations

import pytest
import torch

import seqarch.ops.wkv as wkv_module
from seqarch.backends import cpp_compiler_available
from seqarch.ops.wkv import resolve_path, wkv6, wkv6_ref
from tests.test_wkv import HEADS, KEY, VALUE, assert_same, make_inputs, run_with_grads
from tests.tolerance import assert_close

needs_compiler = pytest.mark.skipif(not cpp_compiler_available(), reason="no C++ compiler (c++ or g++) on PATH")


def compiled(**kwargs):
    return wkv6(**kwargs, path="compiled")


def chunked(**kwargs):
    return wkv6(**kwargs, path="chunked")


@needs_compiler
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("length", [1, 37, 130])
@pytest.mark.parametrize("chunk_size", [8, 32])
def test_compiled_matches_recurrence_and_chunked(chunk_size, length, dtype, with_state):
    inputs = make_inputs(length, dtype)
    if not with_state:
        inputs.pop("initial_state")
    actual = run_with_grads(compiled, inputs, chunk_size=chunk_size)
    assert actual[0].dtype == dtype and actual[1].dtype == dtype
    assert_same(actual, run_with_grads(wkv6_ref, inputs), f"compiled vs recurrence L={length} C={chunk_size}")
    assert_same(actual, run_with_grads(chunked, inputs), f"compiled vs chunked L={length} C={chunk_size}")


@needs_compiler
@pytest.mark.parametrize(("length", "chunk_size"), [(16, 16), (17, 16), (33, 1), (40, 64)])
def test_lengths_around_the_checkpoint_interval(length, chunk_size):
    inputs = make_inputs(length, torch.float64)
    actual = run_with_grads(compiled, inputs, chunk_size=chunk_size, subchunk_size=1)  # E: the eager path's
    assert_same(actual, run_with_grads(wkv6_ref, inputs), f"compiled L={length} C={chunk_size}")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_wide_heads_cover_every_column_tile(dtype):
    """K = 64 as RWKV-6 and V = 57 = 32 + 16 + 8 + 1: every tile width the kernel splits V into."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, length, keys, values = 2, 2, 21, 64, 57

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    inputs = {
        "r": randn(batch, heads, length, keys), "k": randn(batch, heads, length, keys),
        "v": randn(batch, heads, length, values),
        "w": -torch.rand(batch, heads, length, keys, generator=generator, dtype=dtype),
        "u": randn(heads, keys), "initial_state": randn(batch, heads, keys, values),
    }
    actual = run_with_grads(compiled, inputs, chunk_size=8)
    assert_same(actual, run_with_grads(wkv6_ref, inputs), f"compiled K={keys} V={values}")


def loss_of(out, state, seed=7):
    generator = torch.Generator().manual_seed(seed)
    loss = 0
    for tensor in (out, state):
        if tensor is not None:
            loss = loss + (tensor * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)).sum()
    return loss


@needs_compiler
@pytest.mark.parametrize("used", ["output_only", "state_only"])
def test_gradients_when_only_one_result_is_used(used):
    """Without a final-state gradient (output_final_state=False) or without an output gradient (only the
    state reaches the loss): the kernel sees None for the unused one."""
    inputs = make_inputs(45, torch.float64)
    grads = {}
    for name, op in (("compiled", compiled), ("recurrence", wkv6_ref)):
        leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
        out, state = op(**leaves, output_final_state=used == "state_only")
        assert (state is None) == (used == "output_only")
        loss_of(None if used == "state_only" else out, state).backward()
        grads[name] = {n: t.grad for n, t in leaves.items()}
    for name, grad in grads["compiled"].items():
        expected = grads["recurrence"][name]  # None where autograd finds no path (r does not reach the state)
        assert_close(grad, torch.zeros_like(grad) if expected is None else expected, f"{used} d{name}")


@needs_compiler
def test_finite_differences_float64():
    inputs = make_inputs(7, torch.float64, batch=1)
    leaves = tuple(inputs[n].clone().requires_grad_(True) for n in ("r", "k", "v", "w", "u", "initial_state"))

    def op(r, k, v, w, u, initial_state):
        return wkv6(r, k, v, w, u, initial_state=initial_state, output_final_state=True, chunk_size=4,
                    subchunk_size=4, path="compiled")

    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@needs_compiler
def test_strong_decay_over_2000_tokens_float32_matches_float64():
    """Half the channels decay by e^-20 .. e^-15 per step, the rest by e^-20 .. e^0: the float32 kernel
    against float64 results, no inf or nan. Output and state against the recurrence; gradients against
    the eager chunked path (held to the recurrence in tests/test_wkv.py), since autograd through 2000
    recurrence steps takes longer than this whole file."""
    inputs = make_inputs(2000, torch.float64, decay_range=(-20.0, 0.0), batch=1)
    inputs["w"][..., : KEY // 2] = inputs["w"][..., : KEY // 2] * 0.25 - 15.0
    with torch.no_grad():
        out_ref, state_ref = wkv6_ref(**inputs, output_final_state=True)
    expected_chunked = run_with_grads(chunked, inputs)
    out, state, grads = run_with_grads(compiled, {name: t.float() for name, t in inputs.items()})
    assert_close(out, out_ref.float(), "strong decay f32 output")
    assert_close(state, state_ref.float(), "strong decay f32 final state")
    for name, grad in grads.items():
        assert_close(grad, expected_chunked[2][name].float(), f"strong decay f32 d{name}", tolerance=1e-4)
    assert_same(run_with_grads(compiled, inputs), expected_chunked, "strong decay f64 vs chunked")


@needs_compiler
def test_non_contiguous_and_reduced_precision_inputs():
    inputs = make_inputs(29, torch.float32)
    transposed = {n: t.transpose(1, 2).contiguous().transpose(1, 2) if t.ndim == 4 and n != "initial_state" else t
                  for n, t in inputs.items()}
    assert not transposed["r"].is_contiguous()
    assert_same(run_with_grads(compiled, transposed), run_with_grads(wkv6_ref, inputs), "non-contiguous")
    out, state = compiled(**{n: t.bfloat16() for n, t in inputs.items()}, output_final_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    out_ref, _ = wkv6_ref(**{n: t.bfloat16().float() for n, t in inputs.items()})
    assert_close(out, out_ref.bfloat16(), "bf16 output", dtype=torch.bfloat16)


@needs_compiler
def test_inference_without_grad_and_empty_sequence():
    inputs = make_inputs(19, torch.float64)
    with torch.no_grad():
        out, state = compiled(**inputs, output_final_state=True)
    out_ref, state_ref = wkv6_ref(**inputs, output_final_state=True)
    assert_close(out, out_ref, "no-grad output")
    assert_close(state, state_ref, "no-grad final state")
    empty = make_inputs(0, torch.float64)
    out, state = compiled(**empty, output_final_state=True)
    assert out.shape == (2, HEADS, 0, VALUE)
    assert_close(state, empty["initial_state"], "empty sequence keeps the initial state")


# --- dispatch ------------------------------------------------------------------------------------
@needs_compiler
def test_auto_on_cpu_picks_the_compiled_kernel():
    assert resolve_path("auto", "cpu") == "compiled"
    assert resolve_path("compiled", "cpu") == "compiled"
    assert resolve_path("chunked", "cpu") == "chunked"


def test_without_the_kernel_auto_runs_the_eager_path_exactly(monkeypatch):
    """The fallback the dispatch picks (tests/test_backends.py) computes the same function."""
    monkeypatch.setattr(wkv_module, "compiled_kernel_usable", lambda: (False, "no C++ compiler on PATH"))
    inputs = make_inputs(9, torch.float64)
    assert_close(wkv6(**inputs)[0], wkv6_ref(**inputs)[0], "fallback output")


def test_bad_paths_are_named():
    with pytest.raises(ValueError, match="path='fast'; valid: 'auto', 'compiled', 'chunked'"):
        wkv6(**make_inputs(4, torch.float32), path="fast")
