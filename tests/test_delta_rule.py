"""The delta rule ops (seqarch/ops/delta_rule.py): the compiled C++ kernel and the chunked WY/UT path
against the sequential reference (forward, final state and gradients), the one-token step, numerics
under strong gates,
and flash-linear-attention's naive PyTorch functions (loaded by path: importing `fla` pulls triton).

The fla tests need the test-only reference packages that the README's test command installs (requirements-reference.txt)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqarch.backends import cpp_compiler_available
from seqarch.ops.delta_rule import (
    delta_rule,
    delta_rule_ref,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_ref,
    gated_delta_rule_step,
    resolve_backend,
)
from tests.compiled import compiled, needs_compiler
from tests.references import load_fla_file
from tests.tolerance import assert_close

LENGTHS = [1, 7, 63, 257]
DTYPES = [torch.float32, torch.float64]
FAST = [compiled("compiled"), "chunked"]  # the fast paths, each held against the reference


def make_inputs(batch=2, length=63, heads=3, dk=16, dv=24, dtype=torch.float64, gate_low=-1.0, gate_high=0.0,
                requires_grad=False):
    """Random inputs at the scales the layers produce: L2-normalised k (and q), beta = sigmoid(.),
    log-gates g uniform in [gate_low, gate_high], a random initial state."""
    q = F.normalize(torch.randn(batch, length, heads, dk, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, dk, dtype=dtype), dim=-1)
    v = torch.randn(batch, length, heads, dv, dtype=dtype)
    beta = torch.sigmoid(torch.randn(batch, length, heads, dtype=dtype))
    g = torch.empty(batch, length, heads, dtype=dtype).uniform_(gate_low, gate_high)
    h0 = torch.randn(batch, heads, dk, dv, dtype=dtype)
    tensors = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": h0}
    if requires_grad:
        for tensor in tensors.values():
            tensor.requires_grad_(True)
    return tensors


def run_gated(fn, t, **extra):
    return fn(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"],
              output_final_state=True, **extra)


def run_plain(fn, t, **extra):
    return fn(t["q"], t["k"], t["v"], t["beta"], initial_state=t["initial_state"], output_final_state=True, **extra)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_fast_matches_reference_forward(gated, length, dtype, backend):
    t = make_inputs(length=length, dtype=dtype)
    if gated:
        (o, s), (o_ref, s_ref) = run_gated(gated_delta_rule, t, backend=backend), run_gated(gated_delta_rule_ref, t)
    else:
        (o, s), (o_ref, s_ref) = run_plain(delta_rule, t, backend=backend), run_plain(delta_rule_ref, t)
    assert o.dtype == dtype and s.dtype == dtype
    assert_close(o, o_ref, f"o (T={length})")
    assert_close(s, s_ref, f"final state (T={length})")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 128])
def test_chunk_sizes_agree(chunk_size):
    t = make_inputs(length=100)
    o, s = run_gated(gated_delta_rule, t, chunk_size=chunk_size, backend="chunked")
    o_ref, s_ref = run_gated(gated_delta_rule_ref, t)
    assert_close(o, o_ref, f"o (C={chunk_size})")
    assert_close(s, s_ref, f"final state (C={chunk_size})")


def _gradients(fn, t, runner, weights, **extra):
    o, s = runner(fn, t, **extra)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    names = [name for name in t if (runner is run_gated or name != "g") and t[name] is not None]
    return dict(zip(names, torch.autograd.grad(loss, [t[name] for name in names]), strict=True))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_fast_matches_reference_gradients(gated, length, dtype, backend):
    t = make_inputs(length=length, dtype=dtype, requires_grad=True)
    weights = (torch.randn_like(t["v"]), torch.randn_like(t["initial_state"]))
    runner, fast, ref = (run_gated, gated_delta_rule, gated_delta_rule_ref) if gated else (
        run_plain, delta_rule, delta_rule_ref)
    grads = _gradients(fast, t, runner, weights, backend=backend)
    grads_ref = _gradients(ref, t, runner, weights)
    # The float32 gradients accumulate over the whole sequence in both paths, in different orders.
    tolerance = 1e-4 if dtype == torch.float32 else None
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], f"d{name} (T={length})", tolerance=tolerance)
        assert grads_ref[name].abs().max() > 0, f"d{name} is zero: the test cannot tell the paths apart"


def test_step_matches_reference():
    t = make_inputs(length=19)
    state = t["initial_state"]
    outputs, outputs_plain, state_plain = [], [], t["initial_state"]
    for i in range(19):
        o, state = gated_delta_rule_step(t["q"][:, i], t["k"][:, i], t["v"][:, i], t["g"][:, i], t["beta"][:, i], state)
        outputs.append(o)
        o, state_plain = delta_rule_step(t["q"][:, i], t["k"][:, i], t["v"][:, i], t["beta"][:, i], state_plain)
        outputs_plain.append(o)
    o_ref, s_ref = run_gated(gated_delta_rule_ref, t)
    assert_close(torch.stack(outputs, dim=1), o_ref, "gated steps")
    assert_close(state, s_ref, "gated state after steps")
    o_ref, s_ref = run_plain(delta_rule_ref, t)
    assert_close(torch.stack(outputs_plain, dim=1), o_ref, "steps")
    assert_close(state_plain, s_ref, "state after steps")


def test_reference_transcribes_the_recurrence():
    """One step by hand: S_1 = alpha (I - beta k k^T) S_0 + beta k v^T, o_1 = S_1^T q / sqrt(K)."""
    t = make_inputs(batch=1, length=1, heads=1, dk=4, dv=3)
    q, k, v = t["q"][0, 0, 0], t["k"][0, 0, 0], t["v"][0, 0, 0]
    alpha, beta, S0 = t["g"][0, 0, 0].exp(), t["beta"][0, 0, 0], t["initial_state"][0, 0]
    S1 = alpha * (torch.eye(4, dtype=torch.float64) - beta * torch.outer(k, k)) @ S0 + beta * torch.outer(k, v)
    o, s = run_gated(gated_delta_rule, t)
    assert_close(s[0, 0], S1, "S_1")
    assert_close(o[0, 0, 0], S1.T @ q / 2, "o_1")


def test_delta_rule_is_the_gated_rule_with_zero_gates():
    t = make_inputs(length=40)
    t["g"] = torch.zeros_like(t["g"])
    o, s = run_gated(gated_delta_rule, t)
    o_plain, s_plain = run_plain(delta_rule, t)
    assert_close(o_plain, o, "o")
    assert_close(s_plain, s, "final state")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("gate", ["constant", "random"])
def test_gates_of_minus_20_stay_finite_over_long_sequences(gate, backend):
    """g = -20 per step (alpha = 2e-9) over T = 2048: an exp of a positive sum would overflow."""
    t = make_inputs(batch=1, length=2048, heads=2, dk=16, dv=16, dtype=torch.float32, gate_low=-20.0,
                    gate_high=-20.0 if gate == "constant" else 0.0, requires_grad=True)
    o, s = run_gated(gated_delta_rule, t, chunk_size=64, backend=backend)
    o_ref, s_ref = run_gated(gated_delta_rule_ref, t)
    assert_close(o, o_ref, "o")
    assert_close(s, s_ref, "final state")
    weights = (torch.randn_like(o), torch.randn_like(s))
    grads = torch.autograd.grad((o * weights[0]).sum() + (s * weights[1]).sum(), list(t.values()))
    grads_ref = torch.autograd.grad((o_ref * weights[0]).sum() + (s_ref * weights[1]).sum(), list(t.values()))
    for name, grad, grad_ref in zip(t, grads, grads_ref, strict=True):
        assert torch.isfinite(grad).all(), f"d{name} is not finite"
        assert_close(grad, grad_ref, f"d{name}", tolerance=1e-4)


def test_sequential_backend_is_the_reference():
    t = make_inputs(length=9)
    o, s = run_gated(gated_delta_rule, t, backend="sequential")
    o_ref, s_ref = run_gated(gated_delta_rule_ref, t)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == ("compiled" if cpp_compiler_available() else "chunked")
    assert resolve_backend("chunked", "cpu") == "chunked"
    assert resolve_backend("sequential", torch.device("cpu")) == "sequential"
    with pytest.raises(ValueError, match="backend='fused'.*valid"):
        resolve_backend("fused", "cpu")
    with pytest.raises(ValueError, match="backend='compiled' is a CPU kernel"):
        resolve_backend("compiled", "meta")
    assert resolve_backend("auto", "meta") == "chunked"


class UnusableKernel:
    """Stands in for the op's KERNEL where it cannot be built; never builds anything."""

    def usable(self):
        return False, "no C++ compiler on PATH"

    def available(self):
        return False


