"""Hyena specifics: the operator against a loop reference, modal kernels, distillation, lengths."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from seqarch import build_mixer
from seqarch.ops.fftconv import fftconv_ref
from seqarch.ops.modal_fit import fit_modal, modal_kernel, modal_kernel_ref
from tests.contract_checks import (
    BATCH,
    check_causal,
    check_gradients,
    check_paths_agree,
    check_prefill_then_continue,
    check_state_bytes,
    run_steps,
)
from tests.tolerance import assert_close

WIDTH = 64


def hyena_ref(mixer, x: torch.Tensor) -> torch.Tensor:
    """Definition 3.1 of the Hyena paper with the short conv as the first filter, written with
    loops: short conv tap by tap, long convolutions by direct O(L^2) sums."""
    cfg = mixer.config
    projected = mixer.in_proj(x).transpose(1, 2)  # (B, S * D, L)
    width, length = cfg.short_conv_width, x.shape[1]
    padded = torch.nn.functional.pad(projected, (width - 1, 0))
    conv = mixer.short_conv.bias[:, None] + sum(
        mixer.short_conv.weight[:, 0, tap, None] * padded[..., tap : tap + length] for tap in range(width))
    streams = conv.split(cfg.d_model, dim=1)  # x^0, ..., x^{N-1}, v
    kernels = mixer.filter.kernel(length)
    z = streams[-1]
    for n, gate in enumerate(reversed(streams[1:-1])):
        z = fftconv_ref(gate * z, kernels[n], mixer.skip[n])
    return mixer.out_proj((streams[0] * z).transpose(1, 2))


def make(dtype=torch.float64, **overrides):
    return build_mixer("hyena", d_model=overrides.pop("d_model", 8), max_len=overrides.pop("max_len", 128),
                       **overrides).to(dtype)


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("order", [2, 3])
def test_forward_matches_loop_reference_with_gradients(order, distilled):
    mixer = make(order=order)
    if distilled:
        mixer.distill(d_state=6)
    x = torch.randn(2, 37, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 37, 8, dtype=torch.float64)
    y = mixer(x)
    grads = torch.autograd.grad((y * weight).sum(), [x, *mixer.parameters()])
    y_ref = hyena_ref(mixer, x)
    grads_ref = torch.autograd.grad((y_ref * weight).sum(), [x, *mixer.parameters()])
    assert_close(y, y_ref, "hyena forward vs loop reference")
    names = ["x"] + [name for name, _ in mixer.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(g, g_ref, f"hyena d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modal_kernel_matches_recurrence_with_gradients(dtype):
    log_rate = (torch.rand(3, 5, dtype=dtype) * 4 - 6).requires_grad_(True)
    angle = (torch.rand(3, 5, dtype=dtype) * math.pi).requires_grad_(True)
    residue = torch.randn(3, 5, dtype=torch.complex64 if dtype == torch.float32 else torch.complex128,
                          requires_grad=True)
    weight = torch.randn(3, 301, dtype=dtype)
    outputs = []
    for fn in (modal_kernel, modal_kernel_ref):
        kernel = fn(log_rate, angle, residue, 301)
        outputs.append((kernel, *torch.autograd.grad((kernel * weight).sum(), [log_rate, angle, residue])))
    for name, fast, ref in zip(("kernel", "dlog_rate", "dangle", "dresidue"), *outputs, strict=True):
        if fast.is_complex():  # the tolerance helper compares real tensors
            fast, ref = torch.view_as_real(fast), torch.view_as_real(ref)
        assert_close(fast, ref, f"modal {name}", tolerance=1e-4 if dtype == torch.float32 else None)


def test_fit_recovers_an_exact_modal_filter():
    length = 400
    log_rate = torch.full((2, 3), math.log(2.0 / length), dtype=torch.float64)
    angle = (2 * math.pi / length * torch.arange(3, dtype=torch.float64)).expand(2, 3)
    residue = torch.randn(2, 3, dtype=torch.complex128)
    residue[:, 0] = residue[:, 0].real.to(residue.dtype)  # a real pole has a real residue
    h = modal_kernel(log_rate, angle, residue, length)
    fit = fit_modal(h, 3, torch.full((2,), 2.0 / length, dtype=torch.float64))
    assert fit.relative_error.max() < 1e-10
    assert_close(modal_kernel(fit.log_rate, fit.angle, fit.residue, length), h, "refitted modal filter")


def test_distillation_error_falls_with_d_state_and_is_reported_truthfully():
    base = make(d_model=16, max_len=512)
    errors = {}
    for d_state in (2, 8, 32):
        mixer = make(d_model=16, max_len=512)
        mixer.load_state_dict(base.state_dict())
        errors[d_state] = mixer.distill(d_state=d_state)
        assert errors[d_state].shape == (1, 16)
        with torch.no_grad():
            h, h_fit = base.filter.kernel(512), mixer.filter.kernel(512)
        measured = (h_fit - h).norm(dim=-1) / h.norm(dim=-1)
        assert_close(errors[d_state], measured, f"reported error at d_state={d_state}", tolerance=1e-6)
    for small, large in ((2, 8), (8, 32)):
        assert errors[large].mean() < errors[small].mean(), {k: v.mean().item() for k, v in errors.items()}
        assert (errors[large] <= errors[small] + 1e-12).all()  # nested modes: never worse per channel
    assert errors[32].median() < 1e-2


@pytest.fixture(scope="module")
def distilled_mixer():
    torch.manual_seed(1)
    mixer = build_mixer("hyena", d_model=WIDTH, max_len=300)
    mixer.distill(d_state=16)
    return mixer


@pytest.mark.parametrize("length", [1, 7, 63, 257])
def test_distilled_paths_agree(distilled_mixer, length):
    check_paths_agree(distilled_mixer, length, "hyena distilled")


@pytest.mark.parametrize("split", [(1, 6), (13, 9), (63, 2)])
def test_distilled_prefill_then_continue(distilled_mixer, split):
    check_prefill_then_continue(distilled_mixer, *split, "hyena distilled")


def test_distilled_contract(distilled_mixer):
    assert distilled_mixer.distilled and not distilled_mixer.state_grows_with_length
    check_causal(distilled_mixer, "hyena distilled")
    check_gradients(distilled_mixer, "hyena distilled")
    check_state_bytes(distilled_mixer, "hyena distilled")
    mixer64 = copy.deepcopy(distilled_mixer).double()
    check_paths_agree(mixer64, 33, "hyena distilled float64", dtype=torch.float64)


def test_distilled_state_is_constant_and_exact_state_grows():
    exact = build_mixer("hyena", d_model=WIDTH, max_len=256)
    assert exact.state_grows_with_length and not exact.distilled
    assert exact.state_nbytes(1, 200) > exact.state_nbytes(1, 100)
    exact.distill(d_state=8)
    assert exact.state_nbytes(1, 200) == exact.state_nbytes(1, 100) == 1 * WIDTH * (3 * 2 * 4 + 4 * 8)


@pytest.mark.parametrize("order", [3])
def test_higher_order_contract(order):
    mixer = build_mixer("hyena", d_model=16, order=order, max_len=300)
    check_paths_agree(mixer, 63, f"hyena order {order}")
    check_prefill_then_continue(mixer, 13, 9, f"hyena order {order}")
    check_state_bytes(mixer, f"hyena order {order}")
    check_gradients(mixer, f"hyena order {order}")


def test_over_length_names_max_len():
    mixer = build_mixer("hyena", d_model=8, max_len=16)
    with pytest.raises(ValueError, match="17 tokens exceed max_len=16"):
        mixer(torch.randn(1, 17, 8))
    with torch.no_grad():
        _, state = mixer.prefill(torch.randn(1, 10, 8), mixer.init_state(1))
        with pytest.raises(ValueError, match="max_len=16"):
            mixer.prefill(torch.randn(1, 7, 8), state)
        _, state = run_steps(mixer, torch.randn(1, 6, 8), state)
        with pytest.raises(ValueError, match="max_len=16"):
            mixer.step(torch.randn(1, 8), state)
    mixer.distill(d_state=4)  # the modal filters are defined for any length
    assert mixer(torch.randn(1, 40, 8)).shape == (1, 40, 8)


def test_filter_memo_follows_parameter_updates():
    mixer = make(dtype=torch.float32, d_model=8, max_len=64)
    x = torch.randn(BATCH, 20, 8)
    with torch.no_grad():
        before = mixer(x)
        mixer.filter.mlp[-1].weight.mul_(-0.5)  # an in-place update, as an optimizer step does
        after = mixer(x)
    assert (after - before).abs().max() > 1e-3
    assert_close(after, mixer(x).detach(), "memoised filter after an in-place update vs recomputed")


def test_implicit_filter_definition():
    mixer = make(d_model=4, max_len=100)
    full, short = mixer.filter.kernel(100), mixer.filter.kernel(37)
    assert_close(short, full[..., :37], "filter at length 37 is a prefix of the max_len filter")
    decay = mixer.filter.decay()  # channel c's envelope is exp(-t decay_c), t in [0, 1]
    assert_close(torch.exp(-decay[0] * 1.5), torch.tensor(1e-2, dtype=decay.dtype), "slowest decay")
    assert_close(torch.exp(-decay[-1] * 0.3), torch.tensor(1e-2, dtype=decay.dtype), "fastest decay")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="order must be >= 2"):
        build_mixer("hyena", d_model=8, order=1)
    with pytest.raises(ValueError, match="filter_emb_dim must be odd"):
        build_mixer("hyena", d_model=8, filter_emb_dim=4)
    mixer = make(d_model=8)
    with pytest.raises(ValueError, match="even d_state >= 2"):
        mixer.distill(d_state=3)
    mixer.distill(d_state=4)
    with pytest.raises(ValueError, match="already distilled"):
        mixer.distill(d_state=4)
