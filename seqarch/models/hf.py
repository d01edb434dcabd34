"""Hugging Face checkpoints: load a `save_pretrained` directory into an equal SeqLM, and write one back.

    model = SeqLM.from_hf("path/to/dir")          # LlamaForCausalLM, MistralForCausalLM, MambaForCausalLM,
    model.to_hf("path/to/out")                    # Mamba2ForCausalLM; config.json + safetensors

A directory holds `config.json` and the weights as `model.safetensors` or shards listed in
`model.safetensors.index.json`. Weights are read with safetensors only (never pickle: `*.bin`
directories are refused). Every config field that changes what the model computes is either mapped
to a SeqLM field or refused with one ValueError naming it; fields that only steer HF's
initialisation, kernels or generation defaults are ignored. docs/checkpoints.md lists both.

Key mapping (i = layer index):

    Llama / Mistral                                     SeqLM
    model.embed_tokens.weight                           embedding.weight
    model.layers.i.input_layernorm.weight               layers.i.norm_mixer.weight
    model.layers.i.self_attn.q_proj.{weight,bias}       layers.i.mixer.q_proj.*
    model.layers.i.self_attn.{k_proj,v_proj}.*          layers.i.mixer.kv_proj.*   (rows [k; v])
    model.layers.i.self_attn.o_proj.*                   layers.i.mixer.out_proj.*
    model.layers.i.post_attention_layernorm.weight      layers.i.norm_mlp.weight
    model.layers.i.mlp.{gate_proj,up_proj}.*            layers.i.mlp.gate_up.*     (rows [gate; up])
    model.layers.i.mlp.down_proj.*                      layers.i.mlp.down.*
    model.norm.weight                                   norm.weight
    lm_head.weight                                      head.weight (absent when tie_word_embeddings)

    Mamba / Mamba-2
    backbone.embeddings.weight                          embedding.weight
    backbone.layers.i.norm.weight                       layers.i.norm_mixer.weight
    backbone.layers.i.mixer.<name>                      layers.i.mixer.<name>  (same names as mamba-ssm)
    backbone.norm_f.weight                              norm.weight
    lm_head.weight                                      head.weight (absent when tie_word_embeddings)

`read_hf_checkpoint` is the command line's entry point (`ckpt=hf:<dir>`): it returns the directory
in the shape of a seqarch checkpoint (run config, model kwargs, state dict) so `seqarch eval`,
`generate` and `fit recipe=extend` take it where they take a run folder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM")
_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MambaForCausalLM": "mamba",
           "Mamba2ForCausalLM": "mamba2"}
_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "mamba": "mamba", "mamba2": "mamba2"}

# Fields with no effect on the computed function: bookkeeping, token ids, generation defaults, HF's
# initialisation and kernel choices. Every other field must be understood below or is refused.
_IGNORED = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "return_dict",
    "output_attentions", "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "pretraining_tp", "attn_implementation",
    # Mamba / Mamba-2: initialisation, kernels, and the residual's dtype (we compute in one dtype)
    "time_step_min", "time_step_max", "time_step_floor", "time_step_scale", "time_step_init_scheme",
    "rescale_prenorm_residual", "residual_in_fp32", "use_mambapy", "use_associative_scan", "chunk_size",
    # mamba-ssm's own config keys that exported Mamba configs carry and HF's classes never read
    "fused_add_norm", "n_layer", "d_model", "ssm_cfg", "pad_vocab_size_multiple",
    # HF's Mamba2Mixer gates before its norm whatever this says (mamba-ssm's default too)
    "norm_before_gate",
}
_LLAMA_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
                 "attention_dropout", "mlp_bias", "sliding_window"}
_MAMBA_FIELDS = {"vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand",
                 "conv_kernel", "use_bias", "use_conv_bias", "hidden_act", "time_step_rank", "intermediate_size",
                 "tie_word_embeddings", "rms_norm"}
_MAMBA2_FIELDS = {"vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand",
                  "conv_kernel", "use_bias", "use_conv_bias", "hidden_act", "n_groups", "num_heads", "head_dim",
                  "time_step_limit", "time_step_rank", "tie_word_embeddings", "norm_before_gate", "rms_norm"}
_ROPE_FIELDS = {
    None: set(),
    "linear": {"factor"},
    "dynamic": {"factor"},  # HF's base per forward call: dynamic_ntk_mode="per_call", from max_position_embeddings
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
DEFAULT_TRAINED_LENGTH = 2048  # trained length assumed for Mamba / Mamba-2, whose configs do not state one


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"HF config field {field!r} = {value!r}: {why}")


# --- reading a directory ---------------------------------------------------------------------------
def read_hf_config(path: str | Path) -> dict:
    """config.json of a save_pretrained directory (ValueError when there is none)."""
    directory = Path(path).expanduser()
    file = directory / "config.json"
    if not file.is_file():
        raise ValueError(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
    return json.loads(file.read_text())


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained directory, from model.safetensors or the shards its index lists."""
    from safetensors.torch import load_file

    directory = Path(path).expanduser()
    if (directory / _INDEX).is_file():
        index = json.loads((directory / _INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
    elif (directory / _WEIGHTS).is_file():
        shards = [_WEIGHTS]
    else:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded; re-save with safe_serialization)" \
            if pickled else ""
        raise ValueError(f"{str(directory)!r} has no {_WEIGHTS} or {_INDEX}{hint}")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(directory / shard)))
    return weights


