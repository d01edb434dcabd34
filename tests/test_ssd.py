"""The chunked SSD op against its sequential reference, forward and backward; the reference against
the paper's semiseparable-matrix form; the one-step recurrence; numerics; bad input; which backend runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import repeat

import seqarch.ops.ssd as ssd_module
from seqarch import backends
from seqarch.ops.ssd import resolve_backend, segsum_stable, ssd, ssd_chunked, ssd_compiled, ssd_ref, ssd_step
from tests.compiled import FakeKernel, compiled, needs_compiler
from tests.tolerance import RELATIVE_TOLERANCE, assert_close

# The two chunked paths: the C++ kernel for steps 1 and 3 ("compiled") and PyTorch throughout ("chunked").
CHUNKED_BACKENDS = [compiled("compiled"), "chunked"]

BATCH, HEADS, HEADDIM, DSTATE = 2, 4, 3, 5
OPTIONS = {
    "plain": set(),
    "D_per_head": {"D"},
    "D_per_channel": {"D_channel"},
    "z": {"z"},
    "dt_bias_softplus": {"dt_bias"},
    "initial_state": {"initial_states"},
    "all": {"D", "z", "dt_bias", "initial_states"},
}


def make_inputs(length: int, groups: int, dtype, options: set, seed: int = 0) -> dict:
    """Random (never zero) inputs. Without softplus dt is made positive directly."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    inputs = {
        "x": randn(BATCH, length, HEADS, HEADDIM),
        "dt": F.softplus(randn(BATCH, length, HEADS) - 1),
        "A": -torch.rand(HEADS, generator=gen, dtype=dtype) * 2 - 0.2,
        "B": randn(BATCH, length, groups, DSTATE),
        "C": randn(BATCH, length, groups, DSTATE),
    }
    if "D" in options:
        inputs["D"] = randn(HEADS)
    if "D_channel" in options:
        inputs["D"] = randn(HEADS, HEADDIM)
    if "z" in options:
        inputs["z"] = randn(BATCH, length, HEADS, HEADDIM)
    if "dt_bias" in options:
        inputs["dt"] = randn(BATCH, length, HEADS) - 1  # raw, softplus(dt + dt_bias) inside
        inputs["dt_bias"] = randn(HEADS) * 0.5
    if "initial_states" in options:
        inputs["initial_states"] = randn(BATCH, HEADS, HEADDIM, DSTATE)
    return inputs


