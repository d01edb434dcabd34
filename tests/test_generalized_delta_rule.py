"""generalized_delta_rule: the chunked DPLR form and the compiled C++ kernel against the sequential
recurrence (forward, final state and gradients; finite differences for the kernel), and both against
flash-linear-attention's own `dplr_recurrence`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqarch.ops.generalized_delta_rule as gdr_module
from seqarch.backends import cpp_compiler_available
from seqarch.ops.generalized_delta_rule import (
    describe_backend,
    generalized_delta_rule,
    generalized_delta_rule_ref,
    generalized_delta_rule_step,
    resolve_backend,
)
from tests.compiled import compiled, needs_compiler
from tests.references import load_fla_file
from tests.tolerance import RELATIVE_TOLERANCE, assert_close

HEADS, KEY, VALUE = 3, 8, 5


def make_inputs(length, dtype, decay_range=(-0.606531, 0.0), batch=2, seed=0, with_state=True):
    """RWKV-7-shaped inputs: a = -kappa_hat, b = kappa_hat * a_in with kappa_hat unit-norm per head and
    a_in in (0, 1), so the transition diag(exp(gk)) + b a^T is a contraction, as in the model."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=dtype)

    shape = (batch, length, HEADS, KEY)
    kappa = F.normalize(randn(*shape), dim=-1)
    low, high = decay_range
    inputs = {
        "q": randn(*shape),
        "k": randn(*shape),
        "v": randn(batch, length, HEADS, VALUE),
        "a": -kappa,
        "b": kappa * rand(*shape),
        "gk": rand(*shape) * (high - low) + low,
    }
    if with_state:
        inputs["initial_state"] = randn(batch, HEADS, KEY, VALUE)
    return inputs


def run_with_grads(op, inputs, **kwargs):
    """op's output and final state, and the gradients of a random projection of both."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items()}
    out, state = op(**leaves, output_final_state=True, **kwargs)
    generator = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=generator, dtype=torch.float64).to(state.dtype)).sum()
    loss.backward()
    return out, state, {name: t.grad for name, t in leaves.items()}


def assert_same(actual, expected, label, dtype=None):
    out, state, grads = actual
    out_ref, state_ref, grads_ref = expected
    assert_close(out, out_ref, f"{label} output", dtype=dtype)
    assert_close(state, state_ref, f"{label} final state", dtype=dtype)
    # A gradient that is exactly zero in exact arithmetic (e.g. d gk of a zero state) is rounding noise in
    # both forms: it is held to the tolerance relative to a tenth of the largest gradient, not to zero.
    common = max(grad.abs().max().item() for grad in grads_ref.values())
    base = RELATIVE_TOLERANCE[dtype or out_ref.dtype]
    for name, grad in grads.items():
        assert grad is not None, f"{label}: d{name} is missing"
        own = max(grads_ref[name].abs().max().item(), 1e-6)
        assert_close(grad, grads_ref[name], f"{label} d{name}", dtype=dtype,
                     tolerance=base * max(1.0, 0.1 * common / own))


FORMS = {
    "chunked": lambda **kw: generalized_delta_rule(**kw, backend="chunked"),
    "chunked_c16_e4": lambda **kw: generalized_delta_rule(**kw, backend="chunked", chunk_size=16, subchunk_size=4),
    "chunked_c8_e8": lambda **kw: generalized_delta_rule(**kw, backend="chunked", chunk_size=8, subchunk_size=8),
}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("length", [1, 7, 63, 257])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_chunked_matches_recurrence(form, length, dtype, with_state):
    inputs = make_inputs(length, dtype, with_state=with_state)
    assert_same(run_with_grads(FORMS[form], inputs), run_with_grads(generalized_delta_rule_ref, inputs),
                f"{form} L={length}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_chunked_survives_strong_decay(dtype):
    """Decays down to e^-20 per step: a reference point at the chunk start would need exp(+640)."""
    inputs = make_inputs(300, dtype, decay_range=(-20.0, 0.0))
    assert_same(run_with_grads(FORMS["chunked"], inputs), run_with_grads(generalized_delta_rule_ref, inputs),
                "gk in (-20, 0)")


def test_chunked_float32_is_as_accurate_as_the_recurrence():
    """Against the float64 recurrence, over 1500 tokens with gk from -20 to -5 (a state that forgets
    within a token) and from RWKV-7's range: the float32 chunked form keeps float32 accuracy."""
    for decay_range in [(-20.0, -5.0), (-0.606531, 0.0)]:
        inputs = make_inputs(1500, torch.float64, decay_range=decay_range, batch=1)
        out_ref, state_ref = generalized_delta_rule_ref(**inputs, output_final_state=True)
        out, state = generalized_delta_rule(**{name: t.float() for name, t in inputs.items()}, output_final_state=True)
        assert_close(out.double(), out_ref, f"gk in {decay_range} output", dtype=torch.float32)
        assert_close(state.double(), state_ref, f"gk in {decay_range} final state", dtype=torch.float32)


