"""DeltaNet and Gated DeltaNet mixers (seqarch/mixers/deltanet.py): the layer's math against an
independent transcription of flash-linear-attention's layers driven by fla's naive delta-rule functions,
parameter names and shapes against fla's layer source text, initialisation, variants and state checks.

fla's layer classes import triton, so they are read as text, never imported; the naive op files are
loaded by path (installed by the README's test command from requirements-reference.txt).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from seqarch import build_mixer
from seqarch.mixers.deltanet import DeltaNetState, GatedDeltaNetState
from tests.compiled import needs_compiler
from tests.contract_checks import BATCH, check_paths_agree, check_prefill_then_continue
from tests.references import fla_layer_source, load_fla_file
from tests.tolerance import assert_close

WIDTH = 64


def fla_modules(source: str) -> dict[str, tuple[str, str]]:
    """self.<name> = nn.Linear(<in>, <out>) / ShortConvolution(hidden_size=<width>) / norms, from the text."""
    found = {}
    for name, in_f, out_f in re.findall(r"self\.(\w+) = nn\.Linear\((?:in_features=)?([\w.]+),\s*"
                                        r"(?:out_features=)?([\w.]+)", source):
        found[name] = (in_f, out_f)
    for name, width in re.findall(r"self\.(\w+) = ShortConvolution\(\s*hidden_size=([\w.]+)", source):
        found[name] = ("conv", width)
    for name, width in re.findall(r"self\.(\w+) = (?:FusedRMSNormGated|RMSNorm)\((?:hidden_size=)?([\w.]+)", source):
        found[name] = ("norm", width)
    return found


def fla_size(expression: str, mixer) -> int:
    """Evaluate fla's size names (hidden_size, self.key_dim, ...) with this mixer's config."""
    cfg = mixer.config
    names = {"hidden_size": cfg.d_model, "self.key_dim": cfg.key_dim, "self.value_dim": cfg.value_dim,
             "self.num_heads": cfg.n_heads, "self.num_v_heads": cfg.n_heads, "self.head_v_dim": cfg.head_v_dim}
    return names[expression]


@pytest.mark.parametrize("name, source", [("gated_deltanet", "gated_deltanet.py"), ("deltanet", "delta_net.py")])
def test_parameter_names_and_shapes_follow_fla(name, source):
    mixer = build_mixer(name, d_model=WIDTH, use_gate=True)
    modules = fla_modules(fla_layer_source(source))
    expected = {}
    for module, (kind, size) in modules.items():
        if kind == "conv":
            expected[f"{module}.weight"] = (fla_size(size, mixer), 1, mixer.config.d_conv)
        elif kind == "norm":
            expected[f"{module}.weight"] = (fla_size(size, mixer),)
        else:
            expected[f"{module}.weight"] = (fla_size(size, mixer), fla_size(kind, mixer))
    if name == "gated_deltanet":
        assert "self.A_log = nn.Parameter" in fla_layer_source(source)
        expected["A_log"] = expected["dt_bias"] = (mixer.config.n_heads,)
    ours = {key: tuple(value.shape) for key, value in mixer.state_dict().items()}
    assert ours == expected


def fla_layer_math(mixer, x: torch.Tensor, naive) -> torch.Tensor:
    """fla's DeltaNet / GatedDeltaNet forward written out from the layer source, with fla's naive
    recurrent op for the delta rule: q/k/v projections, depthwise causal convs + SiLU, L2 norm (eps
    1e-6), beta = sigmoid(b_proj), g = -exp(A_log) softplus(a_proj + dt_bias), RMSNorm, gate, o_proj."""
    cfg = mixer.config

    def conv(name, u):
        module = getattr(mixer, name)
        y = F.conv1d(u.transpose(1, 2), module.weight, module.bias, padding=cfg.d_conv - 1, groups=u.shape[-1])
        return F.silu(y[..., : u.shape[1]]).transpose(1, 2)

    def l2(u):
        return u / torch.sqrt((u * u).sum(-1, keepdim=True) + 1e-6)

    batch, length, _ = x.shape
    q = l2(conv("q_conv1d", mixer.q_proj(x)).reshape(batch, length, cfg.n_heads, cfg.head_dim))
    k = l2(conv("k_conv1d", mixer.k_proj(x)).reshape(batch, length, cfg.n_heads, cfg.head_dim))
    v = conv("v_conv1d", mixer.v_proj(x)).reshape(batch, length, cfg.n_heads, cfg.head_v_dim)
    beta = mixer.b_proj(x).sigmoid()
    if cfg.allow_neg_eigval:
        beta = beta * 2
    if hasattr(mixer, "A_log"):
        g = -mixer.A_log.exp() * F.softplus(mixer.a_proj(x) + mixer.dt_bias)
        o, _ = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g)
    else:
        o, _ = naive.delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, beta)))
        o = o.transpose(1, 2)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * mixer.o_norm.weight
    if cfg.use_gate:
        o = o * F.silu(mixer.g_proj(x).reshape(batch, length, cfg.n_heads, cfg.head_v_dim))
    return mixer.o_proj(o.reshape(batch, length, cfg.value_dim))


@pytest.mark.parametrize("name, overrides", [
    ("gated_deltanet", {}),
    ("gated_deltanet", {"allow_neg_eigval": True, "conv_bias": True, "expand_v": 1.0}),
    ("deltanet", {}),
    ("deltanet", {"use_gate": True, "allow_neg_eigval": True}),
], ids=["gated", "gated-negeig-convbias", "delta", "delta-gate-negeig"])
def test_layer_matches_fla_layer_math(name, overrides):
    naive = load_fla_file("ops/gated_delta_rule/naive.py" if name == "gated_deltanet" else "ops/delta_rule/naive.py")
    mixer = build_mixer(name, d_model=WIDTH, **overrides)
    with torch.no_grad():  # weights at a scale where every term matters (the init's 0.02 makes v tiny)
        for param in mixer.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.3)
            elif param is not getattr(mixer, "A_log", None):
                param.add_(0.2 * torch.randn_like(param))
        x = torch.randn(BATCH, 45, WIDTH)
        assert_close(mixer(x), fla_layer_math(mixer, x, naive), f"{name} {overrides} vs fla's layer math")


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_initialisation_follows_fla(name):
    torch.manual_seed(1)
    mixer = build_mixer(name, d_model=256)
    for module_name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_conv1d", "v_conv1d"):
        weight = getattr(mixer, module_name).weight
        assert abs(weight.std().item() - 0.02) < 0.002, f"{module_name}.weight std {weight.std().item()}"
    assert torch.equal(mixer.o_norm.weight, torch.ones_like(mixer.o_norm.weight))
    if name == "gated_deltanet":
        A = mixer.A_log.exp()
        assert ((A > 0) & (A < 16)).all()
        dt = F.softplus(mixer.dt_bias)
        assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
        assert mixer.A_log._no_weight_decay and mixer.dt_bias._no_weight_decay


@pytest.mark.parametrize("name, overrides", [
    ("gated_deltanet", {"backend": "sequential"}),
    ("gated_deltanet", {"allow_neg_eigval": True, "use_gate": False, "chunk_size": 16}),
    ("deltanet", {"use_beta": False, "use_gate": True, "conv_bias": True, "d_conv": 2}),
])
def test_variants_keep_the_contract(name, overrides):
    mixer = build_mixer(name, d_model=WIDTH, **overrides)
    check_paths_agree(mixer, 37, f"{name} {overrides}")
    check_prefill_then_continue(mixer, 20, 3, f"{name} {overrides}")


@pytest.mark.parametrize("name, other_state", [("deltanet", GatedDeltaNetState), ("gated_deltanet", DeltaNetState)])
def test_step_and_prefill_refuse_foreign_states(name, other_state):
    mixer = build_mixer(name, d_model=WIDTH)
    state = mixer.init_state(BATCH)
    foreign = other_state(conv=state.conv, recurrent=state.recurrent)
    with pytest.raises(ValueError, match="expects a"):
        mixer.step(torch.randn(BATCH, WIDTH), foreign)
    with pytest.raises(ValueError, match="expects a"):
        mixer.prefill(torch.randn(BATCH, 3, WIDTH), foreign)
    with pytest.raises(ValueError, match="a batch of"):
        mixer.step(torch.randn(BATCH + 1, WIDTH), state)
    with pytest.raises(ValueError, match="a batch of"):
        mixer.prefill(torch.randn(BATCH + 1, 3, WIDTH), state)
    other = build_mixer(name, d_model=WIDTH, d_conv=3).init_state(BATCH)
    with pytest.raises(ValueError, match="shapes"):
        mixer.step(torch.randn(BATCH, WIDTH), other)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_init_state_follows_the_parameters(name):
    mixer = build_mixer(name, d_model=WIDTH).to(torch.float64)
    state = mixer.init_state(3)
    assert state.recurrent.dtype == torch.float64 and state.conv.dtype == torch.float64
    assert state.batch_size == 3 and state.nbytes == mixer.state_nbytes(3, 100, torch.float64)
    assert mixer.init_state(1, dtype=torch.float32).recurrent.dtype == torch.float32


def test_negative_eigenvalues_double_beta():
    """With allow_neg_eigval, beta = 2 sigmoid(.): with the same weights the layers differ, and
    the state's transition I - beta k k^T has eigenvalue 1 - beta < 0 where beta > 1."""
    plain = build_mixer("gated_deltanet", d_model=WIDTH)
    doubled = build_mixer("gated_deltanet", d_model=WIDTH, allow_neg_eigval=True)
    doubled.load_state_dict(plain.state_dict())
    x = torch.randn(BATCH, 9, WIDTH)
    _, others = doubled._project(x)
    qkv, _ = doubled._project(x)
    _, _, _, beta, _ = doubled._heads(qkv, others)
    assert beta.max() > 1 and beta.max() < 2
    with torch.no_grad():
        assert (plain(x) - doubled(x)).abs().max() > 1e-6


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="backend"):
        build_mixer("gated_deltanet", d_model=WIDTH, backend="fused")
    with pytest.raises(ValueError, match="n_heads"):
        build_mixer("deltanet", d_model=WIDTH, n_heads=5)
    with pytest.raises(ValueError, match="head_dim"):
        build_mixer("gated_deltanet", d_model=WIDTH, head_dim=0)