def run_with_grads(fn, inputs: dict, softplus: bool):
    """Output, final state and the gradient of every input under a fixed random cotangent."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
    y, final = fn(**leaves, dt_softplus=softplus, return_final_states=True)
    gen = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    loss.backward()
    return y, final, {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("backend", CHUNKED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
@pytest.mark.parametrize(("length", "chunk"), [(37, 16), (5, 64), (1, 16)])
def test_chunked_matches_sequential_reference(length, chunk, groups, option, dtype, backend):
    check_against_reference(length, chunk, groups, option, dtype, backend)


@pytest.mark.parametrize("backend", CHUNKED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
def test_many_chunks_match_sequential_reference(groups, dtype, backend):
    check_against_reference(130, 16, groups, "all", dtype, backend)


def check_against_reference(length, chunk, groups, option, dtype, backend):
    inputs = make_inputs(length, groups, dtype, OPTIONS[option])
    softplus = "dt_bias" in inputs

    def chunked(**kw):
        return ssd(chunk_size=chunk, backend=backend, **kw)

    y, final, grads = run_with_grads(chunked, inputs, softplus)
    y_ref, final_ref, grads_ref = run_with_grads(ssd_ref, inputs, softplus)
    assert_close(y, y_ref, f"ssd y ({option})")
    assert_close(final, final_ref, f"ssd final state ({option})")
    for name, grad_ref in grads_ref.items():
        # A alone has no effect at L = 1 from a zero state (it only decays the state).
        if not (name == "A" and length == 1 and "initial_states" not in inputs):
            assert grad_ref.abs().max() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
        assert_close(grads[name], grad_ref, f"ssd d{name} ({option})")


@pytest.mark.parametrize("backend", CHUNKED_BACKENDS)
@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 64])
def test_chunk_size_does_not_change_the_result(chunk, backend):
    inputs = make_inputs(40, 2, torch.float64, OPTIONS["all"], seed=3)
    y_ref, final_ref = ssd_ref(**inputs, dt_softplus=True, return_final_states=True)
    y, final = ssd(**inputs, chunk_size=chunk, dt_softplus=True, return_final_states=True, backend=backend)
    assert_close(y, y_ref, f"ssd y (chunk {chunk})")
    assert_close(final, final_ref, f"ssd final state (chunk {chunk}; L=40 is padded unless chunk divides it)")


def test_reference_equals_the_semiseparable_matrix_form():
    """y = M (x) with M[t, s] = C_t^T B_s dt_s exp(sum_{s < j <= t} dt_j A) for s <= t, built
    entry by entry from the paper's definition (an independent check of the reference)."""
    length, groups = 9, 2
    inputs = make_inputs(length, groups, torch.float64, set(), seed=1)
    x, dt, A = inputs["x"], inputs["dt"], inputs["A"]
    B_h = repeat(inputs["B"], "b l g n -> b l (g r) n", r=HEADS // groups)
    C_h = repeat(inputs["C"], "b l g n -> b l (g r) n", r=HEADS // groups)
    expected = torch.zeros_like(x)
    for t in range(length):
        for s in range(t + 1):
            decay = torch.exp((dt[:, s + 1 : t + 1] * A).sum(dim=1))  # (B, H)
            weight = (C_h[:, t] * B_h[:, s]).sum(-1) * dt[:, s] * decay  # (B, H)
            expected[:, t] += weight[..., None] * x[:, s]
    assert_close(ssd_ref(**inputs), expected, "ssd_ref vs semiseparable matrix")


def test_step_follows_the_reference():
    inputs = make_inputs(11, 2, torch.float64, OPTIONS["all"], seed=2)
    y_ref, final_ref = ssd_ref(**inputs, dt_softplus=True, return_final_states=True)
    state = inputs["initial_states"]
    outputs = []
    for t in range(11):
        y_t, state = ssd_step(inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                              inputs["C"][:, t], state, D=inputs["D"], z=inputs["z"][:, t],
                              dt_bias=inputs["dt_bias"], dt_softplus=True)
        outputs.append(y_t)
    assert_close(torch.stack(outputs, dim=1), y_ref, "ssd_step outputs")
    assert_close(state, final_ref, "ssd_step final state")


@pytest.mark.parametrize("backend", CHUNKED_BACKENDS)
def test_strong_decay_and_long_sequence_stay_finite_and_accurate_in_float32(backend):
    """Cumulative decay far below float range (sum dt A ~ -2e4 over the sequence, -16 per step in
    places): no inf/nan in outputs or gradients, and float32 stays close to a float64 reference."""
    length = 700
    inputs = make_inputs(length, 1, torch.float64, OPTIONS["initial_state"], seed=4)
    inputs["A"] = torch.tensor([-16.0, -4.0, -1.0, -0.01], dtype=torch.float64)
    inputs["dt"] = inputs["dt"] * 3
    inputs["dt"][:, 300:400] = 1e-3  # a stretch of slow decay after a long fast one
    y64, final64 = ssd_ref(**inputs, return_final_states=True)
    leaves = {name: t.float().requires_grad_(True) for name, t in inputs.items()}
    y32, final32 = ssd(**leaves, chunk_size=64, return_final_states=True, backend=backend)
    (y32.sum() + final32.sum()).backward()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), f"non-finite gradient of {name}"
    assert_close(y32, y64, "float32 ssd vs float64 reference", dtype=torch.float32, tolerance=1e-5)
    assert_close(final32, final64, "float32 final state vs float64 reference", dtype=torch.float32,
                 tolerance=1e-5)


def test_segsum_stable_definition():
    a = torch.randn(2, 6, dtype=torch.float64)
    out = segsum_stable(a)
    for t in range(6):
        for s in range(6):
            if s > t:
                assert out[0, t, s] == float("-inf")
            else:
                assert_close(out[:, t, s], a[:, s + 1 : t + 1].sum(-1), f"segsum[{t}, {s}]")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(2, 5, 12)}, r"x must be \(B, L, H, P\)"),
        ({"B": torch.randn(2, 5, 3, 5), "C": torch.randn(2, 5, 3, 5)}, "multiple of the groups G=3"),
        ({"C": torch.randn(2, 5, 1, 6)}, "B and C must both be"),
        ({"dt": torch.randn(2, 5, 3)}, r"dt must have shape \(2, 5, 4\)"),
        ({"A": torch.randn(4, 1)}, r"A must have shape \(4,\)"),
        ({"D": torch.randn(3)}, r"D must have shape \(4,\) or \(4, 3\)"),
        ({"initial_states": torch.randn(2, 4, 3, 6)}, "initial_states must have shape"),
    ],
)
def test_bad_input_is_named(change, message):
    inputs = {**make_inputs(5, 1, torch.float32, set()), **change}
    with pytest.raises(ValueError, match=message):
        ssd(**inputs)
    with pytest.raises(ValueError, match=message):
        ssd_ref(**inputs)