def test_general_a_b_and_scale():
    """Not only RWKV-7's a = -kappa, b = kappa * a_in: independent random a, b (small, so the state
    stays bounded) and an explicit scale."""
    generator = torch.Generator().manual_seed(3)
    inputs = make_inputs(45, torch.float64)
    inputs["a"] = 0.2 * torch.randn(inputs["a"].shape, generator=generator, dtype=torch.float64)
    inputs["b"] = 0.2 * torch.randn(inputs["b"].shape, generator=generator, dtype=torch.float64)
    assert_same(run_with_grads(FORMS["chunked_c16_e4"], inputs, scale=0.7),
                run_with_grads(generalized_delta_rule_ref, inputs, scale=0.7), "general a, b, scale=0.7")


def test_state_splits_and_step():
    """Two calls carrying the state equal one call; the step equals the reference's token."""
    inputs = make_inputs(50, torch.float64)
    out, state = generalized_delta_rule(**inputs, output_final_state=True)
    first = {name: t[:, :21] if name != "initial_state" else t for name, t in inputs.items()}
    second = {name: t[:, 21:] for name, t in inputs.items() if name != "initial_state"}
    out_a, state_a = generalized_delta_rule(**first, output_final_state=True)
    out_b, state_b = generalized_delta_rule(**second, initial_state=state_a, output_final_state=True)
    assert_close(torch.cat([out_a, out_b], dim=1), out, "split output")
    assert_close(state_b, state, "split final state")
    step_state = inputs["initial_state"]
    for t in range(3):
        out_t, step_state = generalized_delta_rule_step(*(inputs[n][:, t] for n in ("q", "k", "v", "a", "b", "gk")),
                                                        step_state)
        assert_close(out_t, out[:, t], f"step {t}")


def test_output_dtype_and_no_state_by_default():
    inputs = make_inputs(9, torch.float32, with_state=False)
    out, state = generalized_delta_rule(**inputs)
    assert state is None and out.dtype == torch.float32 and out.shape == (2, 9, HEADS, VALUE)


def test_backend_resolution_and_bad_arguments():
    assert resolve_backend("auto", "cpu") == ("compiled" if cpp_compiler_available() else "chunked")
    assert resolve_backend("chunked", "cpu") == "chunked"
    assert resolve_backend("sequential", "cpu") == "sequential"
    assert resolve_backend("auto", "meta") == "chunked"  # the kernel is CPU-only
    with pytest.raises(ValueError, match="backend='compiled' is a CPU kernel"):
        resolve_backend("compiled", "meta")
    with pytest.raises(ValueError, match="backend='parallel'"):
        resolve_backend("parallel", "cpu")
    assert "compiled C++ CPU kernel" in describe_backend("auto") or not cpp_compiler_available()
    inputs = make_inputs(5, torch.float32)
    with pytest.raises(ValueError, match="initial_state"):
        generalized_delta_rule(**{**inputs, "initial_state": inputs["initial_state"][:1]})
    with pytest.raises(ValueError, match="chunk_size"):
        generalized_delta_rule(**inputs, chunk_size=12, subchunk_size=8)


# --- the compiled kernel ------------------------------------------------------------------------------
def compiled_op(**kwargs):
    return generalized_delta_rule(**kwargs, backend="compiled")