def test_without_the_kernel_auto_runs_the_chunked_path(monkeypatch, capsys):
    import seqarch.backends as backends
    import seqarch.ops.delta_rule as delta_rule_module

    monkeypatch.setattr(delta_rule_module, "KERNEL", UnusableKernel())
    monkeypatch.setattr(backends, "notify_once", lambda key, message: print(message))
    assert resolve_backend("auto", "cpu", "gated_delta_rule") == "chunked"
    assert "gated_delta_rule runs the eager chunked PyTorch path (no C++ compiler on PATH)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="backend='compiled' was requested but the kernel is unavailable: no C"):
        resolve_backend("compiled", "cpu")
    assert delta_rule_module.describe_backend("auto", "cpu") == "backend=auto: chunked WY/UT PyTorch path"
    t = make_inputs(length=9)
    o, s = run_gated(gated_delta_rule, t)
    o_ref, s_ref = run_gated(gated_delta_rule_ref, t)
    assert_close(o, o_ref, "fallback o")
    assert_close(s, s_ref, "fallback final state")


@needs_compiler
def test_compiled_is_what_auto_runs_on_cpu():
    t = make_inputs(length=9)
    o, s = run_gated(gated_delta_rule, t)
    o_compiled, s_compiled = run_gated(gated_delta_rule, t, backend="compiled")
    assert torch.equal(o, o_compiled) and torch.equal(s, s_compiled)