def test_bad_chunk_size_is_named():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        ssd(**make_inputs(5, 1, torch.float32, set()), chunk_size=0)


# --- dispatch ------------------------------------------------------------------------------------

def test_auto_takes_the_cuda_kernel_only_where_mamba_ssm_is_usable(monkeypatch):
    monkeypatch.setattr(ssd_module, "KERNEL", FakeKernel(True))
    monkeypatch.setattr(ssd_module, "cuda_kernels_usable", lambda name, device: torch.device(device).type == "cuda")
    assert resolve_backend("auto", "cuda") == "cuda"
    assert resolve_backend("auto", "cuda:1") == "cuda"
    assert resolve_backend("auto", "cpu") == "compiled"
    monkeypatch.setattr(ssd_module, "cuda_kernels_usable", lambda name, device: False)
    assert resolve_backend("auto", "cuda") == "chunked"
    for backend in ("chunked", "sequential"):  # an explicit choice is kept, whatever is installed
        assert resolve_backend(backend, "cuda") == backend
        assert resolve_backend(backend, "cpu") == backend
    assert resolve_backend("compiled", "cpu") == "compiled"
    with pytest.raises(ValueError, match="ssd: backend='compiled' is a CPU kernel; inputs are on cuda"):
        resolve_backend("compiled", "cuda")
    with pytest.raises(ValueError, match="ssd: backend='triton'; valid: 'auto', 'compiled', 'chunked', 'sequential'"):
        resolve_backend("triton", "cpu")


def test_auto_falls_back_to_chunked_with_a_notice_without_the_kernel(monkeypatch, capsys):
    monkeypatch.setattr(ssd_module, "KERNEL", FakeKernel(False, "no C++ compiler on PATH"))
    monkeypatch.setattr(backends, "notify_once", lambda key, message: print(message))
    assert resolve_backend("auto", "cpu") == "chunked"
    assert "ssd runs the eager chunked PyTorch path (no C++ compiler on PATH)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="backend='compiled' was requested but the kernel is unavailable"):
        resolve_backend("compiled", "cpu")
    assert ssd_module.describe_backend("auto", "cpu") == "backend=auto: chunked SSD PyTorch path"


def test_cpu_never_reports_the_cuda_kernel():
    assert resolve_backend("auto", "cpu") in ("compiled", "chunked")
    assert resolve_backend("auto", torch.device("cpu")) in ("compiled", "chunked")


