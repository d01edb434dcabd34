"""wkv6: every backend against the sequential recurrence (autograd through `wkv6_ref`), forward, final
state and gradients. The eager chunked and parallel forms first; then the compiled C++ kernel against
the recurrence and the chunked path, on odd lengths and chunk sizes, with and without initial and
final states, under strong decays; plus finite differences and dispatch."""

from __future__ import annotations

import pytest
import torch

import seqarch.ops.wkv as wkv_module
from seqarch.ops.wkv import resolve_backend, wkv6, wkv6_parallel, wkv6_ref, wkv6_step
from tests.compiled import needs_compiler
from tests.tolerance import assert_close

HEADS, KEY, VALUE = 3, 8, 5


def make_inputs(length, dtype, decay_range=(-1.0, 0.0), batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    low, high = decay_range
    w = torch.rand(batch, HEADS, length, KEY, generator=generator, dtype=dtype) * (high - low) + low
    return {
        "r": randn(batch, HEADS, length, KEY),
        "k": randn(batch, HEADS, length, KEY),
        "v": randn(batch, HEADS, length, VALUE),
        "w": w,
        "u": randn(HEADS, KEY),
        "initial_state": randn(batch, HEADS, KEY, VALUE),
    }


def run_with_grads(op, inputs, **kwargs):
    """op's output and final state, and the gradients of a random projection of both."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items()}
    out, state = op(**leaves, output_final_state=True, **kwargs)
    generator = torch.Generator().manual_seed(7)
    # Drawn in float64 for every dtype, so float32 and float64 runs see the same projection.
    loss = (out * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=generator, dtype=torch.float64).to(state.dtype)).sum()
    loss.backward()
    return out, state, {name: t.grad for name, t in leaves.items()}


def assert_same(actual, expected, label):
    out, state, grads = actual
    out_ref, state_ref, grads_ref = expected
    assert_close(out, out_ref, f"{label} output")
    assert_close(state, state_ref, f"{label} final state")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], f"{label} d{name}")


FORMS = {
    "chunked": lambda **kw: wkv6(**kw, backend="chunked"),
    "chunked_c16_e4": lambda **kw: wkv6(**kw, chunk_size=16, subchunk_size=4, backend="chunked"),
    "chunked_c8_e8": lambda **kw: wkv6(**kw, chunk_size=8, subchunk_size=8, backend="chunked"),
    "parallel": wkv6_parallel,
}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("length", [1, 7, 63, 100])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_forms_match_recurrence(form, length, dtype, with_state):
    inputs = make_inputs(length, dtype)
    if not with_state:
        inputs.pop("initial_state")
    assert_same(run_with_grads(FORMS[form], inputs), run_with_grads(wkv6_ref, inputs), f"{form} L={length}")


def test_chunked_survives_strong_decay_over_long_sequences():
    """Decays of e^-5 .. e^-20 per step: a reference point at the chunk start would need exp(+600)."""
    inputs = make_inputs(2000, torch.float64, decay_range=(-20.0, -5.0), batch=1)
    out, state = wkv6(**inputs, output_final_state=True, backend="chunked")
    out_ref, state_ref = wkv6_ref(**inputs, output_final_state=True)
    assert_close(out, out_ref, "strong decay output")
    assert_close(state, state_ref, "strong decay final state")


def test_strong_decay_gradients_float32():
    """float32 forward and gradients with mixed strong and weak decays, against the float64 recurrence."""
    inputs = make_inputs(97, torch.float64, decay_range=(-20.0, 0.0), batch=1)
    expected = run_with_grads(wkv6_ref, inputs)
    actual = run_with_grads(FORMS["chunked"], {name: t.float() for name, t in inputs.items()})
    out, state, grads = actual
    assert_close(out, expected[0].float(), "f32 output", tolerance=2e-5)
    assert_close(state, expected[1].float(), "f32 final state", tolerance=2e-5)
    for name, grad in grads.items():
        assert_close(grad, expected[2][name].float(), f"f32 d{name}", tolerance=1e-4)


def test_recurrence_matches_its_definition_by_hand():
    """Two tokens written out: o_1 = r_1 (diag(u) k_1^T v_1 + S_0 e^0 ...) by the formula, not the code."""
    inputs = make_inputs(2, torch.float64, batch=1)
    r, k, v, w, u, s0 = (inputs[n][0, 0] if n != "u" else inputs[n][0] for n in ("r", "k", "v", "w", "u",
                                                                                  "initial_state"))
    s1 = torch.diag(w[0].exp()) @ s0 + torch.outer(k[0], v[0])
    o0 = r[0] @ (s0 + torch.diag(u) @ torch.outer(k[0], v[0]))
    o1 = r[1] @ (s1 + torch.diag(u) @ torch.outer(k[1], v[1]))
    s2 = torch.diag(w[1].exp()) @ s1 + torch.outer(k[1], v[1])
    out, state = wkv6_ref(**inputs, scale=1.0, output_final_state=True)
    assert_close(out[0, 0], torch.stack([o0, o1]), "hand-written outputs")
    assert_close(state[0, 0], s2, "hand-written state")


def test_default_scale_is_inverse_sqrt_key_size():
    inputs = make_inputs(9, torch.float64)
    out_default, _ = wkv6(**inputs)
    out_explicit, _ = wkv6(**inputs, scale=KEY**-0.5)
    out_unscaled, _ = wkv6(**inputs, scale=1.0)
    assert_close(out_default, out_explicit, "scale=None is K^-0.5")
    assert_close(out_default, out_unscaled * KEY**-0.5, "scale multiplies the output linearly")


def test_split_sequence_continues_from_state():
    inputs = make_inputs(45, torch.float64)
    out, state = wkv6(**inputs, output_final_state=True)
    first = {n: t[:, :, :20] if t.ndim == 4 and n != "initial_state" else t for n, t in inputs.items()}
    second = {n: t[:, :, 20:] if t.ndim == 4 and n != "initial_state" else t for n, t in inputs.items()}
    out_a, state_a = wkv6(**first, output_final_state=True)
    out_b, state_b = wkv6(**{**second, "initial_state": state_a}, output_final_state=True)
    assert_close(torch.cat([out_a, out_b], dim=2), out, "two halves vs whole")
    assert_close(state_b, state, "state after two halves")


def test_step_matches_reference_and_keeps_dtype():
    inputs = make_inputs(5, torch.float64)
    out_ref, _ = wkv6_ref(**inputs, output_final_state=True)
    state = inputs["initial_state"]
    for t in range(5):
        out_t, state = wkv6_step(*(inputs[n][:, :, t] for n in ("r", "k", "v", "w")), inputs["u"], state)
        assert out_t.dtype == torch.float64
        assert_close(out_t, out_ref[:, :, t], f"step {t}")


def test_reduced_precision_inputs_compute_in_float32():
    inputs = make_inputs(40, torch.float32)
    out, state = wkv6(**{n: t.bfloat16() for n, t in inputs.items()}, output_final_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    out_ref, _ = wkv6_ref(**{n: t.bfloat16().float() for n, t in inputs.items()})
    assert_close(out, out_ref.bfloat16(), "bf16 output", dtype=torch.bfloat16)


def test_bad_shapes_and_chunk_sizes_are_named():
    inputs = make_inputs(8, torch.float32)
    with pytest.raises(ValueError, match=r"u must be \(H, K\)"):
        wkv6(**{**inputs, "u": torch.randn(HEADS + 1, KEY)})
    with pytest.raises(ValueError, match="v must be"):
        wkv6(**{**inputs, "v": torch.randn(2, HEADS, 9, VALUE)})
    with pytest.raises(ValueError, match="initial_state must be"):
        wkv6(**{**inputs, "initial_state": torch.randn(2, HEADS, KEY, KEY + 1)})
    with pytest.raises(ValueError, match="multiple of subchunk_size"):
        wkv6(**inputs, chunk_size=12, subchunk_size=8)


# --- the compiled kernel -----------------------------------------------------------------------
def compiled(**kwargs):
    return wkv6(**kwargs, backend="compiled")


def chunked(**kwargs):
    return wkv6(**kwargs, backend="chunked")


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
                    subchunk_size=4, backend="compiled")

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
    assert resolve_backend("auto", "cpu") == "compiled"
    assert resolve_backend("compiled", "cpu") == "compiled"
    for backend in ("chunked", "parallel", "sequential"):
        assert resolve_backend(backend, "cpu") == backend


class UnusableKernel:
    def usable(self):
        return False, "no C++ compiler on PATH"


def test_without_the_kernel_auto_runs_the_eager_path_exactly(monkeypatch):
    """The fallback the dispatch picks (tests/test_backends.py) computes the same function."""
    monkeypatch.setattr(wkv_module, "KERNEL", UnusableKernel())
    inputs = make_inputs(9, torch.float64)
    assert_close(wkv6(**inputs)[0], wkv6_ref(**inputs)[0], "fallback output")


def test_bad_backends_are_named():
    with pytest.raises(ValueError, match="backend='fast'; valid: 'auto', 'compiled', 'chunked', 'parallel', 'seq"):
        wkv6(**make_inputs(4, torch.float32), backend="fast")


@pytest.mark.parametrize("backend", ["parallel", "sequential"])
def test_entry_point_runs_the_references(backend):
    inputs = make_inputs(9, torch.float64)
    op = wkv6_parallel if backend == "parallel" else wkv6_ref
    assert torch.equal(wkv6(**inputs, output_final_state=True, backend=backend)[1],
                       op(**inputs, output_final_state=True)[1])


def test_old_path_keyword_still_works_with_a_deprecation_warning():
    inputs = make_inputs(9, torch.float64)
    with pytest.warns(DeprecationWarning, match="wkv6: the keyword path= is deprecated.*backend='chunked'"):
        out, _ = wkv6(**inputs, path="chunked")
    assert torch.equal(out, wkv6(**inputs, backend="chunked")[0])