@needs_compiler
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_compiled_gradcheck(gated):
    """Finite differences against the kernel's own backward, on a tiny float64 case (C = 4 < T, so the
    backward crosses checkpoints)."""
    t = make_inputs(batch=2, length=6, heads=2, dk=3, dv=5, dtype=torch.float64, requires_grad=True)
    names = ["q", "k", "v", "beta", "initial_state"] + (["g"] if gated else [])

    def run(*tensors):
        args = dict(zip(names, tensors, strict=True))
        common = {"initial_state": args["initial_state"], "output_final_state": True, "backend": "compiled",
                  "chunk_size": 4}
        if gated:
            return gated_delta_rule(args["q"], args["k"], args["v"], args["g"], args["beta"], **common)
        return delta_rule(args["q"], args["k"], args["v"], args["beta"], **common)

    assert torch.autograd.gradcheck(run, tuple(t[name] for name in names))


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 63])
def test_compiled_without_initial_state(length, dtype):
    t = make_inputs(length=length, dtype=dtype, requires_grad=True)
    t["initial_state"] = None
    weights = (torch.randn_like(t["v"]), torch.randn(2, 3, 16, 24, dtype=dtype))
    (o, s), (o_ref, s_ref) = run_gated(gated_delta_rule, t, backend="compiled"), run_gated(gated_delta_rule_ref, t)
    assert_close(o, o_ref, "o")
    assert_close(s, s_ref, "final state")
    grads = _gradients(gated_delta_rule, t, run_gated, weights, backend="compiled")
    grads_ref = _gradients(gated_delta_rule_ref, t, run_gated, weights)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], f"d{name}", tolerance=1e-4 if dtype == torch.float32 else None)


@needs_compiler
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 128])
def test_compiled_checkpoint_intervals_agree(chunk_size):
    """The backward recomputes states from checkpoints every C tokens: any C gives the same gradients."""
    t = make_inputs(length=100, requires_grad=True)
    weights = (torch.randn_like(t["v"]), torch.randn_like(t["initial_state"]))
    grads = _gradients(gated_delta_rule, t, run_gated, weights, backend="compiled", chunk_size=chunk_size)
    grads_ref = _gradients(gated_delta_rule_ref, t, run_gated, weights)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], f"d{name} (C={chunk_size})")


@needs_compiler
@pytest.mark.parametrize("used", ["output", "final_state"])
def test_compiled_gradient_through_one_output_only(used):
    """Only o (no final state asked for) or only the final state in the loss: the kernel gets None for
    the other gradient."""
    t = make_inputs(length=20, requires_grad=True)
    losses = []
    for fn, extra in ((gated_delta_rule, {"backend": "compiled"}), (gated_delta_rule_ref, {})):
        o, s = fn(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["initial_state"],
                  output_final_state=used == "final_state", **extra)
        loss = o.sin().sum() if used == "output" else s.cos().sum()
        # The final state does not depend on q: the reference leaves it out of the graph.
        losses.append(torch.autograd.grad(loss, list(t.values()), allow_unused=True, materialize_grads=True))
    for name, grad, grad_ref in zip(t, *losses, strict=True):
        assert_close(grad, grad_ref, f"d{name}")


def test_no_final_state_unless_asked():
    t = make_inputs(length=5)
    for backend in ("chunked", "sequential") + (("compiled",) if cpp_compiler_available() else ()):
        o, s = gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], backend=backend)
        assert s is None and o.shape == t["v"].shape