@pytest.mark.parametrize("backend", ["auto", compiled("compiled"), "chunked", "sequential"])
def test_entry_point_runs_the_chosen_path(backend):
    inputs = make_inputs(13, 2, torch.float64, {"D", "z", "dt_bias", "initial_states"})
    y, final = ssd(**inputs, chunk_size=4, dt_softplus=True, return_final_states=True, backend=backend)
    chosen = resolve_backend(backend, "cpu")
    expected_fn = {"sequential": ssd_ref, "chunked": ssd_chunked, "compiled": ssd_compiled}[chosen]
    extra = {} if chosen == "sequential" else {"chunk_size": 4}
    y_expected, final_expected = expected_fn(**inputs, **extra, dt_softplus=True, return_final_states=True)
    assert torch.equal(y, y_expected) and torch.equal(final, final_expected)


# --- the compiled kernel against the PyTorch path ------------------------------------------------
def mixer_like_inputs(length: int, dtype, dt_scale: str, seed: int = 0) -> dict:
    """Shapes and scales as the mamba2 mixer produces them: dt = softplus(raw + dt_bias) with softplus(dt_bias)
    in [1e-3, 0.1] ("realistic"), or dt up to ~30 against A down to -16 ("extreme": decays to exp(-500) in a
    step) or dt ~ 1e-5 ("tiny": almost no decay, almost no input); 8 heads of 16 channels, 2 groups, N 8."""
    gen = torch.Generator().manual_seed(seed)
    heads, headdim, groups, dstate = 8, 16, 2, 8

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    dt_init = torch.exp(torch.rand(heads, generator=gen, dtype=dtype) * (math.log(0.1) - math.log(1e-3))
                        + math.log(1e-3))
    raw = {"realistic": randn(2, length, heads), "extreme": randn(2, length, heads) * 3 + 30,
           "tiny": randn(2, length, heads) - 12}[dt_scale]
    return {"x": randn(2, length, heads, headdim), "dt": raw,
            "A": -torch.empty(heads, dtype=dtype).uniform_(1, 16, generator=gen),
            "B": randn(2, length, groups, dstate), "C": randn(2, length, groups, dstate), "D": randn(heads),
            "dt_bias": dt_init + torch.log(-torch.expm1(-dt_init)),
            "initial_states": randn(2, heads, headdim, dstate)}


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("dt_scale", ["realistic", "extreme", "tiny"])
@pytest.mark.parametrize(("length", "chunk"), [(131, 32), (63, 16)])
def test_compiled_matches_chunked_and_reference_at_mixer_scales(length, chunk, dt_scale, dtype):
    """The kernel against the PyTorch chunked path (same algorithm) and the sequential reference, outputs,
    final state and every gradient, with a carried initial state, at odd lengths (padded last chunk)."""
    inputs = mixer_like_inputs(length, dtype, dt_scale, seed=length)
    results = {name: run_with_grads(fn, inputs, softplus=True) for name, fn in (
        ("compiled", lambda **kw: ssd_compiled(chunk_size=chunk, **kw)),
        ("chunked", lambda **kw: ssd_chunked(chunk_size=chunk, **kw)), ("sequential", ssd_ref))}
    y, final, grads = results["compiled"]
    for other in ("chunked", "sequential"):
        y_ref, final_ref, grads_ref = results[other]
        assert_close(y, y_ref, f"compiled vs {other} y ({dt_scale})")
        assert_close(final, final_ref, f"compiled vs {other} final state ({dt_scale})")
        for name, grad_ref in grads_ref.items():
            if dt_scale == "extreme" and name in ("A", "initial_states"):
                # With decays of exp(-500) per step these gradients vanish: what is left is rounding of the
                # segment-sum gradients' row and column sums, whose diagonal terms cancel in exact arithmetic
                # and are summed in a different order by each path (and in float32 the kernel's exp stops at
                # exp(-87) = 2e-38 where PyTorch's underflows to 0). Held to a millionth of the dt gradient.
                bound = RELATIVE_TOLERANCE[dtype] * 0.05 * grads_ref["dt"].abs().max()
                error = (grads[name] - grad_ref).abs().max()
                assert error <= bound, f"compiled vs {other} d{name} ({dt_scale}): {error:.3e} > {bound:.3e}"
                continue
            assert_close(grads[name], grad_ref, f"compiled vs {other} d{name} ({dt_scale})")
    for name, grad in grads.items():
        # With decays of exp(-500) per step, A and the initial state reach nothing in float32.
        if dt_scale != "extreme" or name not in ("A", "initial_states"):
            assert grad.abs().max() > 0, f"gradient of {name} is zero: the comparison would be vacuous"


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("headdim", [32, 64])
def test_compiled_head_dims_with_fixed_width_loops(headdim, dtype):
    """P = 32 and 64 run the kernel's forward with P known at compile time: against the chunked path and the
    reference, output, final state and gradients (other tests use small P, the run-time loop)."""
    gen = torch.Generator().manual_seed(headdim)
    inputs = {"x": torch.randn(1, 45, 2, headdim, generator=gen, dtype=dtype),
              "dt": torch.randn(1, 45, 2, generator=gen, dtype=dtype) - 1,
              "A": -torch.rand(2, generator=gen, dtype=dtype) * 4 - 0.5,
              "B": torch.randn(1, 45, 1, 6, generator=gen, dtype=dtype),
              "C": torch.randn(1, 45, 1, 6, generator=gen, dtype=dtype),
              "D": torch.randn(2, generator=gen, dtype=dtype), "dt_bias": torch.randn(2, generator=gen, dtype=dtype),
              "initial_states": torch.randn(1, 2, headdim, 6, generator=gen, dtype=dtype)}
    y, final, grads = run_with_grads(lambda **kw: ssd_compiled(chunk_size=16, **kw), inputs, softplus=True)
    for name, fn in (("chunked", lambda **kw: ssd_chunked(chunk_size=16, **kw)), ("sequential", ssd_ref)):
        y_ref, final_ref, grads_ref = run_with_grads(fn, inputs, softplus=True)
        assert_close(y, y_ref, f"compiled (P={headdim}) vs {name} y")
        assert_close(final, final_ref, f"compiled (P={headdim}) vs {name} final state")
        for key, grad_ref in grads_ref.items():
            assert_close(grads[key], grad_ref, f"compiled (P={headdim}) vs {name} d{key}")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("initial", [True, False], ids=["initial", "zeros"])
