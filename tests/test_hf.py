"""Hugging Face checkpoints: tiny random HF models saved with save_pretrained load into an equal SeqLM
(logits and cached greedy decoding), SeqLM.to_hf writes what transformers loads back, and every config
seqarch cannot represent is refused naming the field. No network: the models are built here."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from seqarch import SeqLM, build_mixer
from tests.contract_checks import check_gradients, check_paths_agree, check_prefill_then_continue
from tests.references import require
from tests.tolerance import assert_close

transformers = require("transformers")
require("safetensors")

VOCAB = 101
LOGIT_TOLERANCE = 1e-4  # relative to the largest logit, float32


def realistic(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move norms off 1 and biases (and Mamba's D) off 0 / 1, so a mis-mapped one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") and "dt" not in name:
                parameter.copy_(0.05 * noise)
            elif name.endswith(".D"):
                parameter.copy_(1 + 0.3 * noise)
    return model.eval()


def llama(tmp_path, name="llama", cls="LlamaForCausalLM", save=True, **overrides):
    torch.manual_seed(0)
    fields = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 256, **overrides}
    config_cls = transformers.MistralConfig if cls == "MistralForCausalLM" else transformers.LlamaConfig
    model = realistic(getattr(transformers, cls)(config_cls(**fields)))
    if save:
        model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def mamba(tmp_path, name="mamba", **overrides):
    torch.manual_seed(0)
    fields = {"vocab_size": VOCAB, "hidden_size": 48, "state_size": 8, "num_hidden_layers": 2, "expand": 2,
              "conv_kernel": 4, "time_step_rank": 5, "layer_norm_epsilon": 1e-5, "use_conv_bias": True, **overrides}
    model = realistic(transformers.MambaForCausalLM(transformers.MambaConfig(**fields)))
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def mamba2(tmp_path, name="mamba2", **overrides):
    torch.manual_seed(0)
    fields = {"vocab_size": VOCAB, "hidden_size": 64, "state_size": 16, "num_hidden_layers": 2, "expand": 2,
              "head_dim": 16, "num_heads": 8, "n_groups": 2, "chunk_size": 8, "conv_kernel": 4,
              "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, **overrides}
    model = realistic(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**fields)))
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def tokens(length: int, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def check_logits(hf_model, model: SeqLM, length: int = 37) -> float:
    x = tokens(length)
    with torch.no_grad():
        expected = hf_model(x).logits
        actual = model(x)
    assert_close(actual, expected, "SeqLM logits vs HF", tolerance=LOGIT_TOLERANCE)
    return relative_error(actual, expected)


def check_greedy_decoding(hf_model, model: SeqLM, prompt_length: int = 9, new: int = 12, use_cache: bool = True):
    """SeqLM prefill + step greedy decoding equals HF's generate (its cached path unless use_cache=False),
    tokens and the logits of every generated step."""
    prompt = tokens(prompt_length, seed=5)
    with torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=use_cache, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    ours = model.generate(prompt, new, temperature=0.0)
    assert torch.equal(ours, out.sequences), f"greedy tokens differ:\n{ours}\n{out.sequences}"
    state = model.init_state(prompt.shape[0])
    with torch.no_grad():
        logits, state = model.prefill(prompt, state)
        steps = [logits[:, -1]]
        for index in range(new - 1):
            logit, state = model.step(out.sequences[:, prompt_length + index], state)
            steps.append(logit)
    assert_close(torch.stack(steps, 1), torch.stack(out.logits, 1), "decoding logits vs HF generate",
                 tolerance=LOGIT_TOLERANCE)


LLAMA_VARIANTS = {
    # The list: exact MLP width 172, mlp_bias, head_dim 24 != 64 / 4, llama3 RoPE, GQA, biases.
    "llama3-headdim-biases": {"head_dim": 24, "attention_bias": True, "mlp_bias": True,
                              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0}},
    # YaRN with mscale but no mscale_all_dim (HF ignores mscale), tied embeddings, MQA.
    "yarn-mscale-tied-mqa": {"num_key_value_heads": 1, "tie_word_embeddings": True, "max_position_embeddings": 64,
                             "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 16, "mscale": 0.707}},
    "linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
}


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_loads_with_equal_logits_and_decoding(tmp_path, variant):
    hf_model, path = llama(tmp_path, **LLAMA_VARIANTS[variant])
    model = SeqLM.from_hf(path)
    check_logits(hf_model, model)
    check_greedy_decoding(hf_model, model)
    if variant == "llama3-headdim-biases":
        assert model.layers[0].mlp.hidden == 172 and model.layers[0].mixer.config.head_dim == 24


def test_mistral_sliding_window_loads_and_decodes_past_the_window(tmp_path):
    hf_model, path = llama(tmp_path, "mistral", "MistralForCausalLM", sliding_window=6, head_dim=24)
    model = SeqLM.from_hf(path)
    assert model.layers[0].mixer.config.window == 6
    check_logits(hf_model, model, length=29)
    check_greedy_decoding(hf_model, model, prompt_length=9, new=10)


@pytest.mark.parametrize("tied", [True, False])
def test_mamba_loads_with_equal_logits_and_decoding(tmp_path, tied):
    hf_model, path = mamba(tmp_path, tie_word_embeddings=tied)
    model = SeqLM.from_hf(path)
    check_logits(hf_model, model)
    check_greedy_decoding(hf_model, model)


def test_mamba2_loads_with_equal_logits_and_decoding(tmp_path):
    hf_model, path = mamba2(tmp_path)
    model = SeqLM.from_hf(path)
    check_logits(hf_model, model, length=37)  # several of HF's chunks of 8
    check_greedy_decoding(hf_model, model)


def test_mamba2_time_step_limit_is_applied(tmp_path):
    """A clamp that binds: equal logits. HF's (and mamba-ssm's) single-token update skips the clamp, so its
    cached decoding differs from its own forward; seqarch clamps in every path, so it decodes as HF's
    uncached forward does."""
    hf_model, path = mamba2(tmp_path, time_step_limit=(0.02, 0.05))
    model = SeqLM.from_hf(path)
    assert model.layers[0].mixer.config.time_step_limit == (0.02, 0.05)
    check_logits(hf_model, model)
    free, _ = mamba2(tmp_path, "free")
    x = tokens(37)
    with torch.no_grad():
        assert relative_error(free(x).logits, hf_model(x).logits) > 1e-3, "the clamp should change the model"
    prompt = tokens(9, seed=5)
    with torch.no_grad():
        uncached = hf_model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0,
                                     eos_token_id=None)
    assert torch.equal(model.generate(prompt, 8, temperature=0.0), uncached)


def test_mamba2_time_step_limit_keeps_the_mixer_contract():
    mixer = build_mixer("mamba2", d_model=64, time_step_limit=(0.02, 0.05), chunk_size=8)
    assert mixer.config.limits_dt
    for length in (1, 7, 33):
        check_paths_agree(mixer, length, "mamba2 time_step_limit")
    check_prefill_then_continue(mixer, 13, 9, "mamba2 time_step_limit")
    check_gradients(mixer, "mamba2 time_step_limit")
    sequential = build_mixer("mamba2", d_model=64, time_step_limit=(0.02, 0.05), scan="sequential")
    sequential.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 21, 64)
    assert_close(mixer(x), sequential(x), "chunked vs sequential with time_step_limit")
    with pytest.raises(ValueError, match="time_step_limit"):
        build_mixer("mamba2", d_model=64, time_step_limit=(0.5, 0.1))


def test_sharded_checkpoint_loads(tmp_path):
    hf_model, _ = llama(tmp_path, save=False)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    check_logits(hf_model, SeqLM.from_hf(tmp_path / "sharded"))


ROUND_TRIPS = {
    "llama": lambda tmp: llama(tmp, **LLAMA_VARIANTS["llama3-headdim-biases"]),
    "llama-yarn": lambda tmp: llama(tmp, **LLAMA_VARIANTS["yarn-mscale-tied-mqa"]),
    "mistral": lambda tmp: llama(tmp, "mistral", "MistralForCausalLM", sliding_window=6),
    "mamba": lambda tmp: mamba(tmp),
    "mamba2": lambda tmp: mamba2(tmp, time_step_limit=(0.0, 0.08)),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_to_hf_round_trip(tmp_path, name):
    hf_model, path = ROUND_TRIPS[name](tmp_path)
    model = SeqLM.from_hf(path)
    model.to_hf(tmp_path / "out")
    reloaded = getattr(transformers, hf_model.config.architectures[0]).from_pretrained(tmp_path / "out").eval()
    x = tokens(29)
    with torch.no_grad():
        assert_close(reloaded(x).logits, hf_model(x).logits, f"{name}: HF logits after to_hf", tolerance=1e-6)
    with pytest.raises(ValueError, match="already holds a model"):
        model.to_hf(tmp_path / "out")


def test_native_seqlm_exports_to_hf(tmp_path):
    torch.manual_seed(0)
    model = SeqLM(vocab_size=VOCAB, d_model=64, n_layers=2, mixer="attention", mlp_hidden=100, norm_eps=1e-6,
                  attention={"n_heads": 4, "n_kv_heads": 2, "rope_scaling": "yarn", "rope_factor": 4.0,
                             "max_position": 16, "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.5})
    realistic(model)
    model.to_hf(tmp_path / "native")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    x = tokens(40)
    with torch.no_grad():
        assert_close(model(x), reloaded(x).logits, "native SeqLM vs its HF export", tolerance=LOGIT_TOLERANCE)


def edit_config(path, **changes):
    file = path / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "field"), [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_local_experts": 4}, "num_local_experts"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "truncate": False}}, "truncate"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 4}}, "beta_fast"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "architectures"),
])
def test_unrepresentable_llama_configs_are_refused_naming_the_field(tmp_path, changes, field):
    _, path = llama(tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=field):
        SeqLM.from_hf(path)


@pytest.mark.parametrize(("changes", "field"), [
    ({"expand": 1.5}, "expand"), ({"num_heads": 4}, "num_heads"), ({"rms_norm": False}, "rms_norm"),
    ({"hidden_act": "relu"}, "hidden_act")])
def test_unrepresentable_mamba2_configs_are_refused_naming_the_field(tmp_path, changes, field):
    _, path = mamba2(tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=field):
        SeqLM.from_hf(path)


def test_sliding_window_in_a_llama_config_is_ignored_as_hf_does(tmp_path):
    hf_model, path = llama(tmp_path)
    edit_config(path, sliding_window=4)
    model = SeqLM.from_hf(path)
    assert model.layers[0].mixer.config.window is None
    check_logits(hf_model, model)


def test_unknown_tensors_and_pickles_are_refused(tmp_path):
    _, path = llama(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="q_norm"):
        SeqLM.from_hf(path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        SeqLM.from_hf(pickled)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mixer": "rwkv6"}, "no Hugging Face architecture"),
    ({"mixer": ["attention", "mamba"]}, "hybrid"),
    ({"mixer": "attention", "attention": {"positional": "alibi"}}, "positional"),
    ({"mixer": "attention", "attention": {"rope_scaling": "dynamic", "rope_factor": 2.0}}, "rope_scaling"),
    ({"mixer": "attention", "position_embedding": "sinusoidal"}, "sinusoidal"),
    ({"mixer": "mamba", "mlp": True}, "SwiGLU"),
    ({"mixer": "attention", "attention": {"window": 8, "bias": True}}, "biases"),
])
def test_to_hf_refuses_what_has_no_hf_architecture(tmp_path, kwargs, message):
    model = SeqLM(vocab_size=VOCAB, d_model=64, n_layers=2, **kwargs)
    with pytest.raises(ValueError, match=message):
        model.to_hf(tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_yarn_attention_factor_matches_hf_attention(tmp_path):
    """An explicit attention_factor reaches the logits as HF applies it (on cos and sin)."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "attention_factor": 1.7}
    hf_model, path = llama(tmp_path, rope_parameters=rope)
    model = SeqLM.from_hf(path)
    assert math.isclose(model.layers[0].mixer.attention_scale, 1.7)
    check_logits(hf_model, model)


