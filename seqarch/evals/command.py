"""`seqarch eval`: perplexity vs context length, or passkey retrieval, for any checkpoint and mixer.

    run_eval(EvalConfig(ckpt="runs/transformer/<timestamp>", task="ppl", lengths=(64, 128, 256)))   # typed

    seqarch eval ckpt=runs/transformer/<timestamp> task=ppl lengths=[64,128,256,512,1024]
    seqarch eval ckpt=<run> task=passkey lengths=[128,256,512,1024] depths=[0,0.5,1] rope_scaling=yarn
    seqarch eval ckpt=hf:<save_pretrained dir> task=ppl          a Hugging Face model (docs/checkpoints.md)

Keys (defaults): task (ppl | passkey), lengths (0.5, 1, 2, 4 and 8 x the trained length; for
passkey those long enough for the needle and the question),
depths ([0, 0.25, 0.5, 0.75, 1], passkey), trials (20 per passkey cell), num_digits (5),
windows (16 per ppl length), scored (last_half | all, ppl), rope_scaling (keep: the model's own;
none | linear | ntk | dynamic | yarn | llama3), rope_factor (max length / trained length),
max_position (the trained length, the one a scaling extends from), seed (0), batch_size (4),
num_threads (0: torch's default), out (a new folder; default <run>/evals/<task>-<scaling>/<timestamp>/),
check_finite (false; true stops at the first layer whose output holds a NaN or infinity and names it,
see SeqLM.check_finite). These are the fields of `EvalConfig`; the command line parses them with
`seqarch.overrides.parse_overrides` (`parse_eval_config`) and calls `run_eval`.

The RoPE keys rebuild the model with that attention config and load the same weights. Mixers
without RoPE (every mixer but attention) have no position encoding to rescale: for them the keys
are ignored, and the command says so. Perplexity reads the validation split of the run's byte
text (stdlib, text or hf); runs trained on another source (e.g. passkey) are read on the stdlib
validation split; models whose vocabulary is not bytes have no text to score.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqarch.configs import outside_stacklevel
from seqarch.data.passkey import passkey_overhead
from seqarch.evals.passkey import passkey_accuracy
from seqarch.evals.perplexity import SCORED, perplexity_vs_length
from seqarch.evals.results import write_results
from seqarch.overrides import ConfigError, parse_overrides
from seqarch.positional import ROPE_SCALING_TYPES
from seqarch.runs import claim_run_dir, model_from_checkpoint, read_checkpoint

TASKS = ("ppl", "passkey")
DEFAULT_MULTIPLES = (0.5, 1, 2, 4, 8)
_TEXT_SOURCES = ("stdlib", "text", "hf")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EvalConfig:
    """The settings of one eval, checked on construction (ConfigError naming the key and what is valid)."""

    ckpt: str | None = None  # checkpoint file, run folder, or hf:<dir> (required)
    task: str | None = None  # one of TASKS (required)
    lengths: tuple[int, ...] | None = None  # None: 0.5 to 8 x the trained length (see default_lengths)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # passkey: needle depths in [0, 1]
    trials: int = 20  # passkey: prompts per (length, depth) cell
    num_digits: int = 5  # passkey: digits of the key
    windows: int = 16  # ppl: windows per length
    scored: str = "last_half"  # ppl: which tokens of a window are scored (SCORED)
    rope_scaling: str = "keep"  # keep: the model's own; none, or a RoPE scaling type
    rope_factor: float | None = None  # None: max length / trained length
    max_position: int | None = None  # None: the trained length (the one a scaling extends from)
    seed: int = 0
    batch_size: int = 4
    num_threads: int = 0  # torch threads while evaluating; 0: as they are
    out: str | None = None  # a new results folder; None: <run>/evals/<task>-<scaling>/<timestamp>/
    check_finite: bool = False  # stop at the first layer whose output holds a NaN or infinity

    def __post_init__(self):
        if self.ckpt is None:
            raise ConfigError("eval needs ckpt=<checkpoint file or run folder>")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for key in ("trials", "num_digits", "windows", "batch_size"):
            _positive_int(getattr(self, key), key)
        if not isinstance(self.seed, int) or not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise ConfigError("seed must be an int and num_threads an int >= 0")
        if self.scored not in SCORED:
            raise ConfigError(f"scored must be one of {', '.join(SCORED)}, got {self.scored!r}")
        scalings = ("keep", "none", *ROPE_SCALING_TYPES)
        if self.rope_scaling not in scalings:
            raise ConfigError(f"rope_scaling must be one of {', '.join(map(str, scalings))}, "
                              f"got {self.rope_scaling!r}")
        lengths = self.lengths
        if lengths is not None and (not isinstance(lengths, (list, tuple)) or not lengths or not all(
                _is_int(n) and n >= 2 for n in lengths)):
            raise ConfigError(f"lengths must be a non-empty list of ints >= 2, e.g. [128,256,512], got {lengths!r}")
        depths = self.depths
        if not isinstance(depths, (list, tuple)) or not depths or not all(
                isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths):
            raise ConfigError(f"depths must be a non-empty list of numbers in [0, 1], e.g. [0,0.5,1], got {depths!r}")
        factor = self.rope_factor
        if factor is not None and (not isinstance(factor, (int, float)) or factor < 1):
            raise ConfigError(f"rope_factor must be a number >= 1, got {factor!r}")
        if self.max_position is not None:
            _positive_int(self.max_position, "max_position")
        if not isinstance(self.check_finite, bool):
            raise ConfigError(f"check_finite must be true or false, got {self.check_finite!r}")
        object.__setattr__(self, "lengths", None if lengths is None else tuple(lengths))
        object.__setattr__(self, "depths", tuple(float(d) for d in depths))

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (lists for lengths and depths)."""
        values = dataclasses.asdict(self)
        values["depths"] = list(self.depths)
        values["lengths"] = None if self.lengths is None else list(self.lengths)
        return values