# --- config.json -> SeqLM keyword arguments ------------------------------------------------------------
def _architecture(config: dict) -> str:
    names = config.get("architectures") or []
    known = [name for name in names if name in ARCHITECTURES]
    if not known:
        model_type = config.get("model_type")
        by_type = {v: k for k, v in _FAMILY.items()}
        if model_type in by_type and not names:
            return _FAMILY[by_type[model_type]]
        raise _refuse("architectures", names or model_type, f"seqarch loads {', '.join(ARCHITECTURES)}")
    return _FAMILY[known[0]]


def _check_fields(config: dict, allowed: set[str]) -> None:
    for key in sorted(config):
        if key not in allowed and key not in _IGNORED:
            raise _refuse(key, config[key], "seqarch does not know this field, so it cannot guarantee an equal "
                                            "model (MoE, QK-norm, soft-capping, partial rotary... are not supported)")


def _rope(config: dict) -> tuple[float, dict[str, Any]]:
    """(rope_theta, the attention config's RoPE-scaling keys) of a Llama / Mistral config."""
    params = config.get("rope_parameters")
    if params is None:  # the transformers 4.x layout: rope_theta beside rope_scaling
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        field = "rope_scaling"
    else:
        params = dict(params)
        field = "rope_parameters"
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None)
    params.pop("type", None)
    kind = None if kind == "default" else kind
    if kind not in _ROPE_FIELDS:
        raise _refuse(f"{field}.rope_type", kind, "seqarch represents default, linear, dynamic, yarn and llama3")
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse("partial_rotary_factor", config.get("partial_rotary_factor"), "seqarch rotates whole heads")
    for key in sorted(params):
        if key not in _ROPE_FIELDS[kind]:
            raise _refuse(f"{field}.{key}", params[key], f"not a field seqarch maps for RoPE type {kind or 'default'}")
    max_position = int(config.get("max_position_embeddings", 2048))
    if kind is None:
        return theta, {"max_position": max_position}
    original = int(params.get("original_max_position_embeddings") or max_position)
    factor = params.get("factor")
    if factor is None and kind == "yarn":
        factor = max_position / original  # as HF: the ratio of the two lengths
    if factor is None:
        raise _refuse(f"{field}.factor", None, f"RoPE type {kind} needs a factor")
    keys: dict[str, Any] = {"rope_scaling": kind, "rope_factor": float(factor), "max_position": original}
    if kind in ("linear", "dynamic"):
        keys["max_position"] = max_position
    if kind == "dynamic":
        keys["dynamic_ntk_mode"] = "per_call"
    if kind == "yarn":
        if params.get("truncate", True) is not True:
            raise _refuse(f"{field}.truncate", params["truncate"], "seqarch's YaRN ramp always truncates the "
                          "correction range to whole dimensions")
        keys.update(yarn_beta_fast=float(params.get("beta_fast") or 32.0),
                    yarn_beta_slow=float(params.get("beta_slow") or 1.0))
        if params.get("mscale") and params.get("mscale_all_dim"):
            keys.update(yarn_mscale=float(params["mscale"]), yarn_mscale_all_dim=float(params["mscale_all_dim"]))
        if params.get("attention_factor") is not None:
            keys["yarn_attention_factor"] = float(params["attention_factor"])
    if kind == "llama3":
        if "original_max_position_embeddings" not in params:
            raise _refuse(f"{field}.original_max_position_embeddings", None, "llama3 RoPE needs it")
        keys.update(llama3_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                    llama3_high_freq_factor=float(params.get("high_freq_factor", 4.0)))
    return theta, keys


