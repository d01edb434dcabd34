"""LoRA adapters (zero start, what trains, merging) and `seqarch fit recipe=extend` end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from seqarch.cli import main
from seqarch.models.lm import SeqLM
from seqarch.models.lora import LoRALinear, apply_lora, merge_lora
from seqarch.overrides import ConfigError
from seqarch.runs import model_from_checkpoint, read_checkpoint
from seqarch.train.extend import extend_config
from tests.tolerance import assert_close

BASE = ["recipe=transformer", "model.d_model=32", "model.n_layers=2", "model.attention.n_heads=2", "data=passkey",
        "data.num_train=32", "data.num_val=8", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_every=2",
        "trainer.val_batches=1", "trainer.num_threads=1", "trainer.progress=false", "optim.warmup_steps=1"]
EXTEND = ["trainer.max_steps=2", "trainer.val_every=2", "trainer.val_batches=1", "trainer.progress=false",
          "trainer.num_threads=1", "optim.warmup_steps=1"]


def tiny_model(dtype=torch.float64, mixer="attention") -> SeqLM:
    return SeqLM(vocab_size=256, d_model=32, n_layers=2, mixer=mixer, dtype=dtype, attention={"n_heads": 2})


def randomize_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.5)


def test_lora_starts_equal_to_the_base_model():
    model = tiny_model()
    tokens = torch.randint(0, 256, (2, 37))
    expected = model(tokens)
    assert apply_lora(model, rank=4, alpha=8.0) == 2 * 3  # q, kv, out per attention layer
    assert_close(model(tokens), expected, "zero-init LoRA")


@pytest.mark.parametrize("longlora", [True, False])
def test_only_adapters_and_in_longlora_embeddings_and_norms_train(longlora):
    model = tiny_model(torch.float32)
    apply_lora(model, rank=2, alpha=4.0, train_embeddings_and_norms=longlora)
    randomize_adapters(model)
    model(torch.randint(0, 256, (2, 21))).square().mean().backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    adapters = {name for name in trained if "lora_" in name}
    assert len(adapters) == 2 * 3 * 2 and trained == with_grad
    others = trained - adapters
    if longlora:
        assert others == {"embedding.weight", "norm.weight"} | {
            f"layers.{i}.{norm}.weight" for i in range(2) for norm in ("norm_mixer", "norm_mlp")}
    else:
        assert not others
    assert not any(name.endswith("base.weight") or "mlp" in name and "norm" not in name for name in trained)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merging_the_adapters_equals_the_adapted_forward(dtype):
    model = tiny_model(dtype)
    apply_lora(model, rank=3, alpha=6.0)
    randomize_adapters(model)
    tokens = torch.randint(0, 256, (2, 29))
    adapted = model(tokens).detach()
    base = tiny_model(dtype)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and ".base." not in k},
                         strict=False)
    assert merge_lora(model) == 6
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert_close(model(tokens), adapted, "merged LoRA")
    assert (model(tokens) - base(tokens)).abs().max() > 1e-3  # the merged update is not a no-op


def test_lora_linear_matches_its_formula_and_gradients():
    base = nn.Linear(7, 5, dtype=torch.float64)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    expected = x @ base.weight.T + base.bias + 1.5 * torch.einsum("bli,ri,or->blo", x, layer.lora_a, layer.lora_b)
    assert_close(layer(x), expected, "LoRALinear")
    assert torch.autograd.gradcheck(lambda a, b, inp: torch.func.functional_call(
        layer, {"lora_a": a, "lora_b": b}, (inp,)), (layer.lora_a.detach().clone().requires_grad_(),
                                                     layer.lora_b.detach().clone().requires_grad_(), x))


def test_lora_needs_attention_and_a_positive_rank():
    with pytest.raises(ValueError, match="no attention layer"):
        apply_lora(SeqLM(vocab_size=16, d_model=64, n_layers=1, mixer="s4d"), rank=2, alpha=1.0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("extend") / "base"
    assert main(["fit", *BASE, f"run_dir={run}"]) == 0
    return run


def test_extend_config_takes_the_checkpoint_and_implies_the_scaling(base_run):
    config = extend_config(str(base_run), {"data.seq_len": 512, "model.attention.rope_scaling": "yarn"})
    attention = config.model["attention"]
    assert (attention["rope_factor"], attention["max_position"], attention["n_heads"]) == (4.0, 128, 2)
    assert config.data["source"] == "passkey" and config.data["seq_len"] == 512 and config.model["d_model"] == 32
    assert config.init_from.endswith("last.ckpt") and config.ckpt is None and config.recipe == "extend"
    assert config.trainer.max_steps == 100 and config.optim.lr == 1e-3  # from extend.yaml
    explicit = extend_config(str(base_run), {"model.attention.rope_scaling": "linear",
                                             "model.attention.rope_factor": 2.0})
    assert explicit.model["attention"]["rope_factor"] == 2.0
    with pytest.raises(ConfigError, match="needs ckpt="):
        extend_config(None, {})


def test_fit_recipe_extend_starts_a_new_run_from_the_weights(base_run, tmp_path, capsys):
    run = tmp_path / "extended"
    code = main(["fit", "recipe=extend", f"ckpt={base_run}", "data.seq_len=256", "model.attention.rope_scaling=yarn",
                 "model.attention.s2_group=64", "lora.rank=4", *EXTEND, f"run_dir={run}"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] is None and summary["recipe"] == "extend"
    assert summary["tokens_trained"] == 2 * 4 * 256
    _, base = read_checkpoint(str(base_run))
    _, extended = read_checkpoint(str(run))
    assert any("lora_a" in key for key in extended["state_dict"])
    merged = model_from_checkpoint(extended).state_dict()
    original = model_from_checkpoint(base).state_dict()
    assert merged.keys() == original.keys()
    frozen = [key for key in merged if "mlp" in key and "norm" not in key]
    assert frozen and all(torch.equal(merged[key], original[key]) for key in frozen)  # LoRA kept them frozen
    adapted = [key for key in merged if key.endswith(("q_proj.weight", "kv_proj.weight", "out_proj.weight"))]
    assert len(adapted) == 6 and all(not torch.equal(merged[key], original[key]) for key in adapted)


def test_extend_errors_are_one_line(base_run, tmp_path, capsys):
    assert main(["fit", "recipe=extend", *EXTEND]) == 2
    assert "recipe=extend needs ckpt=" in capsys.readouterr().err
    assert main(["fit", "recipe=extend", f"ckpt={base_run}", "model.d_model=48", "model.attention.n_heads=2",
                 *EXTEND, f"run_dir={tmp_path / 'x'}"]) == 2
    assert "does not fit the configured model" in capsys.readouterr().err


def test_an_extended_lora_run_loads_like_the_adapted_model(base_run, tmp_path):
    run = tmp_path / "extended"
    assert main(["fit", "recipe=extend", f"ckpt={base_run}", "lora.rank=2", *EXTEND, f"run_dir={run}"]) == 0
    _, contents = read_checkpoint(str(run))
    kwargs = contents["hyper_parameters"]["model_kwargs"]
    adapted = SeqLM.from_config(kwargs)
    apply_lora(adapted, 2, 16.0)
    adapted.load_state_dict({k.removeprefix("model."): v for k, v in contents["state_dict"].items()})
    tokens = torch.randint(0, 256, (2, 33))
    assert_close(model_from_checkpoint(copy.deepcopy(contents))(tokens), adapted.eval()(tokens), "loaded")
