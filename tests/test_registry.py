"""Registry and config validation: every bad key or value gets one clear ValueError."""

from __future__ import annotations

import subprocess
import sys

import pytest

from seqarch import build_config, build_mixer, list_mixers, register
from seqarch.mixers.attention import AttentionConfig


def test_builtin_mixers_are_listed():
    assert {"attention", "s4d"} <= set(list_mixers())


def test_unknown_mixer_lists_registered_ones():
    with pytest.raises(ValueError, match=r"unknown mixer 'transformerz'; registered mixers: .*attention"):
        build_mixer("transformerz", d_model=32)


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key 'n_head' for mixer 'attention'; valid keys: .*n_heads"):
        build_mixer("attention", d_model=32, n_head=4)


@pytest.mark.parametrize(("key", "value"), [("n_heads", "4"), ("n_heads", 2.5), ("bias", 1), ("rope_base", "big")])
def test_ill_typed_value_is_named(key, value):
    with pytest.raises(ValueError, match=f"config key '{key}' for mixer 'attention' must be"):
        build_mixer("attention", d_model=32, **{key: value})


def test_ints_are_accepted_for_floats_and_configs_are_frozen():
    config = build_config("attention", d_model=32, rope_base=500)
    assert config.rope_base == 500.0 and isinstance(config.rope_base, float)
    with pytest.raises(AttributeError):
        config.d_model = 64


def test_invalid_values_are_explained():
    with pytest.raises(ValueError, match="not divisible by n_heads=3"):
        build_mixer("attention", d_model=32, n_heads=3)
    with pytest.raises(ValueError, match="d_state must be an even number"):
        build_mixer("s4d", d_model=32, d_state=3)


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        register("attention", AttentionConfig)(type("Other", (), {}))


def test_import_lists_mixers_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", "import seqarch; print(seqarch.list_mixers())"],
                         capture_output=True, text=True, check=True).stdout
    assert "'attention'" in out and "'s4d'" in out


@pytest.mark.parametrize("d_model", [0, -32])
@pytest.mark.parametrize("name", list_mixers())
def test_non_positive_width_is_refused(name, d_model):
    with pytest.raises(ValueError, match="d_model must be"):
        build_config(name, d_model=d_model)


@pytest.mark.parametrize("name", list_mixers())
def test_names_are_uniform(name):
    """Classes are <Name>Mixer and configs <Name>Config; the algorithm switch, where there is one,
    is `backend`, typed Literal so `seqarch list` and errors show its values."""
    from seqarch.configs import config_fields
    from seqarch.registry import get_entry

    entry = get_entry(name)
    assert entry.mixer_cls.__name__.endswith("Mixer") and entry.config_cls.__name__.endswith("Config")
    fields = config_fields(entry.config_cls)
    assert not {"scan", "mode", "path", "headdim", "nheads", "head_size"} & set(fields)
    if "backend" in fields:
        assert fields["backend"].startswith("'auto' | ")


def test_renamed_keys_warn_once_and_name_the_new_key():
    with pytest.warns(DeprecationWarning, match="config key 'scan' for mixer 'mamba2' is deprecated.*'backend'"):
        config = build_config("mamba2", d_model=64, scan="sequential")
    assert config.backend == "sequential"
    with pytest.warns(DeprecationWarning) as caught:
        build_mixer("rwkv6", d_model=64, head_size=32)
    assert caught[0].filename == __file__, "the warning points at the caller's line, not seqarch's"


def test_old_recipe_keys_still_build_a_model():
    """An old recipe's model section (mixer keys under the mixer's name) keeps working."""
    from seqarch.models import SeqLM

    with pytest.warns(DeprecationWarning):
        model = SeqLM(32, d_model=64, n_layers=1, mixer="rwkv6", rwkv6={"mode": "chunked", "head_size": 32})
    assert model.layers[0].mixer.config.backend == "chunked"
