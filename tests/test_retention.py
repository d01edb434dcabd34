"""Retention op: every form (parallel, chunkwise, recurrent, step) against the loop reference,
forward, final state and gradients; the reference against the paper's definition written out."""

from __future__ import annotations

import pytest
import torch

from seqarch.ops.retention import BACKENDS, resolve_backend, retention, retention_ref, retention_step
from tests.tolerance import assert_close

BATCH, HEADS, KEY_DIM, VALUE_DIM = 2, 3, 8, 6


def make_inputs(length: int, dtype, with_state: bool, heads: int = HEADS):
    q = torch.randn(BATCH, heads, length, KEY_DIM, dtype=dtype)
    k = torch.randn(BATCH, heads, length, KEY_DIM, dtype=dtype)
    v = torch.randn(BATCH, heads, length, VALUE_DIM, dtype=dtype)
    state = torch.randn(BATCH, heads, KEY_DIM, VALUE_DIM, dtype=dtype) if with_state else None
    return q, k, v, state


def definition(q, k, v, gammas, scale, state):
    """o_n = s Σ_{m<=n} γ^(n-m) (q_n·k_m) v_m + s γ^(n+1) q_n S_{-1};
    S_{T-1} = γ^T S_{-1} + Σ_m γ^(T-1-m) k_mᵀ v_m (RetNet eq. 5 with an initial state), term by term."""
    length = q.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    final = torch.zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=torch.float64)
    for h, gamma in enumerate(gammas):
        for n in range(length):
            for m in range(n + 1):
                score = (q[:, h, n] * k[:, h, m]).sum(-1, keepdim=True)
                out[:, h, n] += scale * gamma ** (n - m) * score * v[:, h, m]
            out[:, h, n] += scale * gamma ** (n + 1) * torch.einsum("bk,bkv->bv", q[:, h, n], state[:, h])
        for m in range(length):
            final[:, h] += gamma ** (length - 1 - m) * torch.einsum("bk,bv->bkv", k[:, h, m], v[:, h, m])
        final[:, h] += gamma**length * state[:, h]
    return out, final


def test_reference_matches_definition():
    q, k, v, state = make_inputs(9, torch.float64, with_state=True)
    out, final = retention_ref(q, k, v, initial_state=state, output_final_state=True)
    gammas = [1 - 2.0 ** (-5 - h) for h in range(HEADS)]
    expected_out, expected_final = definition(q, k, v, gammas, KEY_DIM**-0.5, state)
    assert_close(out, expected_out, "reference output vs definition")
    assert_close(final, expected_final, "reference final state vs definition")

    decay = torch.tensor([0.5, 0.8, 0.95], dtype=torch.float64)
    out, final = retention_ref(q, k, v, decay=decay, scale=0.3, initial_state=state, output_final_state=True)
    expected_out, expected_final = definition(q, k, v, decay.tolist(), 0.3, state)
    assert_close(out, expected_out, "reference output vs definition, custom decay and scale")
    assert_close(final, expected_final, "reference final state vs definition, custom decay and scale")


def run_with_grads(fn, inputs):
    inputs = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    out, final = fn(*inputs)
    weights_out, weights_final = torch.randn_like(out), torch.randn_like(final)
    ((out * weights_out).sum() + (final * weights_final).sum()).backward()
    grads = [x.grad if x is not None else None for x in inputs]
    return out, final, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("length", [1, 15, 63, 100])