@pytest.mark.parametrize("backend", FAST)
def test_half_precision_inputs_compute_in_float32(backend):
    t = make_inputs(length=33, dtype=torch.float32)
    o, s = gated_delta_rule(*(t[n].bfloat16() for n in ("q", "k", "v", "g", "beta")), output_final_state=True,
                            backend=backend)
    o_ref, s_ref = gated_delta_rule_ref(*(t[n].bfloat16().float() for n in ("q", "k", "v", "g", "beta")),
                                        output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close(o, o_ref.bfloat16(), "o", dtype=torch.bfloat16)
    assert_close(s, s_ref, "final state", dtype=torch.float32)


@pytest.mark.parametrize("bad, message", [
    ({"beta": torch.rand(2, 5, 4)}, "beta must be"),
    ({"v": torch.randn(2, 5, 2, 3)}, "v must be"),
    ({"initial_state": torch.randn(2, 3, 4, 4)}, "initial_state must be"),
])
def test_bad_shapes_are_named(bad, message):
    args = {"q": torch.randn(2, 5, 3, 4), "k": torch.randn(2, 5, 3, 4), "v": torch.randn(2, 5, 3, 6),
            "g": -torch.rand(2, 5, 3), "beta": torch.rand(2, 5, 3), "initial_state": None} | bad
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(**args)


# --- flash-linear-attention's naive functions ------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("length", [7, 63, 257])
def test_gated_matches_fla_naive_recurrent(length, backend):
    naive = load_fla_file("ops/gated_delta_rule/naive.py")
    t = make_inputs(length=length, dtype=torch.float32, gate_low=-3.0)
    o, s = run_gated(gated_delta_rule, t, backend=backend)
    # fla's naive recurrent function takes beta before g.
    o_fla, s_fla = naive.naive_recurrent_gated_delta_rule(t["q"], t["k"], t["v"], t["beta"], t["g"],
                                                           initial_state=t["initial_state"], output_final_state=True)
    assert_close(o, o_fla, f"o vs fla naive_recurrent_gated_delta_rule (T={length})")
    assert_close(s, s_fla, f"final state vs fla naive_recurrent_gated_delta_rule (T={length})")


def test_gated_matches_fla_naive_chunk_with_strong_gates():
    naive = load_fla_file("ops/gated_delta_rule/naive.py")
    t = make_inputs(length=200, dtype=torch.float32, gate_low=-0.5)
    o, s = run_gated(gated_delta_rule, t, scale=0.3)
    o_fla, s_fla = naive.naive_chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], scale=0.3,
                                                       initial_state=t["initial_state"], output_final_state=True)
    assert_close(o, o_fla, "o vs fla naive_chunk_gated_delta_rule")
    assert_close(s, s_fla, "final state vs fla naive_chunk_gated_delta_rule")


@pytest.mark.parametrize("length", [7, 63])
def test_delta_rule_matches_fla_naive_recurrence(length):
    naive = load_fla_file("ops/delta_rule/naive.py")
    t = make_inputs(length=length, dtype=torch.float32)
    o, s = run_plain(delta_rule, t)
    # fla's naive delta rule takes the (B, H, T, K) layout and always scales q by K^-0.5.
    heads_first = [t[name].transpose(1, 2) for name in ("q", "k", "v", "beta")]
    o_fla, s_fla = naive.delta_rule_recurrence(*heads_first, initial_state=t["initial_state"],
                                               output_final_state=True)
    assert_close(o, o_fla.transpose(1, 2), f"o vs fla delta_rule_recurrence (T={length})")
    assert_close(s, s_fla, f"final state vs fla delta_rule_recurrence (T={length})")


@pytest.mark.parametrize("size", [1, 2, 16, 17, 37, 64])
def test_unit_lower_inverse_and_its_gradient(size):
    """The blocked forward substitution equals the inverse; its backward passes gradcheck."""
    from seqarch.ops.delta_rule import _UnitLowerInverse

    N = (0.3 * torch.randn(3, size, size, dtype=torch.float64)).tril(-1)
    expected = torch.linalg.inv(torch.eye(size, dtype=torch.float64) + N)
    assert_close(_UnitLowerInverse.apply(N), expected, f"(I + N)^-1, size {size}")
    if size <= 20:  # gradcheck costs one forward per entry; 17 already crosses a 16-row block
        N = N[:1].detach().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda n: _UnitLowerInverse.apply(n.tril(-1)), (N,))
