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


def test_tied_and_untied_embeddings():
    tied = SeqLM(VOCAB, d_model=32, n_layers=1, mixer="s4d")
    untied = SeqLM(VOCAB, d_model=32, n_layers=1, mixer="s4d", tie_embeddings=False)
    assert tied.head.weight is tied.embedding.weight
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * 32


def test_from_config_roundtrip():
    model = SeqLM(VOCAB, d_model=32, n_layers=2, mixer=["s4d", "attention"], attention={"n_heads": 2})
    clone = SeqLM.from_config(model.init_kwargs)
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