def test_mamba_ssm_config_keys_that_hf_never_reads_are_ignored(tmp_path):
    """Exported Mamba configs (e.g. state-spaces/mamba-130m-hf) carry mamba-ssm's own keys; HF ignores them."""
    hf_model, path = mamba(tmp_path, tie_word_embeddings=False)
    edit_config(path, fused_add_norm=True, n_layer=2, d_model=48, ssm_cfg={}, pad_vocab_size_multiple=8,
                rms_norm=True)
    check_logits(hf_model, SeqLM.from_hf(path))


def test_mamba2_norm_epsilon_reaches_the_gated_norm_and_the_block_norms(tmp_path):
    """HF's Mamba-2 reads layer_norm_epsilon in every RMSNorm: the block norms, norm_f and the mixer's gated
    norm. At 1e-6 each of the two kinds moves the logits by more than the tolerance (measured 1.0e-3 for the
    gated norm, 3.6e-4 for the block norms), so a loader that set only one of them fails here."""
    hf_model, path = mamba2(tmp_path, layer_norm_epsilon=1e-6)
    model = SeqLM.from_hf(path)
    assert {layer.mixer.norm.eps for layer in model.layers} == {1e-6}
    assert {model.norm.eps, *(layer.norm_mixer.eps for layer in model.layers)} == {1e-6}
    check_logits(hf_model, model)
    check_greedy_decoding(hf_model, model)
    x = tokens(37)
    for norms in ("gated", "block"):
        wrong = SeqLM.from_hf(path)
        for layer in wrong.layers:
            if norms == "gated":
                layer.mixer.norm.eps = 1e-5
            else:
                layer.norm_mixer.eps = 1e-5
        with torch.no_grad():
            assert relative_error(wrong(x), hf_model(x).logits) > 2 * LOGIT_TOLERANCE, f"{norms} eps has no effect"
    model.to_hf(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_norm_epsilon"] == 1e-6
    reloaded = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert_close(reloaded(x).logits, hf_model(x).logits, "mamba2 eps 1e-6 after to_hf", tolerance=1e-6)


# --- the command line: ckpt=hf:<dir> ---------------------------------------------------------------
def byte_llama(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-5)
    model = realistic(transformers.LlamaForCausalLM(config))
    model.save_pretrained(tmp_path / "byte")
    return model, tmp_path / "byte"


class _Logits(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, x):
        return self.hf_model(x).logits


@pytest.mark.slow  # reads the stdlib validation text
def test_eval_ppl_reads_an_hf_directory(tmp_path):
    from seqarch.evals.command import eval_command, validation_stream
    from seqarch.evals.perplexity import perplexity_vs_length
    from seqarch.models.hf import read_hf_checkpoint

    hf_model, path = byte_llama(tmp_path)
    folder, meta, rows = eval_command([f"ckpt=hf:{path}", "task=ppl", "lengths=[16,32,48]", "windows=2",
                                       f"out={tmp_path / 'ppl'}"])
    assert meta["trained_length"] == 32 and (folder / "results.md").is_file()
    config = read_hf_checkpoint(f"hf:{path}")[1]["hyper_parameters"]["config"]
    stream, _ = validation_stream(config)
    expected = perplexity_vs_length(_Logits(hf_model).eval(), stream, [16, 32, 48], 2)
    for row, reference in zip(rows, expected, strict=True):
        assert math.isclose(row["nll"], reference["nll"], rel_tol=1e-5), (row, reference)


def python_tokenizer():
    """A small BPE tokenizer (transformers' fast wrapper) trained offline on a few lines of Python, so the
    stdlib validation text tokenizes into varied ids below VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = ["def f(self, x):\n    return x + 1\n", "import os\nclass A(object):\n    pass\n",
             "for i in range(10):\n    print(i, 'value')\n", "if not name: raise ValueError(name)\n"]
    bpe.train_from_iterator(lines * 4, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    return bpe, transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", model_max_length=64)


@pytest.mark.slow  # reads the stdlib validation text
def test_eval_ppl_scores_an_hf_directory_with_its_tokenizer(tmp_path, capsys):
    """ckpt=hf:<dir> with a tokenizer: the byte validation text tokenized by it (no special tokens), equal to
    HF's model scored on the same text tokenized by the `tokenizers` object itself; a tokenizer with ids
    outside the model's vocabulary is refused naming both sizes, and no results folder is written."""
    from seqarch.evals.command import eval_command, validation_stream
    from seqarch.evals.perplexity import perplexity_vs_length
    from seqarch.models.hf import read_hf_checkpoint
    from seqarch.train.config import ConfigError

    bpe, tokenizer = python_tokenizer()
    hf_model, path = llama(tmp_path, "words")
    tokenizer.save_pretrained(path)
    folder, meta, rows = eval_command([f"ckpt=hf:{path}", "task=ppl", "lengths=[16,64,300]", "windows=3",
                                       f"out={tmp_path / 'ppl'}"])
    assert meta["trained_length"] == 256 and meta["settings"]["text"].endswith("tokenized")
    assert "longer than the specified maximum" not in capsys.readouterr().err
    config = read_hf_checkpoint(f"hf:{path}")[1]["hyper_parameters"]["config"]
    stream, _ = validation_stream(config)
    ids = torch.tensor(bpe.encode(bytes(stream.tolist()).decode("utf-8", errors="replace")).ids)
    assert len(set(ids[:5000].tolist())) > 20, "the tokenizer should give varied ids on Python text"
    expected = perplexity_vs_length(_Logits(hf_model).eval(), ids, [16, 64, 300], 3)
    for row, reference in zip(rows, expected, strict=True):
        assert math.isclose(row["nll"], reference["nll"], rel_tol=1e-5), (row, reference)

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    wide = Tokenizer(models.BPE())  # byte-level: its 256-symbol alphabet alone exceeds the model's 101 ids
    wide.pre_tokenizer = pre_tokenizers.ByteLevel()
    wide.train_from_iterator(["def f(x):\n"], trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    _, other = llama(tmp_path, "other")
    transformers.PreTrainedTokenizerFast(tokenizer_object=wide).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"tokenizer \(\d+ tokens\) produces id \d+, outside the model's "
                                          r"vocabulary of 101"):
        eval_command([f"ckpt=hf:{other}", "task=ppl", "lengths=[16]", "windows=1", f"out={tmp_path / 'no'}"])
    assert not (tmp_path / "no").exists()


def digit_guesser(model):
    """Zero the rows of an untied byte-level head outside '0'..'9': every argmax is then a digit chosen by the
    hidden state, so passkey digit accuracy is near chance (0.1) instead of 0 and compares two models."""
    with torch.no_grad():
        keep = torch.zeros(256, dtype=torch.bool)
        keep[list(b"0123456789")] = True
        model.lm_head.weight[~keep] = 0
    return model


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_eval_passkey_reads_a_byte_level_hf_directory(tmp_path, family):
    from seqarch.evals.command import eval_command
    from seqarch.evals.passkey import passkey_accuracy
    from seqarch.train.config import ConfigError

    if family == "llama":
        hf_model, path = byte_llama(tmp_path)
        args = ["rope_scaling=linear"]  # the trained length 32 scaled to the longest length, 128: factor 4
    else:
        hf_model, path = mamba(tmp_path, vocab_size=256, tie_word_embeddings=False)
        args = ["rope_scaling=linear"]  # ignored, with a note: Mamba has no RoPE
    digit_guesser(hf_model).save_pretrained(path)
    folder, meta, rows = eval_command([f"ckpt=hf:{path}", "task=passkey", "num_digits=3", "lengths=[80,128]",
                                       "depths=[0,0.5,1]", "trials=8", f"out={tmp_path / 'pk'}", *args])
    assert (folder / "results.md").is_file() and [row["length"] for row in rows] == [80, 80, 80, 128, 128, 128]
    if family == "llama":
        assert meta["settings"]["rope_factor"] == 4.0 and meta["settings"]["max_position"] == 32
        rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": hf_model.config.rope_parameters["rope_theta"]}
        scaled = type(hf_model).from_pretrained(path, rope_parameters=rope).eval()
    else:
        assert any("ignored" in note for note in meta["notes"])
        scaled = hf_model
    expected = passkey_accuracy(_Logits(scaled).eval(), [80, 128], [0.0, 0.5, 1.0], 8, 3, 0, 4)
    assert rows == expected
    assert any(row["digit_accuracy"] > 0 for row in rows), "the digit-guessing head should hit some digits"

    _, words = llama(tmp_path, "words")
    python_tokenizer()[1].save_pretrained(words)
    with pytest.raises(ConfigError, match="byte-level model.*use task=ppl"):
        eval_command([f"ckpt=hf:{words}", "task=passkey", "lengths=[128]", f"out={tmp_path / 'no'}"])


def test_generate_reads_an_hf_directory_bytes_or_its_tokenizer(tmp_path, capsys):
    from seqarch.train.fit import generate

    hf_model, path = byte_llama(tmp_path)
    text = generate([f"ckpt=hf:{path}", "prompt=def f", "max_new_tokens=6", "temperature=0"])
    prompt = torch.tensor([list(b"def f")])
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert text == "def f" + bytes(expected[0, 5:].tolist()).decode("utf-8", errors="replace")

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["the cat sat on the mat and a dog ran to the cat"] * 4,
                              trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    hf_words, words_path = llama(tmp_path, "words")
    tokenizer.save_pretrained(words_path)
    text = generate([f"ckpt=hf:{words_path}", "prompt=the cat", "max_new_tokens=5", "temperature=0"])
    ids = torch.tensor([tokenizer("the cat")["input_ids"]])
    with torch.no_grad():
        expected = hf_words.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert text == "the cat" + tokenizer.decode(expected[0, ids.shape[1]:].tolist())


def test_cli_refusals_for_hf_directories(tmp_path):
    from seqarch.overrides import ConfigError
    from seqarch.train.fit import resolve_fit_config

    _, path = byte_llama(tmp_path)
    with pytest.raises(ConfigError, match="recipe=extend"):
        resolve_fit_config([f"ckpt=hf:{path}"])
    _, words = llama(tmp_path, "words")
    with pytest.raises(ConfigError, match="another vocabulary"):
        resolve_fit_config(["recipe=extend", f"ckpt=hf:{words}"])
    edit_config(path, hidden_act="gelu")
    with pytest.raises(ConfigError, match="hidden_act"):
        resolve_fit_config(["recipe=extend", f"ckpt=hf:{path}"])
    with pytest.raises(ConfigError, match="config.json"):
        resolve_fit_config(["recipe=extend", f"ckpt=hf:{tmp_path / 'missing'}"])


@pytest.mark.slow
def test_fit_extend_starts_from_the_hf_weights(tmp_path):
    from seqarch.train.fit import fit, resolve_fit_config

    hf_model, path = byte_llama(tmp_path)
    args = ["recipe=extend", f"ckpt=hf:{path}", "data.seq_len=64", "model.attention.rope_scaling=linear",
            "trainer.max_steps=2", "trainer.val_every=2", "trainer.val_batches=1", "data.batch_size=2",
            "trainer.progress=false", f"run_dir={tmp_path / 'run'}"]
    config, _ = resolve_fit_config(args)
    attention = config.model["attention"]
    assert (attention["rope_scaling"], attention["rope_factor"], attention["max_position"]) == ("linear", 2.0, 32)
    assert config.init_from == str(path / "config.json")
    summary = fit(args)
    assert summary["steps"] == 2 and (tmp_path / "run" / "summary.json").is_file()
