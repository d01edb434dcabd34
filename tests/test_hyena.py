"""Hyena specifics: the operator against a loop reference, modal kernels, distillation, lengths."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from einops import rearrange

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


# safari's Hyena (HazyResearch/safari, src/models/sequence/hyena.py: HyenaOperator with HyenaFilter,
# PositionalEmbedding, Sin, ExponentialModulation) needs safari's repository to import; its module
# structure and its forward are restated here from that file.


def safari_trainable_parameters(d_model: int, order: int, l_max: int, hidden: int, emb_dim: int = 3,
                                inner_mlps: int = 2, short_width: int = 3) -> dict[str, tuple]:
    """name -> shape of every trainable parameter of safari's HyenaOperator (named_parameters(),
    which lists the MLP's one shared `Sin` once, under its first index)."""
    streams, filters = (order + 1) * d_model, order - 1
    shapes = {
        "in_proj.weight": (streams, d_model), "in_proj.bias": (streams,),
        "out_proj.weight": (d_model, d_model), "out_proj.bias": (d_model,),
        "short_filter.weight": (streams, 1, short_width), "short_filter.bias": (streams,),
        "filter_fn.bias": (d_model * filters,),
        "filter_fn.pos_emb.z": (1, l_max, emb_dim),  # trainable: lr_pos_emb = 1e-5 is not 0
        "filter_fn.implicit_filter.0.weight": (hidden, emb_dim), "filter_fn.implicit_filter.0.bias": (hidden,),
        "filter_fn.implicit_filter.1.freq": (1, hidden),  # the shared Sin
    }
    for i in range(inner_mlps):
        shapes[f"filter_fn.implicit_filter.{2 * i + 2}.weight"] = (hidden, hidden)
        shapes[f"filter_fn.implicit_filter.{2 * i + 2}.bias"] = (hidden,)
    shapes[f"filter_fn.implicit_filter.{2 * inner_mlps + 2}.weight"] = (d_model * filters, hidden)
    return shapes


def to_safari_names(mixer) -> dict[str, torch.Tensor]:
    """seqarch's trainable parameters under safari's names (the key mapping on docs/mixers/hyena.md);
    the skip D^n (O, D) is safari's flat filter bias with channel d * O + o."""
    renamed = {}
    for name, parameter in mixer.named_parameters():
        if name == "skip":
            renamed["filter_fn.bias"] = parameter.transpose(0, 1).reshape(-1)
            continue
        name = name.replace("short_conv.", "short_filter.").replace("filter.z", "filter_fn.pos_emb.z")
        renamed[name.replace("filter.mlp.", "filter_fn.implicit_filter.")] = parameter
    return renamed


def safari_forward(weights: dict[str, torch.Tensor], u: torch.Tensor, order: int, inner_mlps: int = 2,
                   fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2) -> torch.Tensor:
    """HyenaOperator.forward of safari (num_heads 1, num_blocks 1, inner_factor 1, no outer mixing,
    identity activation) with HyenaFilter.filter, on safari-named weights, written out."""
    batch, length, d_model = u.shape
    filters = order - 1
    projected = torch.nn.functional.linear(u, weights["in_proj.weight"], weights["in_proj.bias"]).transpose(1, 2)
    width = weights["short_filter.weight"].shape[-1]
    uc = torch.nn.functional.conv1d(projected, weights["short_filter.weight"], weights["short_filter.bias"],
                                    padding=width - 1, groups=projected.shape[1])[..., :length]
    *x, v = uc.split(d_model, dim=1)
    # HyenaFilter.filter: z, t from PositionalEmbedding; MLP with one Sin; ExponentialModulation.
    z = weights["filter_fn.pos_emb.z"][:, :length]
    l_max = weights["filter_fn.pos_emb.z"].shape[1]
    t = torch.linspace(0, 1, l_max, dtype=u.dtype)[None, :length, None]
    freq = weights["filter_fn.implicit_filter.1.freq"]
    h = z
    for i in range(inner_mlps + 1):
        h = torch.sin(freq * torch.nn.functional.linear(h, weights[f"filter_fn.implicit_filter.{2 * i}.weight"],
                                                        weights[f"filter_fn.implicit_filter.{2 * i}.bias"]))
    h = torch.nn.functional.linear(h, weights[f"filter_fn.implicit_filter.{2 * inner_mlps + 2}.weight"])
    deltas = torch.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct,
                            d_model * filters, dtype=u.dtype)[None, None]
    h = h * torch.exp(-t * deltas.abs())
    k = rearrange(h, "c l (v o) -> c o v l", o=filters)[0]
    bias = rearrange(weights["filter_fn.bias"], "(v o) -> o v", o=filters)
    for o, x_i in enumerate(reversed(x[1:])):
        v = fftconv_ref(v * x_i, k[o], bias[o])
    y = v * x[0]
    return torch.nn.functional.linear(y.transpose(1, 2), weights["out_proj.weight"], weights["out_proj.bias"])


