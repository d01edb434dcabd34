"""The mamba3 mixer: mamba-ssm's parameter names, shapes and initialisation; the contract for its
variants (MIMO, output norm, the sequential backend); the state checks; the reduction to Mamba-2's
SSD; and parity, which the rotation makes representable in one layer and which the same layer
without rotation cannot represent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_mixer
from seqarch.mixers.mamba3 import Mamba3State
from seqarch.ops.mamba3 import mamba3_scan
from seqarch.ops.ssd import ssd
from tests.contract_checks import BATCH, check_paths_agree, check_prefill_then_continue
from tests.references import load_mamba_ssm_file
from tests.tolerance import assert_close

WIDTH = 64

# state_dict names and shapes of mamba-ssm's `Mamba3(d_model=64, **kwargs)`, transcribed from its
# module definition: github.com/state-spaces/mamba, mamba_ssm/modules/mamba3.py at commit
# e9594ce1c732d97440f0332fdc43170a2294dbfa (file last changed in 33e2849ff046f72d60db8b17dbf47b7c949ff8c1;
# the PyPI sdist mamba-ssm==2.3.2.post1 defines the same parameters). The file cannot be read here at
# test time: mamba-ssm does not install on a CPU machine without its CUDA build, and fla-core 0.6.0
# has no Mamba-3 layer. test_state_dict_matches_mamba_ssm_source below reads it when it is installed.
REFERENCE_PARAMETERS = {
    "siso": ({}, {
        "dt_bias": (2,), "B_bias": (2, 1, 128), "C_bias": (2, 1, 128), "D": (2,), "in_proj.weight": (550, 64),
        "B_norm.weight": (128,), "C_norm.weight": (128,), "out_proj.weight": (64, 128),
    }),
    "mimo_rank2": ({"is_mimo": True, "mimo_rank": 2}, {
        "dt_bias": (2,), "B_bias": (2, 2, 128), "C_bias": (2, 2, 128), "mimo_x": (2, 2, 64), "mimo_z": (2, 2, 64),
        "mimo_o": (2, 2, 64), "D": (2,), "in_proj.weight": (806, 64), "B_norm.weight": (128,),
        "C_norm.weight": (128,), "out_proj.weight": (64, 128),
    }),
    "outproj_norm_groups2_state32_rope1": (
        {"is_outproj_norm": True, "ngroups": 2, "d_state": 32, "rope_fraction": 1.0}, {
            "dt_bias": (2,), "B_bias": (2, 1, 32), "C_bias": (2, 1, 32), "D": (2,), "in_proj.weight": (406, 64),
            "B_norm.weight": (32,), "C_norm.weight": (32,), "norm.weight": (128,), "out_proj.weight": (64, 128),
        }),
}
# mamba-ssm's argument names -> seqarch's config fields (everything else is spelled the same).
RENAMED = {"headdim": "head_dim", "ngroups": "n_groups"}


def ours(reference_kwargs: dict, **extra):
    """seqarch's mamba3 with the config of mamba-ssm's Mamba3(d_model=64, **reference_kwargs) (whose
    headdim defaults to 64; seqarch's head_dim to 32)."""
    kwargs = {"head_dim": 64, **{RENAMED.get(k, k): v for k, v in reference_kwargs.items()}}
    return build_mixer("mamba3", d_model=WIDTH, **kwargs, **extra)


@pytest.mark.parametrize("variant", list(REFERENCE_PARAMETERS))
def test_parameter_names_and_shapes_follow_mamba_ssm(variant):
    kwargs, expected = REFERENCE_PARAMETERS[variant]
    mixer = ours(kwargs)
    assert {name: tuple(p.shape) for name, p in mixer.state_dict().items()} == expected
    # so a mamba-ssm state dict of this config loads as is
    mixer.load_state_dict({name: torch.randn(shape) for name, shape in expected.items()})


@pytest.mark.parametrize("variant", list(REFERENCE_PARAMETERS))
def test_state_dict_matches_mamba_ssm_source(variant, monkeypatch):
    """Build mamba-ssm's own Mamba3 module from its source (its kernels replaced by placeholders, as
    only __init__ runs) and load its state dict into ours."""

    class GatedRMSNorm(torch.nn.Module):  # the parameters of mamba-ssm's layernorm_gated.RMSNorm
        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
            self.register_parameter("bias", None)
            self.eps = eps

    placeholders = {
        "mamba_ssm.ops.triton.layernorm_gated": {"RMSNorm": GatedRMSNorm},
        "mamba_ssm.ops.triton.mamba3.mamba3_siso_combined": {"mamba3_siso_combined": None},
        "mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step": {"apply_rotary_qk_inference_fwd": None},
        "mamba_ssm.ops.tilelang.mamba3.mamba3_mimo": {"mamba3_mimo": object()},
        "mamba_ssm.ops.cute.mamba3.mamba3_step_fn": {"mamba3_step_fn": None},
    }
    reference_module = load_mamba_ssm_file("modules/mamba3.py", monkeypatch, placeholders)
    kwargs, _ = REFERENCE_PARAMETERS[variant]
    reference = reference_module.Mamba3(d_model=WIDTH, **kwargs)
    mixer = ours(kwargs)
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    assert {name: tuple(tensor.shape) for name, tensor in mixer.state_dict().items()} == expected
    mixer.load_state_dict(reference.state_dict())


def test_initialisation_follows_mamba_ssm():
    mixer = ours({"is_mimo": True, "mimo_rank": 4}, dt_min=0.002, dt_max=0.05)
    for name in ("B_bias", "C_bias", "D", "B_norm.weight", "C_norm.weight", "mimo_z"):
        assert torch.equal(mixer.get_parameter(name), torch.ones_like(mixer.get_parameter(name))), name
    for name in ("mimo_x", "mimo_o"):
        assert torch.allclose(mixer.get_parameter(name), torch.full_like(mixer.get_parameter(name), 0.25)), name
    dt = F.softplus(mixer.dt_bias)
    assert (dt >= 0.002 * (1 - 1e-5)).all() and (dt <= 0.05 * (1 + 1e-5)).all()
    assert mixer.dt_bias._no_weight_decay and mixer.D._no_weight_decay


VARIANTS = {
    "mimo": {"is_mimo": True, "mimo_rank": 2, "chunk_size": 16},
    "outproj_norm": {"is_outproj_norm": True},
    "mimo_outproj_norm": {"is_mimo": True, "mimo_rank": 3, "is_outproj_norm": True, "n_groups": 2, "d_state": 16},
    "sequential": {"backend": "sequential"},
    "softplus_A_rope1": {"A_activation": "softplus", "rope_fraction": 1.0, "d_state": 32},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_keep_the_contract(variant):
    mixer = build_mixer("mamba3", d_model=WIDTH, **VARIANTS[variant])
    check_paths_agree(mixer, 21, f"mamba3 {variant}")
    check_prefill_then_continue(mixer, 13, 6, f"mamba3 {variant}")


def test_chunked_and_sequential_backends_agree():
    torch.manual_seed(0)
    chunked = build_mixer("mamba3", d_model=WIDTH, chunk_size=16)
    sequential = build_mixer("mamba3", d_model=WIDTH, backend="sequential")
    sequential.load_state_dict(chunked.state_dict())
    x = torch.randn(BATCH, 70, WIDTH)
    with torch.no_grad():
        assert_close(chunked(x), sequential(x), "chunked vs sequential mixer")
    assert "sequential reference" in sequential.describe_paths("cpu")
    assert "chunked" in chunked.describe_paths("cpu")


def test_init_state_follows_the_parameters():
    mixer = build_mixer("mamba3", d_model=WIDTH, head_dim=64).to(torch.float64)
    state = mixer.init_state(3)
    assert state.ssm.dtype == torch.float64 and state.ssm.device == mixer.out_proj.weight.device
    assert state.ssm.shape == (3, 2, 64, 128) and state.angle.shape == (3, 2, 32)
    assert state.k.shape == (3, 1, 2, 128) and state.x.shape == (3, 2, 64)
    assert mixer.init_state(3, dtype=torch.float32).ssm.dtype == torch.float32


def test_state_of_another_type_or_batch_is_refused():
    mixer = build_mixer("mamba3", d_model=WIDTH)
    other = build_mixer("mamba2", d_model=WIDTH).init_state(BATCH)
    with pytest.raises(ValueError, match="expects a Mamba3State"):
        mixer.step(torch.randn(BATCH, WIDTH), other)
    with pytest.raises(ValueError, match="expects a Mamba3State"):
        mixer.prefill(torch.randn(BATCH, 4, WIDTH), other)
    with pytest.raises(ValueError, match="a batch of 3"):
        mixer.step(torch.randn(BATCH, WIDTH), mixer.init_state(3))
    with pytest.raises(ValueError, match="a batch of 3"):
        mixer.prefill(torch.randn(BATCH, 4, WIDTH), mixer.init_state(3))
    assert isinstance(mixer.init_state(1), Mamba3State)


def test_config_is_validated():
    with pytest.raises(ValueError, match="rope_fraction"):
        build_mixer("mamba3", d_model=WIDTH, rope_fraction=0.25)
    with pytest.raises(ValueError, match="backend"):
        build_mixer("mamba3", d_model=WIDTH, backend="fused")
    with pytest.raises(ValueError, match="head_dim"):
        build_mixer("mamba3", d_model=WIDTH, head_dim=48)


def test_accounting():
    mixer = build_mixer("mamba3", d_model=WIDTH, head_dim=64)
    # angles 2 x 32, SSM 2 x 64 x 128, previous B 1 x 2 x 128, previous x 2 x 64, float32
    assert mixer.state_nbytes(1, 1000) == (64 + 16384 + 256 + 128) * 4
    mimo = build_mixer("mamba3", d_model=WIDTH, head_dim=64, is_mimo=True, mimo_rank=4)
    # MIMO keeps the SSM state (the paper's point) and adds only the rank-R previous B
    assert mimo.state_nbytes(1, 1000) - mixer.state_nbytes(1, 1000) == 3 * 256 * 4
    assert mimo.flops_per_token(10) > mixer.flops_per_token(10) == mixer.flops_per_token(10_000)


@pytest.mark.parametrize("chunked", [True, False], ids=["ssd_chunked", "ssd_ref"])
def test_mixer_discretization_reduces_to_mamba2(chunked):
    """The mixer's own projections of a random input, with the trapezoid weight lam = 1 (only the
    current input term), zero angles, zero B/C biases and a constant A (dd_A rows of in_proj zeroed, so
    A = -heavy_tail(0) = -1): the Mamba-3 scan equals Mamba-2's SSD on the same x, dt, A, B, C, D, z."""
    torch.manual_seed(0)
    mixer = build_mixer("mamba3", d_model=WIDTH, n_groups=2, d_state=16).double()
    cfg = mixer.config
    start = sum(mixer.split_sizes[:5])
    with torch.no_grad():
        mixer.in_proj.weight[start : start + cfg.n_heads] = 0  # dd_A
        mixer.B_bias.zero_()
        mixer.C_bias.zero_()
        mixer.D.normal_()
        arguments, _ = mixer._scan_inputs(torch.randn(BATCH, 45, WIDTH, dtype=torch.float64))
    arguments.update(trap=torch.ones_like(arguments["trap"]), angles=torch.zeros_like(arguments["angles"]))
    y3 = mamba3_scan(**arguments, chunk_size=16)[0]
    A = arguments["A"][0, 0]
    assert torch.equal(arguments["A"], A.expand_as(arguments["A"])) and (A == -1).all()
    ssd_arguments = {name: arguments[name] for name in ("x", "dt", "D", "z")}
    ssd_arguments.update(A=A, B=arguments["B"][:, :, 0], C=arguments["C"][:, :, 0])
    if chunked:
        y2 = ssd(**ssd_arguments, chunk_size=16)
    else:
        from seqarch.ops.ssd import ssd_ref

        y2 = ssd_ref(**ssd_arguments)
    assert_close(y3, y2, "mamba3 scan with lam = 1, theta = 0 vs Mamba-2 SSD")


def parity_layer(rotate: bool, dtype=torch.float64):
    """A one-layer mamba3 mixer with hand-set weights that outputs (-1)^(number of 1 bits so far).

    Input features: u = (bit, bos, 1, 0); one head of width 8, N = 4, one rotation angle on
    state channels (0, 1). dt = 1 (dt_bias = log(e - 1), dd_dt rows 0); A = -A_floor (dd_A rows very
    negative, so the state barely decays); angle rate tanh(20 bit) pi = pi bit, so theta_t =
    pi (#ones up to t); B = C = 0 from in_proj, so k = B_bias = q = C_bias = e_0; x = bos on channel
    0, so the only input is the start token. The state is then Rot(theta_0) e_0 times a positive weight,
    and y_t = q_t . h_t = cos(theta_t - theta_0) (weight) = +-(weight) with the sign of the parity of
    bits 1..t (bit 0 is the start token's 0). Without rotation (angle rows 0) y_t is positive for
    every t, whatever the bits: a real, non-negative decay cannot flip a sign."""
    mixer = build_mixer("mamba3", d_model=4, expand=2, head_dim=8, d_state=4, A_floor=1e-4).to(dtype)
    sizes = dict(zip(["z", "x", "B", "C", "dt", "A", "trap", "angle"], mixer.split_sizes, strict=True))
    offsets = {name: sum(list(sizes.values())[:i]) for i, name in enumerate(sizes)}
    bit, bos, one = 0, 1, 2
    with torch.no_grad():
        W = torch.zeros_like(mixer.in_proj.weight)
        W[offsets["z"] : offsets["z"] + 8, one] = 10.0  # gate silu(10) ~ 10 > 0
        W[offsets["x"], bos] = 1.0  # x = start-token indicator on channel 0
        W[offsets["A"], one] = -1e6  # heavy_tail(-1e6) ~ 1e-6 -> A = -A_floor
        if rotate:
            W[offsets["angle"], bit] = 20.0  # tanh(20 bit) = bit
        mixer.in_proj.weight.copy_(W)
        mixer.dt_bias.fill_(math.log(math.e - 1))  # softplus = 1
        for bias in (mixer.B_bias, mixer.C_bias):
            bias.zero_()
            bias[:, :, 0] = 1.0
        mixer.D.zero_()
        mixer.out_proj.weight.zero_()
        mixer.out_proj.weight[0, 0] = 1.0  # read y of channel 0
    return mixer


def parity_batch(length: int, batch: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (batch, length), generator=gen)
    bits[:, 0] = 0  # position 0 is the start token
    u = torch.zeros(batch, length, 4, dtype=dtype)
    u[..., 0] = bits.to(dtype)
    u[:, 0, 1] = 1.0
    u[..., 2] = 1.0
    target = 1 - 2 * (bits.cumsum(dim=1) % 2)  # (-1)^parity
    return u, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_rotation_represents_parity(dtype):
    u, target = parity_batch(length=200, batch=16, dtype=dtype)
    with torch.no_grad():
        y = parity_layer(rotate=True, dtype=dtype)(u)[..., 0]
        y_steps, state = [], parity_layer(rotate=True, dtype=dtype).init_state(16)
        layer = parity_layer(rotate=True, dtype=dtype)
        for t in range(20):
            y_t, state = layer.step(u[:, t], state)
            y_steps.append(y_t[:, 0])
    assert (torch.sign(y) == target).all(), "the rotating layer misreads parity"
    assert y.abs().min() > 1.0  # far from the decision boundary, not a rounding accident
    assert (torch.sign(torch.stack(y_steps, dim=1)) == target[:, :20]).all(), "the recurrent step misreads parity"


def test_without_rotation_the_same_layer_cannot_represent_parity():
    u, target = parity_batch(length=200, batch=16)
    with torch.no_grad():
        y = parity_layer(rotate=False)(u)[..., 0]
    assert (y > 0).all()  # the same sign everywhere: half of the parities are wrong
    accuracy = (torch.sign(y) == target).double().mean().item()
    assert 0.4 < accuracy < 0.6