def test_describe_paths_and_flops():
    mixer = build_mixer("gated_deltanet", d_model=WIDTH)
    assert "chunked WY/UT" in mixer.describe_paths("cpu")
    assert "sequential" in build_mixer("deltanet", d_model=WIDTH, backend="sequential").describe_paths("cpu")
    cfg = mixer.config
    assert mixer.flops_per_token(10) == mixer.flops_per_token(10_000) > 7 * cfg.n_heads * cfg.head_dim * cfg.head_v_dim


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_compiled_backend_matches_chunked(name, dtype):
    """The same layer on backend="compiled" and backend="chunked": outputs, the carried state of prefill,
    and the gradients of every parameter and of the input."""
    torch.manual_seed(0)
    chunked = build_mixer(name, d_model=WIDTH, backend="chunked", use_gate=True).to(dtype)
    fast = build_mixer(name, d_model=WIDTH, backend="compiled", use_gate=True).to(dtype)
    fast.load_state_dict(chunked.state_dict())
    x = torch.randn(BATCH, 37, WIDTH, dtype=dtype)
    results = []
    for mixer in (fast, chunked):
        inputs = x.clone().requires_grad_(True)
        y = mixer(inputs)
        y_prefill, state = mixer.prefill(x, mixer.init_state(BATCH))
        weights = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((y * weights).sum(), [inputs, *mixer.parameters()])
        results.append((y, y_prefill, state.recurrent, grads))
    (y, y_prefill, recurrent, grads), (y_ref, y_prefill_ref, recurrent_ref, grads_ref) = results
    tolerance = 1e-4 if dtype == torch.float32 else None
    assert_close(y, y_ref, f"{name} forward", tolerance=tolerance)
    assert_close(y_prefill, y_prefill_ref, f"{name} prefill", tolerance=tolerance)
    assert_close(recurrent, recurrent_ref, f"{name} carried state", tolerance=tolerance)
    names = ["x", *(n for n, _ in fast.named_parameters())]
    for param_name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, f"{name} d{param_name}", tolerance=tolerance)