@pytest.mark.parametrize("order", [2, 3])
def test_trainable_parameters_are_safaris(order):
    """Same names (after the key mapping), shapes and count of trainable tensors as safari's operator:
    one shared sine frequency vector, trainable positional features z."""
    mixer = build_mixer("hyena", d_model=8, order=order, max_len=64, filter_hidden=16)
    ours = {name: tuple(p.shape) for name, p in to_safari_names(mixer).items()}
    assert ours == safari_trainable_parameters(8, order, 64, 16)
    assert sum(p.numel() for p in mixer.parameters()) == sum(
        math.prod(shape) for shape in safari_trainable_parameters(8, order, 64, 16).values())
    sines = [m for m in mixer.filter.mlp if type(m).__name__ == "Sin"]
    assert len(sines) == 3 and all(s.freq is sines[0].freq for s in sines)


def test_filter_optimizer_settings_are_safaris():
    """safari's `_optim` tags: the filter MLP at lr 1e-3, z at lr 1e-5, both without weight decay; and
    seqarch's optimizer groups honour them."""
    from seqarch.train.module import parameter_groups

    mixer = build_mixer("hyena", d_model=8, max_len=64)
    filter_params = {id(p) for p in mixer.filter.mlp.parameters()}
    for name, parameter in mixer.named_parameters():
        if name == "filter.z":
            assert parameter._optim == {"lr": 1e-5, "weight_decay": 0.0}
        elif id(parameter) in filter_params:
            assert parameter._optim == {"lr": 1e-3, "weight_decay": 0.0}, name
        else:
            assert not hasattr(parameter, "_optim"), name
    groups = parameter_groups(mixer, 0.1)
    by_id = {id(p): group for group in groups for p in group["params"]}
    assert len(by_id) == len(list(mixer.parameters()))
    assert by_id[id(mixer.filter.z)]["lr"] == 1e-5 and by_id[id(mixer.filter.z)]["weight_decay"] == 0.0
    assert by_id[id(mixer.filter.mlp[0].weight)]["lr"] == 1e-3
    assert by_id[id(mixer.filter.mlp[1].freq)]["weight_decay"] == 0.0
    assert by_id[id(mixer.in_proj.weight)] is groups[0] and "lr" not in groups[0]  # the optimizer's lr
    optimizer = torch.optim.AdamW(groups, lr=3e-3)
    lrs = sorted(group["lr"] for group in optimizer.param_groups)
    assert lrs == [1e-5, 1e-3, 3e-3, 3e-3]
    frozen = build_mixer("hyena", d_model=8, max_len=64, pos_emb_lr=0.0, filter_lr=None)
    assert "filter.z" not in dict(frozen.named_parameters()) and "z" in dict(frozen.filter.named_buffers())
    assert frozen.filter.mlp[0].weight._optim == {"weight_decay": 0.0}


@pytest.mark.parametrize("order", [2, 3])
def test_forward_and_gradients_equal_safari_operator(order):
    mixer = make(order=order, d_model=8, max_len=64, filter_hidden=16)
    with torch.no_grad():
        mixer.filter.z.add_(0.1 * torch.randn_like(mixer.filter.z))  # trained features, not the initial ones
        mixer.filter.mlp[1].freq.mul_(1.7)
    x = torch.randn(2, 45, 8, dtype=torch.float64)
    y = mixer(x)
    weights = to_safari_names(mixer)
    y_ref = safari_forward(weights, x, order)
    assert_close(y, y_ref, f"hyena order {order} vs safari's operator")
    grad_weight = torch.randn_like(y)
    grads = torch.autograd.grad((y * grad_weight).sum(), list(mixer.parameters()))
    grads_ref = torch.autograd.grad((y_ref * grad_weight).sum(), list(mixer.parameters()))
    for (name, _), grad, grad_ref in zip(mixer.named_parameters(), grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, f"hyena order {order}: d{name} vs safari's operator")
        assert grad.abs().max() > 0, f"{name} gets no gradient"