OPTIONS = {field.name: field.default for field in dataclasses.fields(EvalConfig)}  # the keys of `seqarch eval`


def _positive_int(value: Any, key: str) -> int:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{key} must be an int >= 1, got {value!r}")
    return value


def parse_eval_config(args: list[str]) -> EvalConfig:
    """The validated settings of `seqarch eval <args>` (lengths still None when not given)."""
    given = parse_overrides(args)
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} for eval; valid keys: {', '.join(OPTIONS)}")
    return EvalConfig(**given)


def parse_eval_options(args: list[str]) -> dict[str, Any]:
    """Deprecated (one release): `parse_eval_config(args)`, which returns an EvalConfig; this returns its dict."""
    warnings.warn("seqarch.evals.command.parse_eval_options is deprecated and will be removed in the next release; "
                  "use parse_eval_config (it returns an EvalConfig)", DeprecationWarning,
                  stacklevel=outside_stacklevel())
    return parse_eval_config(args).to_dict()


def _as_config(config: EvalConfig | dict) -> EvalConfig:
    if isinstance(config, EvalConfig):
        return config
    warnings.warn("evaluate(contents, options) with an options dict is deprecated and will be removed in the next "
                  "release; pass an EvalConfig", DeprecationWarning, stacklevel=outside_stacklevel())
    return EvalConfig(**config)


def attention_overrides(config: EvalConfig, trained_length: int, lengths: list[int]) -> dict[str, Any]:
    """The attention config keys that `rope_scaling` / `rope_factor` / `max_position` ask for."""
    scaling = config.rope_scaling
    if scaling == "keep":
        return {}
    if scaling == "none":
        return {"rope_scaling": None, "rope_factor": 1.0}
    factor = config.rope_factor if config.rope_factor is not None else max(1.0, max(lengths) / trained_length)
    position = config.max_position if config.max_position is not None else trained_length
    return {"rope_scaling": scaling, "rope_factor": float(factor), "max_position": position}


def default_lengths(config: EvalConfig, trained_length: int) -> list[int]:
    """0.5 to 8 x the trained length; for passkey without those too short for the needle and question."""
    lengths = [max(2, round(m * trained_length)) for m in DEFAULT_MULTIPLES]
    if config.task == "passkey":
        lengths = [n for n in lengths if n >= passkey_overhead(config.num_digits)]
    return lengths


def validation_stream(config: dict) -> tuple[torch.Tensor, str]:
    """(uint8 validation stream, its name) for perplexity: the run's byte text, else the stdlib's."""
    from seqarch.data.sources import build_data

    data = dict(config["data"])
    source = data.pop("source")
    if source not in _TEXT_SOURCES:
        source, data = "stdlib", {}
    try:
        bundle = build_data(source, **data)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return bundle.val.stream, f"{source} validation split"