@pytest.mark.parametrize("backend", BACKENDS)
def test_form_matches_reference_forward_and_backward(backend, length, with_state, dtype):
    q, k, v, state = make_inputs(length, dtype, with_state)
    decay = torch.tensor([0.6, 0.9, 0.97], dtype=dtype)
    names = ["q", "k", "v", "decay", "initial_state"]

    def fast(q, k, v, decay, state):
        return retention(q, k, v, decay=decay, backend=backend, chunk_size=16, initial_state=state,
                         output_final_state=True)

    def reference(q, k, v, decay, state):
        return retention_ref(q, k, v, decay=decay, initial_state=state, output_final_state=True)

    torch.manual_seed(1)
    out, final, grads = run_with_grads(fast, [q, k, v, decay, state])
    torch.manual_seed(1)
    out_ref, final_ref, grads_ref = run_with_grads(reference, [q, k, v, decay, state])
    tag = f"{backend} L={length} {'with' if with_state else 'without'} state"
    assert_close(out, out_ref, f"{tag}: output")
    assert_close(final, final_ref, f"{tag}: final state")
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        if grad_ref is not None:
            assert_close(grad, grad_ref, f"{tag}: d{name}")


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunkwise_many_chunks_and_default_decay(chunk_size):
    """300 tokens in chunks of 1 and 7 cross several blocks of chunk states; 64 leaves a ragged tail."""
    q, k, v, state = make_inputs(300, torch.float64, with_state=True, heads=5)
    out, final = retention(q, k, v, chunk_size=chunk_size, initial_state=state, output_final_state=True)
    out_ref, final_ref = retention_ref(q, k, v, initial_state=state, output_final_state=True)
    assert_close(out, out_ref, f"chunkwise C={chunk_size} output")
    assert_close(final, final_ref, f"chunkwise C={chunk_size} final state")


def test_step_matches_reference():
    q, k, v, state = make_inputs(11, torch.float32, with_state=True)
    out_ref, final_ref = retention_ref(q, k, v, scale=0.7, initial_state=state, output_final_state=True)
    outputs = []
    for t in range(q.shape[2]):
        out_t, state = retention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, scale=0.7)
        outputs.append(out_t)
    assert_close(torch.stack(outputs, dim=2), out_ref, "retention_step outputs")
    assert_close(state, final_ref, "retention_step final state")


def test_float32_chunkwise_stays_accurate_over_long_sequences():
    """12 default heads reach γ = 1 - 2^-16 (an effective memory of 65k tokens): float32 chunkwise
    over 2000 tokens against the float64 reference."""
    q, k, v, _ = make_inputs(2000, torch.float64, with_state=False, heads=12)
    out_ref, final_ref = retention_ref(q, k, v, output_final_state=True)
    out, final = retention(q.float(), k.float(), v.float(), output_final_state=True)
    assert_close(out, out_ref.float(), "float32 chunkwise output at L=2000", tolerance=1e-5)
    assert_close(final, final_ref.float(), "float32 chunkwise final state at L=2000", tolerance=1e-5)


def test_no_final_state_unless_asked():
    q, k, v, _ = make_inputs(5, torch.float32, with_state=False)
    for backend in BACKENDS:
        assert retention(q, k, v, backend=backend)[1] is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: dict(q=q[..., :4]), "q and k must both be"),
        (lambda q, k, v: dict(v=v[:, :, :3]), "v must be"),
        (lambda q, k, v: dict(decay=torch.tensor([0.5, 1.0, 0.9])), r"decay must lie in \(0, 1\)"),
        (lambda q, k, v: dict(decay=torch.tensor([0.5, 0.9])), r"decay must be \(H,\)"),
        (lambda q, k, v: dict(initial_state=torch.zeros(BATCH, HEADS, KEY_DIM, 2)), "initial_state must be"),
        (lambda q, k, v: dict(backend="fused"), "valid: 'auto', 'chunked', 'parallel', 'sequential'"),
        (lambda q, k, v: dict(chunk_size=0), "chunk_size must be a positive int"),
    ],
    ids=["qk-shape", "v-shape", "decay-range", "decay-shape", "state-shape", "backend", "chunk-size"],
)
def test_bad_input_is_named(change, message):
    q, k, v, _ = make_inputs(5, torch.float32, with_state=False)
    arguments = dict(q=q, k=k, v=v)
    arguments.update(change(q, k, v))
    with pytest.raises(ValueError, match=message):
        retention(**arguments)


def test_resolve_backend_and_the_old_mode_keyword():
    assert resolve_backend("auto", "cpu") == "chunked"
    for backend in ("chunked", "parallel", "sequential"):
        assert resolve_backend(backend, "cpu") == backend
    q, k, v, _ = make_inputs(9, torch.float64, with_state=False)
    for old, new in (("chunkwise", "chunked"), ("recurrent", "sequential"), ("parallel", "parallel")):
        with pytest.warns(DeprecationWarning, match=f"retention: the keyword mode= is deprecated.*backend='{new}'"):
            out, _ = retention(q, k, v, mode=old, chunk_size=4)
        assert torch.equal(out, retention(q, k, v, backend=new, chunk_size=4)[0])