@needs_compiler
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("length", [1, 7, 63, 257])
def test_compiled_matches_recurrence(length, dtype, with_state):
    """Forward, final state and every gradient (q, k, v, a, b, gk, initial_state); C = 32 checkpoints, so
    63 and 257 end inside a chunk and 257 walks nine of them."""
    inputs = make_inputs(length, dtype, with_state=with_state)
    actual = run_with_grads(compiled_op, inputs)
    assert actual[0].dtype == dtype and actual[1].dtype == dtype
    assert_same(actual, run_with_grads(generalized_delta_rule_ref, inputs), f"compiled L={length}")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_compiled_survives_strong_decay(dtype):
    """Log-decays down to -20 per step, and checkpoint intervals of 1, 5 and 64 tokens."""
    inputs = make_inputs(130, dtype, decay_range=(-20.0, 0.0))
    expected = run_with_grads(generalized_delta_rule_ref, inputs)
    for chunk_size in (1, 5, 64):
        actual = run_with_grads(compiled_op, inputs, chunk_size=chunk_size, subchunk_size=1)
        assert_same(actual, expected, f"compiled gk in (-20, 0) C={chunk_size}")


@needs_compiler
def test_compiled_float32_against_float64_recurrence():
    """float32 kernel against the float64 recurrence over 1500 tokens, strong and RWKV-7-range decays."""
    for decay_range in [(-20.0, -5.0), (-0.606531, 0.0)]:
        inputs = make_inputs(1500, torch.float64, decay_range=decay_range, batch=1)
        out_ref, state_ref = generalized_delta_rule_ref(**inputs, output_final_state=True)
        out, state = compiled_op(**{name: t.float() for name, t in inputs.items()}, output_final_state=True)
        assert_close(out.double(), out_ref, f"gk in {decay_range} output", dtype=torch.float32)
        assert_close(state.double(), state_ref, f"gk in {decay_range} final state", dtype=torch.float32)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_compiled_wide_heads_general_a_b_and_scale(dtype):
    """K = 64 as RWKV-7 with V = 57 (not a multiple of any vector width), independent random a, b (not
    RWKV-7's pairing) and an explicit scale."""
    generator = torch.Generator().manual_seed(4)
    batch, length, heads, keys, values = 2, 41, 2, 64, 57

    def randn(*shape, std=1.0):
        return std * torch.randn(*shape, generator=generator, dtype=dtype)

    shape = (batch, length, heads, keys)
    inputs = {"q": randn(*shape), "k": randn(*shape, std=0.125), "v": randn(batch, length, heads, values),
              "a": randn(*shape, std=0.05), "b": randn(*shape, std=0.05),
              "gk": -torch.rand(*shape, generator=generator, dtype=dtype),
              "initial_state": randn(batch, heads, keys, values)}
    assert_same(run_with_grads(compiled_op, inputs, scale=0.3, chunk_size=16, subchunk_size=8),
                run_with_grads(generalized_delta_rule_ref, inputs, scale=0.3), f"compiled K={keys} V={values}")