def evaluate(contents: dict, config: EvalConfig) -> tuple[dict, list[dict]]:
    """(meta, rows) of one eval of checkpoint `contents` (read_checkpoint's second value) with `config`,
    on `config.num_threads` torch threads (0: as they are); the thread count is restored after.
    Nothing is written (`run_eval` writes the results folder)."""
    config = _as_config(config)
    threads_before = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _evaluate(contents, config)
    finally:
        torch.set_num_threads(threads_before)


def _evaluate(contents: dict, options: EvalConfig) -> tuple[dict, list[dict]]:
    config = contents["hyper_parameters"]["config"]
    trained_length = config["data"]["seq_len"]
    lengths = list(options.lengths or default_lengths(options, trained_length))
    layers = contents["hyper_parameters"]["model_kwargs"]["mixer"]
    has_attention = "attention" in ([layers] if isinstance(layers, str) else layers)
    overrides = attention_overrides(options, trained_length, lengths) if has_attention else {}
    notes = []
    if options.rope_scaling != "keep" and not has_attention:
        notes.append(f"rope_scaling={options.rope_scaling} ignored: mixer {layers} has no RoPE to rescale")
    model = model_from_checkpoint(contents, overrides)
    model.check_finite = options.check_finite
    from seqarch.models.hf import load_tokenizer, tokenize_stream

    tokenizer = load_tokenizer(contents)  # an hf:<dir> with its own tokenizer scores its tokens
    if tokenizer is not None and options.task == "passkey":
        raise ConfigError("task=passkey builds byte prompts and needs a byte-level model (vocabulary 256, no "
                          "tokenizer); this model reads its own tokenizer's tokens: use task=ppl")
    if model.vocab_size != 256 and tokenizer is None:
        raise ConfigError(f"task={options.task} reads bytes; this model's vocabulary has {model.vocab_size} "
                          "tokens (a synthetic-task model)")
    settings = {"rope_scaling": options.rope_scaling, **{k: v for k, v in overrides.items() if k != "rope_scaling"}}
    try:
        if options.task == "ppl":
            stream, name = validation_stream(config)
            if tokenizer is not None:
                text = bytes(stream.tolist()).decode("utf-8", errors="replace")
                stream, name = tokenize_stream(tokenizer, text, model.vocab_size), f"{name}, tokenized"
            settings.update(scored=options.scored, windows=options.windows, text=name)
            rows = perplexity_vs_length(model, stream, lengths, options.windows, options.scored, options.batch_size)
        else:
            settings.update(trials=options.trials, num_digits=options.num_digits, seed=options.seed)
            rows = passkey_accuracy(model, lengths, list(options.depths), options.trials, options.num_digits,
                                    options.seed, options.batch_size)
    except (ValueError, FloatingPointError) as error:
        raise ConfigError(str(error)) from error
    meta = {"task": options.task, "ckpt": str(options.ckpt), "trained_length": trained_length,
            "mixers": sorted(set(model.layer_names)), "settings": settings, "notes": notes}
    return meta, rows


def eval_command(args: list[str]) -> tuple[Path, dict, list[dict]]:
    """Run `seqarch eval <args>`: `parse_eval_config`, then `run_eval`."""
    return run_eval(parse_eval_config(args))


def run_eval(config: EvalConfig) -> tuple[Path, dict, list[dict]]:
    """Evaluate `config.ckpt`, write a fresh results folder, print the table; returns (folder, meta, rows)."""
    from seqarch.evals.results import passkey_table, ppl_table

    if config.out is not None and Path(str(config.out)).exists():
        raise ConfigError(f"out={config.out} already exists; results never overwrite others: choose a new "
                          "folder, or leave out unset for <run>/evals/<task>-<scaling>/<timestamp>/")
    path, contents = read_checkpoint(str(config.ckpt))
    meta, rows = evaluate(contents, config)
    if config.out is not None:
        folder = claim_run_dir("", "", str(config.out))
    else:
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        folder = claim_run_dir(str(run / "evals"), f"{config.task}-{config.rope_scaling}", None)
    meta["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_results(folder, meta, rows)
    for note in meta["notes"]:
        print(f"note: {note}")
    print(ppl_table(rows, meta["trained_length"]) if meta["task"] == "ppl" else passkey_table(rows))
    print(f"results in {folder}/")
    return folder, meta, rows


__all__ = ["OPTIONS", "TASKS", "EvalConfig", "attention_overrides", "eval_command", "evaluate", "parse_eval_config",
           "parse_eval_options", "run_eval"]
