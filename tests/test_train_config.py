"""Recipes, `key=value` overrides and their validation."""

from __future__ import annotations

import pytest

from seqarch import list_mixers
from seqarch.overrides import ConfigError, parse_overrides
from seqarch.train.config import list_recipes, load_recipe, resolve

ARCHITECTURES = {"transformer", "mamba", "mamba2", "mamba3", "rwkv6", "rwkv7", "retnet", "deltanet", "gated_deltanet",
                 "hyena", "s4d", "hybrid"}


def fit_config(*args: str):
    overrides = parse_overrides(list(args))
    return resolve(load_recipe(overrides.pop("recipe")), overrides)


def test_one_recipe_per_architecture_sharing_one_base():
    assert set(list_recipes()) == ARCHITECTURES
    base = load_recipe("base")
    for name in ARCHITECTURES:
        tree = load_recipe(name)
        assert tree["recipe"] == name and set(tree) >= {"model", "data", "optim", "trainer"}
        assert tree["optim"] == base["optim"] and tree["trainer"] == base["trainer"]
    hybrid = load_recipe("hybrid")["model"]
    assert "attention" in hybrid["mixer"] and "mamba" in hybrid["mixer"] and len(hybrid["mixer"]) == hybrid["n_layers"]


def test_every_registered_mixer_has_a_recipe():
    in_recipes = set()
    for name in list_recipes():
        mixer = load_recipe(name)["model"]["mixer"]
        in_recipes |= {mixer} if isinstance(mixer, str) else set(mixer)
    assert set(list_mixers()) - in_recipes == set(), "registered mixers without a recipe"


def test_overrides_are_typed_and_dotted():
    parsed = parse_overrides(["model.d_model=256", "optim.lr=1e-3", "trainer.progress=false",
                              "model.mixer=[s4d,attention]", "data.path=/tmp/a b", "model.attention.n_heads=2"])
    assert parsed == {"model.d_model": 256, "optim.lr": 1e-3, "trainer.progress": False,
                      "model.mixer": ["s4d", "attention"], "data.path": "/tmp/a b", "model.attention.n_heads": 2}
    config = fit_config("recipe=s4d", "model.d_model=96", "optim.lr=1e-3", "trainer.max_steps=7", "model.s4d.d_state=8")
    assert config.model["d_model"] == 96 and config.model["s4d"] == {"d_state": 8}
    assert config.optim.lr == 1e-3 and config.trainer.max_steps == 7 and config.recipe == "s4d"


def test_selecting_a_data_source_resets_the_section_in_any_order():
    first = fit_config("recipe=transformer", "data=mqar", "data.num_kv_pairs=4")
    second = fit_config("recipe=transformer", "data.num_kv_pairs=4", "data=mqar")
    assert first.data == second.data
    assert first.data["source"] == "mqar" and first.data["num_kv_pairs"] == 4 and first.data["seq_len"] == 64


def test_recipe_by_path_extending_the_base(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: base\nmodel:\n  mixer: s4d\n  d_model: 48\ntrainer:\n  max_steps: 3\n")
    config = fit_config(f"recipe={recipe}")
    assert config.recipe == "mine" and config.model["d_model"] == 48 and config.trainer.max_steps == 3
    assert config.optim.lr == load_recipe("base")["optim"]["lr"]


@pytest.mark.parametrize("args, message", [
    (["recipe=nope"], "unknown recipe 'nope'; valid: deltanet, gated_deltanet, hybrid, hyena"),
    (["recipe=/no/such.yaml"], "recipe file '/no/such.yaml' does not exist"),
    (["recipe=s4d", "optim.lrr=1"], "unknown config key 'lrr' for optim; valid keys: beta1, beta2"),
    (["recipe=s4d", "colour=red"], "unknown key 'colour'; valid top-level keys: recipe"),
    (["recipe=s4d", "trainer.max_steps=many"], "config key 'max_steps' for trainer must be int, got 'many'"),
    (["recipe=s4d", "trainer.precision=8"], "config key 'precision' for trainer must be '32-true'"),
    (["recipe=s4d", "data=wiki"], "unknown data source 'wiki'; valid: stdlib, text, hf, mqar"),
    (["recipe=s4d", "data.num_kv_pairs=3"], "unknown config key 'num_kv_pairs' for data source 'stdlib'"),
    (["recipe=s4d", "model.mixer=transformerxl"], "mixer 'transformerxl' is not registered (yet); registered:"),
    (["recipe=s4d", "optim=1"], "cannot replace a whole section"),
    (["recipe=s4d", "oops"], "expected key=value, got 'oops'"),
])
def test_bad_input_names_what_is_wrong_and_what_is_valid(args, message):
    with pytest.raises(ConfigError) as error:
        fit_config(*args)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