def _json_float(value: Any) -> float:
    """A number as config.json may spell it: plain, "Infinity", or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _silu(config: dict) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", config["hidden_act"], "seqarch's SwiGLU and Mamba use silu only")


def _llama_kwargs(config: dict, family: str) -> dict[str, Any]:
    _check_fields(config, _LLAMA_FIELDS)
    _silu(config)
    if float(config.get("attention_dropout", 0.0)) != 0.0:
        raise _refuse("attention_dropout", config["attention_dropout"], "seqarch's attention has no dropout")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    theta, rope = _rope(config)
    attention = {"n_heads": heads, "n_kv_heads": int(config.get("num_key_value_heads") or heads),
                 "head_dim": int(config.get("head_dim") or hidden // heads), "bias": bool(config.get("attention_bias",
                 False)), "positional": "rope", "rope_base": theta, **rope}
    if family == "mistral" and config.get("sliding_window") is not None:  # LlamaModel never reads the field
        attention["window"] = int(config["sliding_window"])
    kwargs = {"vocab_size": int(config["vocab_size"]), "d_model": hidden, "n_layers": int(config["num_hidden_layers"]),
              "mixer": "attention", "mlp": True, "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
              "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "mlp_hidden": int(config["intermediate_size"]),
              "attention": attention}
    if config.get("mlp_bias"):
        kwargs["mlp_bias"] = True
    return kwargs


def _inner_width(config: dict) -> int:
    hidden, expand = int(config["hidden_size"]), config.get("expand", 2)
    inner = expand * hidden
    if float(expand) != int(expand):
        raise _refuse("expand", expand, "seqarch's inner width is an integer multiple of hidden_size")
    if config.get("intermediate_size") is not None and int(config["intermediate_size"]) != inner:
        raise _refuse("intermediate_size", config["intermediate_size"], f"must equal expand * hidden_size = {inner}")
    return int(inner)


def _mamba_kwargs(config: dict, family: str) -> dict[str, Any]:
    _check_fields(config, _MAMBA_FIELDS if family == "mamba" else _MAMBA2_FIELDS)
    _silu(config)
    inner = _inner_width(config)
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    if config.get("rms_norm", True) is not True:
        raise _refuse("rms_norm", config["rms_norm"], "seqarch's Mamba blocks use RMSNorm")
    mixer = {"d_state": int(config.get("state_size", 16)), "d_conv": int(config.get("conv_kernel", 4)),
             "expand": int(config.get("expand", 2)), "bias": bool(config.get("use_bias", False)),
             "conv_bias": bool(config.get("use_conv_bias", True))}
    if family == "mamba":
        rank = config.get("time_step_rank", "auto")
        mixer["dt_rank"] = math.ceil(int(config["hidden_size"]) / 16) if rank == "auto" else int(rank)
    else:
        head_dim = int(config.get("head_dim", 64))
        if int(config.get("num_heads", inner // head_dim)) * head_dim != inner:
            raise _refuse("num_heads", config.get("num_heads"), f"num_heads * head_dim must equal the inner width "
                                                                 f"{inner}")
        mixer.update({"head_dim": head_dim, "ngroups": int(config.get("n_groups", 1))})
        mixer["norm_eps"] = eps  # HF's gated RMSNorm reads layer_norm_epsilon, as the block norms and norm_f do
        limit = [_json_float(x) for x in config.get("time_step_limit", (0.0, math.inf))]
        if limit != [0.0, math.inf]:
            mixer["time_step_limit"] = limit
    return {"vocab_size": int(config["vocab_size"]), "d_model": int(config["hidden_size"]),
            "n_layers": int(config["num_hidden_layers"]), "mixer": family, "mlp": False,
            # a config without the field gets its class's default, as in transformers
            "tie_embeddings": bool(config.get("tie_word_embeddings", family == "mamba")), "norm_eps": eps,
            family: mixer}


def hf_config_to_kwargs(config: dict) -> dict[str, Any]:
    """SeqLM keyword arguments equal to an HF config (ValueError naming a field seqarch cannot represent)."""
    family = _architecture(config)
    return _llama_kwargs(config, family) if family in ("llama", "mistral") else _mamba_kwargs(config, family)


# --- weights -----------------------------------------------------------------------------------------
_LLAMA_LAYER = {
    "norm_mixer.weight": ["input_layernorm.weight"],
    "norm_mlp.weight": ["post_attention_layernorm.weight"],
    "mixer.q_proj": ["self_attn.q_proj"],
    "mixer.kv_proj": ["self_attn.k_proj", "self_attn.v_proj"],
    "mixer.out_proj": ["self_attn.o_proj"],
    "mlp.gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down": ["mlp.down_proj"],
}


def hf_names(family: str, key: str) -> list[str]:
    """The HF tensor names whose rows, concatenated, make SeqLM tensor `key`."""
    llama = family in ("llama", "mistral")
    top = {"embedding.weight": "model.embed_tokens.weight" if llama else "backbone.embeddings.weight",
           "norm.weight": "model.norm.weight" if llama else "backbone.norm_f.weight", "head.weight": "lm_head.weight"}
    if key in top:
        return [top[key]]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if match is None:
        raise ValueError(f"no HF name for SeqLM tensor {key!r}")
    index, rest = match.groups()
    if not llama:
        return [f"backbone.layers.{index}.{'norm.weight' if rest == 'norm_mixer.weight' else rest}"]
    module, _, leaf = rest.rpartition(".")
    if rest in _LLAMA_LAYER:
        return [f"model.layers.{index}.{name}" for name in _LLAMA_LAYER[rest]]
    if module in _LLAMA_LAYER:
        return [f"model.layers.{index}.{name}.{leaf}" for name in _LLAMA_LAYER[module]]
    raise ValueError(f"no HF name for SeqLM tensor {key!r}")


def _seqlm_keys(model) -> list[str]:
    """State-dict keys of `model`, a tied head left out (it is the embedding)."""
    keys = list(model.state_dict())
    return [k for k in keys if not (k == "head.weight" and model.head.weight is model.embedding.weight)]


def from_hf(path: str | Path, dtype: torch.dtype = torch.float32, device=None):
    """A SeqLM equal to the HF model saved in directory `path` (eval mode); see the module docstring."""
    from seqarch.models.lm import SeqLM

    config = read_hf_config(path)
    family = _architecture(config)
    kwargs = hf_config_to_kwargs(config)
    weights = read_hf_weights(path)
    if family in ("mamba", "mamba2") and "backbone.embedding.weight" in weights:  # old exports (HF's load hook)
        weights["backbone.embeddings.weight"] = weights.pop("backbone.embedding.weight")
    model = SeqLM(**kwargs, device=device, dtype=dtype)
    state, used = {}, set()
    for key in _seqlm_keys(model):
        names = hf_names(family, key)
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"{str(path)!r}: tensor {missing[0]!r} is missing (needed for {key!r})")
        state[key] = torch.cat([weights[name] for name in names], dim=0) if len(names) > 1 else weights[names[0]]
        used.update(names)
    if model.head.weight is model.embedding.weight:
        state["head.weight"] = state["embedding.weight"]
        used.add("lm_head.weight")  # tie_word_embeddings: HF ties it to the embedding whatever the file holds
    extra = sorted(set(weights) - used)
    if extra:
        raise ValueError(f"{str(path)!r}: tensor {extra[0]!r} has no place in the SeqLM this config describes "
                         f"({len(extra)} unused tensors)")
    own = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(f"{str(path)!r}: {key!r} has shape {tuple(tensor.shape)} in the file, "
                             f"{tuple(own[key].shape)} in the config")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


# --- SeqLM -> HF ------------------------------------------------------------------------------------
def _uniform_config(model) -> Any:
    configs = {layer.mixer.config for layer in model.layers}
    if len(configs) != 1:
        raise ValueError("to_hf: HF models use one mixer config for every layer; this SeqLM's layers differ")
    return configs.pop()


def _check_blocks(model, family: str) -> None:
    kwargs = model.init_kwargs
    if len(set(model.layer_names)) != 1:
        raise ValueError(f"to_hf: a hybrid of {sorted(set(model.layer_names))} has no HF architecture")
    if kwargs.get("position_embedding", "none") != "none":
        raise ValueError("to_hf: position_embedding='sinusoidal' has no place in Llama / Mistral / Mamba")
    wants_mlp = family == "attention"
    if any((layer.mlp is not None) != wants_mlp or layer.stateful_mlp for layer in model.layers):
        raise ValueError(f"to_hf: {family} layers {'need' if wants_mlp else 'must not have'} the SwiGLU MLP "
                         f"(mlp={not wants_mlp} has no HF architecture)")
    eps = {model.norm.eps, *(layer.norm_mixer.eps for layer in model.layers)}
    eps |= {layer.norm_mlp.eps for layer in model.layers if layer.norm_mlp is not None}
    if len(eps) != 1:
        raise ValueError(f"to_hf: HF models use one RMSNorm epsilon, this SeqLM has {sorted(eps)}")


def _attention_config(model) -> tuple[str, dict]:
    cfg = _uniform_config(model)
    refuse = {"positional": cfg.positional != "rope", "rerope": cfg.positional == "rerope",
              "sinks": bool(cfg.sinks), "knn_top_k": cfg.knn_top_k is not None,
              "rope_scaling": cfg.rope_scaling in ("ntk", "dynamic")}
    for field, bad in refuse.items():
        if bad:
            raise ValueError(f"to_hf: attention {field}={getattr(cfg, field, cfg.positional)!r} has no equivalent "
                             "in LlamaForCausalLM / MistralForCausalLM")
    family = "mistral" if cfg.window is not None else "llama"
    mlp = model.layers[0].mlp
    if family == "mistral" and (cfg.bias or mlp.down.bias is not None):
        raise ValueError("to_hf: MistralForCausalLM (a sliding window) has no attention or MLP biases")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling is not None:
        rope.update(rope_type=cfg.rope_scaling, factor=cfg.rope_factor)
    if cfg.rope_scaling in ("yarn", "llama3"):
        rope["original_max_position_embeddings"] = cfg.max_position
    if cfg.rope_scaling == "yarn":
        rope.update(beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        if cfg.yarn_mscale_all_dim:
            rope.update(mscale=cfg.yarn_mscale, mscale_all_dim=cfg.yarn_mscale_all_dim)
        if cfg.yarn_attention_factor is not None:
            rope["attention_factor"] = cfg.yarn_attention_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.llama3_low_freq_factor, high_freq_factor=cfg.llama3_high_freq_factor)
    max_position = cfg.max_position
    if cfg.rope_scaling in ("yarn", "llama3"):
        max_position = int(round(cfg.max_position * cfg.rope_factor))
    config = {"hidden_size": model.embedding.embedding_dim, "intermediate_size": mlp.hidden,
              "num_hidden_layers": len(model.layers),
              "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
              "hidden_act": "silu", "max_position_embeddings": max_position,
              "rms_norm_eps": model.norm.eps, "rope_theta": cfg.rope_base, "attention_dropout": 0.0,
              # the transformers 4.x layout, which 5.x reads too
              "rope_scaling": None if cfg.rope_scaling is None else
              {key: value for key, value in rope.items() if key != "rope_theta"}}
    if family == "llama":
        config.update(attention_bias=cfg.bias, mlp_bias=mlp.down.bias is not None)
    else:
        config["sliding_window"] = cfg.window
    return family, config


def _mamba_config(model, family: str) -> dict:
    cfg = _uniform_config(model)
    config = {"hidden_size": model.embedding.embedding_dim, "state_size": cfg.d_state,
              "num_hidden_layers": len(model.layers),
              "layer_norm_epsilon": model.norm.eps, "expand": cfg.expand, "conv_kernel": cfg.d_conv,
              "use_bias": cfg.bias, "use_conv_bias": cfg.conv_bias, "hidden_act": "silu",
              "intermediate_size": cfg.d_inner, "residual_in_fp32": True}
    if family == "mamba":
        config["time_step_rank"] = cfg.rank
        return config
    if cfg.norm_eps != model.norm.eps:
        raise ValueError(f"to_hf: Mamba2 uses layer_norm_epsilon for the gated norm too; mixer norm_eps="
                         f"{cfg.norm_eps} differs from the block norms' {model.norm.eps}")
    config.update(head_dim=cfg.head_dim, num_heads=cfg.n_heads, n_groups=cfg.ngroups, chunk_size=256,
                  time_step_limit=list(cfg.time_step_limit),
                  time_step_rank=math.ceil(model.embedding.embedding_dim / 16))
    return config


def to_hf(model, path: str | Path) -> Path:
    """Write `model` as a save_pretrained directory (config.json + model.safetensors) that transformers loads
    as LlamaForCausalLM, MistralForCausalLM, MambaForCausalLM or Mamba2ForCausalLM; ValueError naming what has
    no HF equivalent otherwise. The directory must not hold a model already."""
    from safetensors.torch import save_file

    name = model.layer_names[0]
    if name not in ("attention", "mamba", "mamba2"):
        raise ValueError(f"to_hf: mixer {name!r} has no Hugging Face architecture (attention, mamba, mamba2 do)")
    _check_blocks(model, name)
    if name == "attention":
        family, config = _attention_config(model)
    else:
        family, config = name, _mamba_config(model, name)
    tied = model.head.weight is model.embedding.weight
    architecture = {v: k for k, v in _FAMILY.items()}[family]
    config = {"architectures": [architecture], "model_type": _MODEL_TYPE[family], "vocab_size": model.vocab_size,
              **config, "tie_word_embeddings": tied, "dtype": str(model.embedding.weight.dtype).removeprefix("torch.")}
    directory = Path(path).expanduser()
    if (directory / "config.json").exists():
        raise ValueError(f"to_hf: {str(directory)!r} already holds a model; choose a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    own = model.state_dict()
    tensors = {}
    for key in _seqlm_keys(model):
        names = hf_names(family, key)
        if len(names) == 1:
            tensors[names[0]] = own[key].detach().contiguous()
            continue
        for hf_name, part in zip(names, own[key].detach().chunk(len(names), dim=0), strict=True):
            tensors[hf_name] = part.contiguous()
    save_file(tensors, str(directory / _WEIGHTS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


# --- the command line: ckpt=hf:<dir> -----------------------------------------------------------------
HF_PREFIX = "hf:"


def trained_length(kwargs: dict) -> int:
    """The context length a converted model was trained for: the attention's (original) max_position."""
    attention = kwargs.get("attention")
    return int(attention["max_position"]) if attention else DEFAULT_TRAINED_LENGTH