@pytest.mark.parametrize("chunks", [1, 2, 9])
def test_compiled_state_passing_follows_the_chunk_recurrence_with_gradients(chunks, initial, dtype):
    gen = torch.Generator().manual_seed(chunks)
    states = torch.randn(2, chunks, 3, 5, generator=gen, dtype=dtype)
    totals = -torch.rand(2, chunks, 3, generator=gen, dtype=dtype) * 3
    start = torch.randn(2, 3, 5, generator=gen, dtype=dtype) if initial else None
    cotangent = torch.randn(2, chunks + 1, 3, 5, generator=gen, dtype=dtype)
    results = []
    for fn in (ssd_module._CompiledStatePassing.apply, ssd_module._pass_states_eager):
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in (states, totals, start)]
        out = fn(*leaves)
        (out * cotangent).sum().backward()
        results.append((out, [None if leaf is None else leaf.grad for leaf in leaves]))
    (out, grads), (out_ref, grads_ref) = results
    assert_close(out, out_ref, f"compiled state passing ({chunks} chunks)")
    for name, grad, grad_ref in zip(("chunk_states", "totals", "initial"), grads, grads_ref, strict=True):
        if grad_ref is not None:
            assert_close(grad, grad_ref, f"compiled state passing d{name} ({chunks} chunks)")


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("extras", [False, True], ids=["blocks_only", "with_y_off_and_D"])
@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
def test_compiled_chunk_output_matches_the_eager_steps_with_gradients(groups, extras, dtype):
    """The kernel's chunk output against PyTorch's diagonal blocks (+ exp(cum) y_off + D x), with x a strided
    view as the mixer passes it (a column slice of the conv output)."""
    gen = torch.Generator().manual_seed(groups)
    batch, chunks, chunk, heads, headdim = 2, 3, 8, 4, 5
    per_group = heads // groups
    wide = torch.randn(batch, chunks * chunk, heads * headdim + 7, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(batch, chunks * chunk, heads, generator=gen, dtype=dtype))
    cum = (dt * -torch.rand(heads, generator=gen, dtype=dtype)).view(batch, chunks, chunk, heads).cumsum(2)
    scores = torch.randn(batch, chunks, groups, chunk, chunk, generator=gen, dtype=dtype)
    y_off = torch.randn(batch, chunks, groups, chunk, per_group * headdim, generator=gen, dtype=dtype)
    D = torch.randn(heads, headdim, generator=gen, dtype=dtype)
    cotangent = torch.randn(batch, chunks, chunk, heads, headdim, generator=gen, dtype=dtype)
    results = []
    for name in ("compiled", "eager"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (wide, dt, cum, scores, y_off, D)]
        x = leaves[0][..., 3 : 3 + heads * headdim].unflatten(-1, (heads, headdim))
        assert x.stride(1) != heads * headdim  # the kernel reads a strided x
        extra = leaves[4:] if extras else [None, None]
        if name == "compiled":
            out = ssd_module._CompiledChunkOutput.apply(x, *leaves[1:4], *extra).view(cotangent.shape)
        else:
            out = ssd_module._diagonal_blocks_eager(x, *leaves[1:4], groups)
            if extras:
                decayed = leaves[4].unflatten(-1, (per_group, headdim)).transpose(2, 3).flatten(3, 4)
                out = out + decayed * torch.exp(leaves[2])[..., None] + leaves[5] * x.view(cotangent.shape)
        (out * cotangent).sum().backward()
        results.append((out, [leaf.grad for leaf in leaves]))
    (out, grads), (out_ref, grads_ref) = results
    assert_close(out, out_ref, "compiled chunk output")
    names = ("x", "dt", "cum", "scores", "y_off", "D")
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        if grad_ref is None:
            assert grad is None, f"compiled chunk output: d{name} without its input"
            continue
        assert grad_ref.abs().max() > 0, f"reference d{name} is zero: the test would be vacuous"
        assert_close(grad, grad_ref, f"compiled chunk output d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("chunks", [1, 2, 7, 63])
def test_blocked_state_passing_follows_the_chunk_recurrence_with_gradients(chunks, dtype):
    """pass_states (two levels of blocks) against S_{k+1} = exp(t_k) S_k + s_k one chunk at a time."""
    gen = torch.Generator().manual_seed(chunks)
    states = torch.randn(2, chunks, 3, 5, generator=gen, dtype=dtype)
    totals = -torch.rand(2, chunks, 3, generator=gen, dtype=dtype) * 3
    initial = torch.randn(2, 3, 5, generator=gen, dtype=dtype)
    cotangent = torch.randn(2, 3, chunks + 1, 5, generator=gen, dtype=dtype)

    def loop(states, totals, initial):
        out = [initial]
        for k in range(chunks):
            out.append(torch.exp(totals[:, k])[..., None] * out[-1] + states[:, k])
        return torch.stack(out, dim=2)

    results = []
    for fn in (ssd_module.pass_states, loop):
        leaves = [t.clone().requires_grad_(True) for t in (states, totals, initial)]
        out = fn(*leaves)
        (out * cotangent).sum().backward()
        results.append((out, [leaf.grad for leaf in leaves]))
    (out, grads), (out_ref, grads_ref) = results
    assert_close(out, out_ref, f"pass_states ({chunks} chunks)")
    for name, grad, grad_ref in zip(("chunk_states", "totals", "initial"), grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, f"pass_states d{name} ({chunks} chunks)")
