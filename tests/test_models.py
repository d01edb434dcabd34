"""SeqLM and Block: hybrids, generation through the recurrent path, weight tying."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqarch import SeqLM, build_block
from tests.tolerance import assert_close

VOCAB = 37


def greedy_by_full_forward(model: SeqLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(new_tokens):
        next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


@pytest.mark.parametrize("mixer", ["attention", "s4d", ["s4d", "s4d", "attention"]],
                         ids=["attention", "s4d", "hybrid"])
def test_greedy_generate_equals_full_forward_argmax(mixer):
    model = SeqLM(VOCAB, d_model=32, n_layers=3, mixer=mixer).eval()
    prompt = torch.randint(0, VOCAB, (2, 9))
    expected = greedy_by_full_forward(model, prompt, 12)
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)


def test_generate_never_recomputes_the_prefix(monkeypatch):
    model = SeqLM(VOCAB, d_model=32, n_layers=2, mixer="attention").eval()
    calls = []
    original = model.prefill
    monkeypatch.setattr(model, "prefill", lambda tokens, state: calls.append(tokens.shape) or original(tokens, state))
    monkeypatch.setattr(model, "forward", lambda tokens: pytest.fail("generate called the full forward"))
    model.generate(torch.randint(0, VOCAB, (1, 5)), 6, temperature=0)
    assert calls == [torch.Size([1, 5])]


def test_sampling_respects_top_k_and_seed():
    model = SeqLM(VOCAB, d_model=32, n_layers=1, mixer="s4d").eval()
    prompt = torch.randint(0, VOCAB, (3, 4))
    first = model.generate(prompt, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, model.generate(prompt, 8, temperature=0))
    a = model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (3, 12)


def test_lm_prefill_matches_forward_and_state_bytes():
    model = SeqLM(VOCAB, d_model=32, n_layers=2, mixer=["attention", "s4d"]).eval()
    tokens = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        logits, state = model.prefill(tokens, model.init_state(2))
        assert_close(logits, model(tokens), "lm prefill vs forward")
    assert state.nbytes == model.state_nbytes(2, 21)


def test_per_mixer_settings_in_a_hybrid():
    model = SeqLM(VOCAB, d_model=64, n_layers=2, mixer=["attention", "s4d"],
                  attention={"n_heads": 4, "n_kv_heads": 2}, s4d={"d_state": 8})
    assert model.layers[0].mixer.config.kv_heads == 2
    assert model.layers[1].mixer.config.d_state == 8
    with pytest.raises(ValueError, match="unknown config key 'd_state' for mixer 'attention'"):
        SeqLM(VOCAB, d_model=64, n_layers=2, mixer=["attention", "s4d"], d_state=8)
    with pytest.raises(ValueError, match="n_layers=3"):
        SeqLM(VOCAB, d_model=64, n_layers=3, mixer=["attention", "s4d"])


def test_layer_overrides_set_single_layers():
    """kNN memory on layer 1 only (Memorizing Transformer style); keys may be ints or digit strings."""
    model = SeqLM(VOCAB, d_model=32, n_layers=3, mixer="attention", attention={"n_heads": 2},
                  layer_overrides={1: {"knn_top_k": 4, "knn_chunk": 8}, "2": {"window": 5}})
    configs = [layer.mixer.config for layer in model.layers]
    assert [c.knn_top_k for c in configs] == [None, 4, None]
    assert [c.window for c in configs] == [None, None, 5]
    assert all(c.n_heads == 2 for c in configs)
    for bad, message in (({3: {"window": 5}}, "layer index in 0..2"), ({"x": {}}, "layer index in 0..2"),
                         ({0: 5}, r"layer_overrides\[0\] must be a dict")):
        with pytest.raises(ValueError, match=message):
            SeqLM(VOCAB, d_model=32, n_layers=3, mixer="attention", layer_overrides=bad)
    with pytest.raises(ValueError, match="unknown config key 'd_state' for mixer 'attention'"):
        SeqLM(VOCAB, d_model=32, n_layers=3, mixer="attention", layer_overrides={0: {"d_state": 4}})


def test_sinusoidal_positions_are_added_at_the_embedding_and_carried_by_the_state():
    torch.manual_seed(0)
    model = SeqLM(VOCAB, d_model=32, n_layers=2, mixer="attention", position_embedding="sinusoidal",
                  attention={"positional": "none"}).eval()
    tokens = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        # the definition: PE[t, 2i] = sin(t / 10000^(2i/D)), PE[t, 2i+1] = cos(...), added to the embedding
        t = torch.arange(13, dtype=torch.float64)[:, None]
        angles = t / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(13, 32).float()
        x = model.embedding(tokens) + table
        for layer in model.layers:
            x = layer(x)
        expected = model.head(model.norm(x))
        assert_close(model(tokens), expected, "sinusoidal forward vs definition")
        logits, state = model.prefill(tokens[:, :6], model.init_state(2))
        steps = [logits]
        for index in range(6, 13):
            step_logits, state = model.step(tokens[:, index], state)
            steps.append(step_logits[:, None])
        assert state.position == 13
        assert_close(torch.cat(steps, dim=1), expected, "sinusoidal prefill + steps vs forward")
    plain = SeqLM(VOCAB, d_model=32, n_layers=2, mixer="attention", attention={"positional": "none"}).eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(tokens), expected, atol=1e-3), "the table must change the logits"
    with pytest.raises(ValueError, match="position_embedding='learned'; valid: 'none', 'sinusoidal'"):
        SeqLM(VOCAB, d_model=32, n_layers=1, position_embedding="learned")
    with pytest.raises(ValueError, match="even d_model"):
        SeqLM(VOCAB, d_model=33, n_layers=1, mixer="s4d", position_embedding="sinusoidal")


def test_tied_and_untied_embeddings():
    tied = SeqLM(VOCAB, d_model=32, n_layers=1, mixer="s4d")
    untied = SeqLM(VOCAB, d_model=32, n_layers=1, mixer="s4d", tie_embeddings=False)
    assert tied.head.weight is tied.embedding.weight
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * 32


def test_from_config_roundtrip():
    model = SeqLM(VOCAB, d_model=32, n_layers=2, mixer=["s4d", "attention"], attention={"n_heads": 2},
                  position_embedding="sinusoidal", layer_overrides={1: {"window": 4}})
    clone = SeqLM.from_config(model.init_kwargs)
    assert clone.layers[1].mixer.config.window == 4
    clone.load_state_dict(model.state_dict())
    tokens = torch.randint(0, VOCAB, (1, 10))
    assert torch.equal(clone(tokens), model(tokens))


def test_block_drops_into_another_model():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(build_block("s4d", d_model=16), build_block("attention", d_model=16, mlp=False))
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.blocks(x).mean(1))

    model = Classifier()
    model(torch.randn(4, 10, 16)).sum().backward()
    assert model.blocks[1].mlp is None
    assert all(p.grad is not None for p in model.parameters())


def test_stack_position_is_declared_one_way():
    """A config that takes a stack position declares both fields (the one shape SeqLM fills), not one alone."""
    import dataclasses

    from seqarch.mixers.base import STACK_POSITION_FIELDS
    from seqarch.registry import get_entry, list_mixers

    for name in list_mixers():
        fields = {field.name for field in dataclasses.fields(get_entry(name).config_cls)}
        declared = fields & set(STACK_POSITION_FIELDS)
        assert len(declared) in (0, 2), f"{name} declares {sorted(declared)}, not all of {STACK_POSITION_FIELDS}"


def test_seqlm_tells_each_mixer_its_place_in_the_stack():
    """layer_id / n_layers: block index and model depth over the whole stack, unless the layer's config gives
    them; mixers without the fields get nothing; the filled values are not saved, so a rebuild fills them again."""
    model = SeqLM(VOCAB, d_model=64, n_layers=4, mixer=["rwkv6", "attention", "rwkv7", "rwkv6"],
                  layer_overrides={3: {"layer_id": 1}})
    positions = [(layer.mixer.config.layer_id, layer.mixer.config.n_layers)
                 if hasattr(layer.mixer.config, "layer_id") else None for layer in model.layers]
    assert positions == [(0, 4), None, (2, 4), (1, 4)]
    assert "layer_id" not in model.init_kwargs and "n_layers" not in str(model.init_kwargs.get("layer_overrides"))
    clone = SeqLM.from_config(model.init_kwargs)
    assert [layer.mixer.config for layer in clone.layers] == [layer.mixer.config for layer in model.layers]