def read_hf_checkpoint(ckpt: str) -> tuple[Path, dict] | None:
    """For `ckpt=hf:<dir>` (or the config.json of such a directory, as a run records it in init_from): the
    directory's config.json path and the model in the shape of a seqarch checkpoint; None for anything else.

    The run config has the base recipe's data / optim / trainer sections with data.seq_len the model's
    trained length, so `fit recipe=extend` extends from there. ValueError (a ConfigError) when the
    directory cannot be loaded exactly.
    """
    from seqarch.overrides import ConfigError
    from seqarch.train.config import load_recipe

    text = str(ckpt)
    if text.startswith(HF_PREFIX):
        directory = Path(text[len(HF_PREFIX):]).expanduser()
    elif Path(text).name == "config.json" and Path(text).is_file() and (
            (Path(text).parent / _WEIGHTS).is_file() or (Path(text).parent / _INDEX).is_file()):
        directory = Path(text).parent
    else:
        return None
    try:
        model = from_hf(directory)
    except ValueError as error:
        raise ConfigError(f"ckpt=hf:{directory}: {error}") from error
    except OSError as error:
        raise ConfigError(f"ckpt=hf:{directory}: {error}") from error
    base = load_recipe("base")
    kwargs = dict(model.init_kwargs)
    data = dict(base["data"])
    data["seq_len"] = trained_length(kwargs)
    config = {**base, "recipe": f"hf:{directory.name}", "model": kwargs, "data": data, "ckpt": None,
              "init_from": None, "run_dir": None, "print_config": False}
    config.pop("extends", None)
    byte_level = model.vocab_size == 256 and not has_tokenizer(directory)
    contents = {"hyper_parameters": {"config": config, "model_kwargs": kwargs,
                                     "metric": "bits_per_byte" if byte_level else "hf_tokens"},
                "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
                "hf_dir": str(directory)}
    return directory / "config.json", contents


def has_tokenizer(directory: str | Path) -> bool:
    directory = Path(directory)
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                         "tokenizer.model"))


def load_tokenizer(contents: dict):
    """transformers.AutoTokenizer of an HF checkpoint's directory when it has one; None otherwise."""
    directory = contents.get("hf_dir")
    if directory is None or not has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize_stream(tokenizer, text: str, vocab_size: int) -> torch.Tensor:
    """text -> int64 token stream (S,) for scoring a model that reads `tokenizer`'s tokens. The text is one
    continuous stream cut into windows later, so no special tokens (BOS / EOS) are added; ValueError when
    the tokenizer produces ids the model's vocabulary does not have."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"the directory's tokenizer ({len(tokenizer)} tokens) produces id {int(ids.max())}, outside "
                         f"the model's vocabulary of {vocab_size}: the tokenizer belongs to another model")
    return ids


__all__ = ["ARCHITECTURES", "from_hf", "hf_config_to_kwargs", "hf_names", "load_tokenizer", "read_hf_checkpoint",
           "read_hf_config", "read_hf_weights", "to_hf", "tokenize_stream"]
