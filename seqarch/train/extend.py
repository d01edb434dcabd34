"""Context extension (`seqarch fit recipe=extend ckpt=<run> ...`): the run config and the base weights.

    seqarch fit recipe=extend ckpt=runs/custom/<timestamp> data.seq_len=1024 \\
        model.attention.rope_scaling=yarn model.attention.s2_group=256 lora.rank=8

The new run starts from the checkpoint's weights at step 0 with a fresh optimizer (unlike
`fit ckpt=`, which resumes). Its configuration is the checkpoint's model and data sections with
the optim, trainer and lora sections of seqarch/recipes/extend.yaml, then the overrides. A RoPE
scaling given without rope_factor gets factor = new seq_len / trained seq_len, and without
max_position the trained seq_len (the length the scaling extends from).

The base weights are read by `seqarch.runs.model_from_checkpoint` (LoRA adapters of an extended run
merged), which the evals use too.
"""

from __future__ import annotations

from typing import Any

from seqarch.configs import moved_names
from seqarch.models.lm import SeqLM
from seqarch.overrides import ConfigError
from seqarch.runs import read_checkpoint
from seqarch.train.config import RunConfig, load_recipe, resolve

_EXTEND_SECTIONS = ("optim", "trainer", "lora")


def extend_config(ckpt: Any, overrides: dict[str, Any]) -> RunConfig:
    """The run config of `seqarch fit recipe=extend ckpt=<ckpt> <overrides>`."""
    if ckpt is None:
        raise ConfigError("recipe=extend needs ckpt=<run folder or .ckpt> of the model to extend")
    path, contents = read_checkpoint(str(ckpt))
    if contents["hyper_parameters"]["metric"] == "hf_tokens":
        raise ConfigError(f"recipe=extend trains on bytes; {ckpt} reads another vocabulary (its own tokenizer), "
                          "which seqarch's data sources do not produce")
    base = contents["hyper_parameters"]["config"]
    recipe = load_recipe("extend")
    tree = {key: value for key, value in base.items() if key not in _EXTEND_SECTIONS}
    tree["trainer"] = {**base["trainer"], **recipe["trainer"]}
    tree.update(optim=recipe["optim"], lora=recipe["lora"], recipe="extend", ckpt=None, init_from=str(path),
                run_dir=None, print_config=False)
    config = resolve(tree, overrides)
    attention = config.model.get("attention") or {}
    if attention.get("rope_scaling") is not None:
        trained = base["data"]["seq_len"]
        implied = {"model.attention.rope_factor": max(1.0, config.data["seq_len"] / trained),
                   "model.attention.max_position": trained}
        missing = {key: value for key, value in implied.items() if key not in overrides}
        if missing:
            config = resolve(tree, {**overrides, **missing})
    return config


def load_base_weights(model: SeqLM, ckpt: str) -> None:
    """Copy the weights of checkpoint `ckpt` into `model` (same architecture); ConfigError if they do not fit."""
    from seqarch.runs import model_from_checkpoint

    path, contents = read_checkpoint(ckpt)
    source = model_from_checkpoint(contents)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as error:  # missing, unexpected or differently shaped tensors
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the configured model ({str(error).splitlines()[0]} "
                          "...); recipe=extend may change the length, the RoPE scaling, S2-Attn and LoRA, "
                          "not the architecture") from error


# model_from_checkpoint moved to seqarch.runs (issue #17): the old path warns for one release.
__getattr__ = moved_names(__name__, {"model_from_checkpoint": "seqarch.runs"})

__all__ = ["extend_config", "load_base_weights"]