@needs_compiler
def test_compiled_threads_split_the_heads_of_a_batch_element():
    """B = 3, H = 2 at a size where the forward runs on two threads: the thread pool splits the six
    (batch, head) tasks 3 + 3, so one thread advances a whole batch element and part of the next in
    lockstep, the other the rest."""
    inputs = make_inputs(33, torch.float64, batch=3)  # crosses one checkpoint (C = 32)
    generator = torch.Generator().manual_seed(9)
    wide = {name: torch.randn(*t.shape[:-1], 64, generator=generator, dtype=torch.float64)
            for name, t in inputs.items() if name in ("q", "k", "v")}
    inputs.update(wide, a=-F.normalize(wide["k"], dim=-1), b=F.normalize(wide["k"], dim=-1) * 0.5,
                  gk=-torch.rand(wide["q"].shape, generator=generator, dtype=torch.float64),
                  initial_state=torch.randn(3, HEADS - 1, 64, 64, generator=generator, dtype=torch.float64))
    inputs = {name: t[:, :, : HEADS - 1] if name != "initial_state" else t for name, t in inputs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        actual = run_with_grads(compiled_op, inputs)
    finally:
        torch.set_num_threads(threads)
    assert_same(actual, run_with_grads(generalized_delta_rule_ref, inputs), "compiled B=3 H=2 on two threads")


@needs_compiler
@pytest.mark.parametrize("used", ["output_only", "state_only"])
def test_compiled_gradients_when_only_one_result_is_used(used):
    """No final-state gradient (output_final_state=False), or no output gradient: the kernel sees None."""
    inputs = make_inputs(45, torch.float64)
    grads = {}
    for name, op in (("compiled", compiled_op), ("recurrence", generalized_delta_rule_ref)):
        leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
        out, state = op(**leaves, output_final_state=used == "state_only")
        assert (state is None) == (used == "output_only")
        generator = torch.Generator().manual_seed(7)
        target = state if used == "state_only" else out
        (target * torch.randn(target.shape, generator=generator, dtype=target.dtype)).sum().backward()
        grads[name] = {n: t.grad for n, t in leaves.items()}
    for name, grad in grads["compiled"].items():
        expected = grads["recurrence"][name]  # None where autograd finds no path (q does not reach the state)
        assert_close(grad, torch.zeros_like(grad) if expected is None else expected, f"{used} d{name}")


@needs_compiler
def test_compiled_finite_differences_float64():
    inputs = make_inputs(7, torch.float64, batch=1, decay_range=(-3.0, 0.0))
    leaves = tuple(inputs[n].clone().requires_grad_(True) for n in ("q", "k", "v", "a", "b", "gk", "initial_state"))

    def op(q, k, v, a, b, gk, initial_state):
        return generalized_delta_rule(q, k, v, a, b, gk, initial_state=initial_state, output_final_state=True,
                                      chunk_size=3, subchunk_size=1, backend="compiled")

    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


class UnusableKernel:
    def usable(self):
        return False, "test: no kernel here"


def test_without_the_kernel_auto_runs_the_chunked_form(monkeypatch):
    """A kernel that cannot build: "auto" runs the chunked form (with the notice), "compiled" raises."""
    monkeypatch.setattr(gdr_module, "KERNEL", UnusableKernel())
    assert resolve_backend("auto", "cpu") == "chunked"
    with pytest.raises(RuntimeError, match="test: no kernel here"):
        resolve_backend("compiled", "cpu")
    inputs = make_inputs(9, torch.float64)
    out, _ = generalized_delta_rule(**inputs)
    assert_close(out, generalized_delta_rule(**inputs, backend="chunked")[0], "auto without the kernel")


# --- against flash-linear-attention ------------------------------------------------------------------
@pytest.mark.parametrize("form", [compiled("compiled"), "chunked"])
@pytest.mark.parametrize("length", [1, 7, 63, 257])
def test_against_fla_dplr_recurrence(length, form):
    """fla's `dplr_recurrence` ((B, H, T, K) layout, always scale K^-0.5, float32 inside) against the
    chunked form and the compiled kernel, forward and gradients, in float32."""
    naive = load_fla_file("ops/generalized_delta_rule/dplr/naive.py")
    inputs = make_inputs(length, torch.float32)

    def fla_op(q, k, v, a, b, gk, initial_state, output_final_state):
        heads_first = [t.transpose(1, 2) for t in (q, k, v, a, b, gk)]
        out, state = naive.dplr_recurrence(*heads_first, initial_state=initial_state,
                                           output_final_state=output_final_state)
        return out.transpose(1, 2), state

    op = FORMS["chunked"] if form == "chunked" else compiled_op
    assert_same(run_with_grads(op, inputs), run_with_grads(fla_op, inputs), f"{form} vs fla L={length}",
                dtype=torch.float32)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_step_equals_the_pytorch_step(dtype):
    """The decode step through the kernel (no gradient needed) equals the PyTorch step, token after token."""
    inputs = make_inputs(7, dtype)
    names = ("q", "k", "v", "a", "b", "gk")
    state_ref = state = inputs["initial_state"]
    with torch.no_grad():
        for t in range(7):
            token = [inputs[n][:, t] for n in names]
            out_ref, state_ref = generalized_delta_rule_step(*token, state_ref, scale=0.7)
            out, state = generalized_delta_rule_step(*token, state, scale=0.7, backend="compiled")
            assert out.dtype == dtype and state.dtype == dtype
            assert_close(out, out_ref, f"compiled step {t} output")
            assert_close(state, state_ref, f"compiled step {t} state")
    # With a gradient needed the step stays differentiable (the PyTorch body).
    token = [inputs[n][:, 0].clone().requires_grad_(True) for n in names]
    out, _ = generalized_delta_rule_step(*token, inputs["initial_state"], backend="compiled")
    out.sum().backward()
    assert token[0].grad is not None
