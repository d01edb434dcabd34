"""`seqarch fit` and `seqarch generate`: train a recipe into a run folder; sample from a checkpoint.

    summary = train(resolve(load_recipe("mamba"), {"trainer.max_steps": 200}))    # typed: a RunConfig
    summary = fit(["recipe=mamba", "trainer.max_steps=200"])     # the CLI's arguments, then train()
    text = generate(["ckpt=runs/mamba/20260101-120000", "prompt=def ", "max_new_tokens=200"])

With `ckpt=` fit resumes: the configuration comes from the checkpoint (overrides apply on top, e.g. a
larger trainer.max_steps), Lightning restores the step count, optimizer and schedule, and the run
continues in a new run folder; the old one is left as it was.

A run that cannot finish says so in one line and a non-zero exit code (RunStopped): a non-finite
training loss stops it (exit code 3, EXIT_DIVERGED) and Ctrl-C stops it after the current step
(130, EXIT_INTERRUPTED, as a shell reports SIGINT); both write summary.json with "status" and keep
checkpoints/last.ckpt as the last finite state, which `fit ckpt=<run folder>` resumes.

Under `trainer.strategy=ddp` Lightning starts the other processes by running the same command again;
the first process hands them its run folder through the environment variable SEQARCH_RUN_DIR, so
all processes write to one run. Under torchrun or srun every process runs fit itself and the folder
is named after the launch (seqarch/train/launch.py); in both cases only global rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from seqarch.overrides import ConfigError, parse_overrides
from seqarch.runs import (
    RunStopped,
    claim_run_dir,
    load_checkpoint_file,
    read_checkpoint,
    resolve_checkpoint,
    write_json,
)
from seqarch.train.config import RunConfig, load_recipe, resolve
from seqarch.train.launch import check_launch_settings, external_launch, shared_run_dir

_RUN_DIR_HANDOFF = "SEQARCH_RUN_DIR"
EXIT_DIVERGED = 3  # training produced a non-finite loss or weights
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report for a process killed by it)


def resolve_fit_config(args: list[str]) -> tuple[RunConfig, Path | None]:
    """The run config of `seqarch fit <args>` and the checkpoint to resume from (or None)."""
    overrides = parse_overrides(args)
    recipe = overrides.pop("recipe", None)
    ckpt = overrides.pop("ckpt", None)
    if recipe == "extend":
        from seqarch.train.extend import extend_config

        return extend_config(ckpt, overrides), None
    if ckpt is not None:
        if recipe is not None:
            raise ConfigError("give recipe= or ckpt=, not both: a checkpoint carries its own configuration "
                              "(override keys on top of it instead)")
        path, contents = read_checkpoint(str(ckpt))
        if "hf_dir" in contents:
            raise ConfigError(f"fit ckpt={ckpt} would resume a seqarch run; to train a Hugging Face model give "
                              f"recipe=extend ckpt={ckpt}")
        tree = dict(contents["hyper_parameters"]["config"])
        tree.update(ckpt=str(path), run_dir=None, print_config=False)
        return resolve(tree, overrides), path
    if recipe is None:
        from seqarch.train.config import list_recipes

        raise ConfigError(f"fit needs recipe=<name or path.yaml> (or ckpt=... to resume); recipes: "
                          f"{', '.join(list_recipes())}")
    if not isinstance(recipe, str):
        raise ConfigError(f"recipe must be a name or a path, got {recipe!r}")
    return resolve(load_recipe(recipe), overrides), None


def _threads(trainer: dict) -> int:
    if trainer["num_threads"]:
        return trainer["num_threads"]
    processes = trainer["devices"] if trainer["accelerator"] == "cpu" else 1
    return max(1, (os.cpu_count() or 1) // processes)


def _quiet_lightning() -> None:
    # Lightning's info lines (GPU/TPU availability, model summary hints) and advice that does not
    # apply to small CPU runs would bury the progress bar and the summary.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*Checkpoint directory.*exists.*",
                    ".*dirpath has changed.*", ".*is an invalid key for.*", ".*srun.*", ".*tensorboardX.*",
                    ".*Experiment logs directory.*",
                    ".*dataloader is not resumable.*", ".*smaller than the logging interval.*",
                    # validation metrics are torchmetrics objects, already reduced across processes
                    ".*when logging on epoch level in distributed setting.*"):
        warnings.filterwarnings("ignore", message=pattern)


def fit(args: list[str]) -> dict[str, Any] | None:
    """Train as `seqarch fit <args>`: `resolve_fit_config`, then `train`."""
    config, resume_from = resolve_fit_config(args)
    return train(config, resume_from)


def train(config: RunConfig, resume_from: str | Path | None = None) -> dict[str, Any] | None:
    """Train `config` into a fresh run folder; returns the summary (None for print_config or non-zero
    ranks). `resume_from` is a checkpoint (file or run folder) whose weights, optimizer and step count
    the run continues from (what `fit ckpt=` passes; `config.ckpt` only records it in the summary).
    RunStopped when the run diverges or is interrupted, ConfigError for bad settings."""
    resume_from = resolve_checkpoint(str(resume_from)) if resume_from is not None else None
    if config.print_config:
        print(config.to_yaml(), end="")
        return None

    # Thread count, warning filters and log levels are process-wide: restore them for in-process callers.
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; those are what we restore)

    threads_before = torch.get_num_threads()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels_before = [logger.level for logger in loggers]
    torch.set_num_threads(_threads(config.to_dict()["trainer"]))
    try:
        with warnings.catch_warnings():
            return _train(config, resume_from)
    finally:
        torch.set_num_threads(threads_before)
        for logger, level in zip(loggers, levels_before, strict=True):
            logger.setLevel(level)


def _train(config: RunConfig, resume_from: Path | None) -> dict[str, Any] | None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from seqarch.train.callbacks import Diverged, Interrupted, InterruptRequest, ProgressBar, RunCheckpoints
    from seqarch.train.datamodule import SeqDataModule
    from seqarch.train.module import LMModule

    _quiet_lightning()  # after importing Lightning, which sets its loggers' levels on import
    settings = config.to_dict()
    trainer_cfg = settings["trainer"]
    pl.seed_everything(config.seed, verbose=False)

    datamodule = SeqDataModule(config.data, seed=config.seed)
    try:
        datamodule.setup()
    except ValueError as error:
        raise ConfigError(str(error)) from error
    bundle = datamodule.bundle
    _check_data_size(config.data, bundle)
    _check_trainer_settings(trainer_cfg)
    model_kwargs = {"vocab_size": bundle.vocab_size, **config.model}
    try:
        module = LMModule(settings, model_kwargs, bundle.metric)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from error
    _prepare_weights(config, module)
    if resume_from is not None:
        _check_resumable(resume_from, module, trainer_cfg["max_steps"])

    launch = external_launch()  # torchrun / srun: every process runs this command (seqarch/train/launch.py)
    is_child = int(os.environ.get("LOCAL_RANK", "0")) > 0 and _RUN_DIR_HANDOFF in os.environ
    if launch is not None:
        check_launch_settings(launch, trainer_cfg["devices"], trainer_cfg["num_nodes"])
        run_dir, owner = shared_run_dir(launch, config.out_dir, config.recipe, config.run_dir)
        is_child = not owner
    elif is_child:
        run_dir = Path(os.environ[_RUN_DIR_HANDOFF])
    else:
        run_dir = claim_run_dir(config.out_dir, config.recipe, config.run_dir)
    if not is_child:
        os.environ[_RUN_DIR_HANDOFF] = str(run_dir)
        (run_dir / "config.yaml").write_text(config.to_yaml())

    interrupt = InterruptRequest()
    checkpoints = RunCheckpoints(run_dir / "checkpoints", interrupt)
    callbacks = [checkpoints] + ([ProgressBar()] if trainer_cfg["progress"] else [])
    trainer = pl.Trainer(
        max_steps=trainer_cfg["max_steps"], accelerator=trainer_cfg["accelerator"], devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"], strategy=trainer_cfg["strategy"], precision=trainer_cfg["precision"],
        gradient_clip_val=config.optim.grad_clip or None,
        val_check_interval=min(trainer_cfg["val_every"], trainer_cfg["max_steps"]), check_val_every_n_epoch=None,
        limit_val_batches=trainer_cfg["val_batches"], num_sanity_val_steps=0,
        logger=CSVLogger(run_dir, name="", version=""), log_every_n_steps=trainer_cfg["log_every"],
        callbacks=callbacks, enable_progress_bar=trainer_cfg["progress"], enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=run_dir,
    )
    started = time.perf_counter()
    stopped = None
    try:
        with interrupt:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        if trainer.global_step % trainer_cfg["val_every"]:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # the final validation at max_steps
    except (Diverged, Interrupted) as error:
        stopped = error
    except SystemExit as error:  # Lightning turns a KeyboardInterrupt (a second Ctrl-C) into exit code 1
        if not isinstance(error.__context__, KeyboardInterrupt):
            raise
        stopped = Interrupted(trainer.global_step)
    finally:
        if not is_child:
            os.environ.pop(_RUN_DIR_HANDOFF, None)
    if not trainer.is_global_zero:
        if stopped is not None:
            raise RunStopped("", EXIT_DIVERGED if isinstance(stopped, Diverged) else EXIT_INTERRUPTED)
        return None
    summary = _summary(config, module, trainer, bundle, run_dir, checkpoints, time.perf_counter() - started)
    if stopped is not None:
        summary.update(_stopped_fields(stopped))
    write_json(run_dir / "summary.json", summary)
    if stopped is not None:
        raise RunStopped(_stopped_message(stopped, config, run_dir, checkpoints), summary["exit_code"], summary)
    print(format_summary(summary))
    return summary


def _stopped_fields(stopped: Exception) -> dict:
    from seqarch.train.callbacks import Diverged

    if isinstance(stopped, Diverged):
        return {"status": "diverged", "stopped_at_step": stopped.step, "stop_reason": stopped.what,
                "loss_at_stop": stopped.loss, "exit_code": EXIT_DIVERGED}
    return {"status": "interrupted", "stopped_at_step": stopped.step, "stop_reason": "Ctrl-C (SIGINT)",
            "exit_code": EXIT_INTERRUPTED}


def _stopped_message(stopped: Exception, config: RunConfig, run_dir: Path, checkpoints) -> str:
    """The one line printed for a run that stopped: why, where its last checkpoint is, what to do next."""
    from seqarch.train.callbacks import Interrupted

    if checkpoints.last_step is not None:
        where = f"the last checkpoint is {checkpoints.last_path} (step {checkpoints.last_step})"
        resume = f"seqarch fit ckpt={shlex.quote(str(run_dir))}"
    else:
        where, resume = "no checkpoint was written before it", None
    if isinstance(stopped, Interrupted):
        if checkpoints.last_step == config.trainer.max_steps:  # Ctrl-C in the final validation
            return f"interrupted after the last training step; {where}: training had finished"
        tail = f"; resume with: {resume}" if resume else "; nothing to resume: start the run again"
        return f"interrupted at step {stopped.step}; {where}{tail}"
    tries = [f"a lower optim.lr (now {config.optim.lr:g})"]
    clip = config.optim.grad_clip
    tries.append(f"a tighter optim.grad_clip (now {clip:g})" if clip else "gradient clipping (optim.grad_clip=1.0)")
    if config.trainer.precision not in ("32-true", "64-true"):
        tries.append(f"trainer.precision=32-true (now {config.trainer.precision})")
    return (f"training diverged: {stopped.what} at step {stopped.step}, stopped; {where}. Try "
            f"{', '.join(tries[:-1])} or {tries[-1]}")


def _check_data_size(data: dict, bundle) -> None:
    """Refuse a batch size no full training batch fits in (the loader drops the incomplete last batch)."""
    train, val = len(bundle.train), len(bundle.val)
    if train < data["batch_size"]:
        raise ConfigError(f"data.batch_size={data['batch_size']} is larger than the training split "
                          f"({train} sequences of data.seq_len={data['seq_len']}): lower data.batch_size or "
                          "data.seq_len, or give more data")
    if val < 1:
        raise ConfigError(f"the validation split holds no sequence of data.seq_len={data['seq_len']}: lower "
                          "data.seq_len or give more data")


def _check_trainer_settings(trainer_cfg: dict) -> None:
    """Let Lightning judge accelerator, devices, strategy and precision before anything is written."""
    import lightning.pytorch as pl

    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision")
    if str(trainer_cfg["strategy"]).startswith("fsdp") and trainer_cfg["accelerator"] == "cpu":
        raise ConfigError(f"trainer.strategy={trainer_cfg['strategy']} needs GPUs: Lightning's FSDPStrategy refuses "
                          "the CPU accelerator (it shards parameters over CUDA devices); on CPU use "
                          "trainer.strategy=ddp, on GPUs trainer.accelerator=gpu")
    try:
        pl.Trainer(**{key: trainer_cfg[key] for key in keys}, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    except Exception as error:  # Lightning raises MisconfigurationException, ValueError, RuntimeError...
        given = ", ".join(f"trainer.{key}={trainer_cfg[key]}" for key in keys)
        raise ConfigError(f"{given}: {' '.join(str(error).split())}") from None


def _prepare_weights(config: RunConfig, module) -> None:
    """Load `init_from` weights (recipe=extend) and wrap the attention projections in LoRA adapters."""
    if config.init_from is not None:
        from seqarch.train.extend import load_base_weights

        load_base_weights(module.model, config.init_from)
    if config.lora.rank:
        from seqarch.models.lora import apply_lora

        try:
            apply_lora(module.model, config.lora.rank, config.lora.alpha, config.lora.train_embeddings_and_norms)
        except ValueError as error:
            raise ConfigError(str(error)) from error


def _check_resumable(path: Path, module, max_steps: int) -> None:
    contents = load_checkpoint_file(path)
    missing, unexpected = module.load_state_dict(contents["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the configured model "
                          f"(missing {len(missing)}, unexpected {len(unexpected)} tensors); resume without "
                          "changing model.* or data.vocab_size")
    if contents.get("global_step", 0) >= max_steps:
        raise ConfigError(f"checkpoint {str(path)!r} is at step {contents.get('global_step')}; "
                          f"set trainer.max_steps above it to continue (now {max_steps})")


def _summary(config: RunConfig, module, trainer, bundle, run_dir: Path, checkpoints, wall_seconds: float) -> dict:
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    names = module.model.layer_names
    summary = {
        "recipe": config.recipe,
        "run_dir": str(run_dir),
        "mixers": sorted(set(names)),
        "layers": names,
        "parameters": module.model.num_parameters(),
        "data": bundle.description,
        "steps": trainer.global_step,
        "resumed_from": config.ckpt,
        "tokens_trained": module.train_tokens,
        "train_seconds": round(module.train_seconds, 2),
        "wall_seconds": round(wall_seconds, 2),
        "tokens_per_s": round(module.train_tokens / max(module.train_seconds, 1e-9), 1),
        "val_loss": metrics.get("val_loss"),
        "val_perplexity": metrics.get("val_ppl"),
        "val_accuracy": metrics.get("val_acc"),
        "metric": bundle.metric,
        "baseline_name": bundle.baseline_name,
        "baseline": bundle.baseline,
        "status": "completed",
        "checkpoint_last": str(checkpoints.last_path) if checkpoints.last_step is not None else None,
        "checkpoint_last_step": checkpoints.last_step,
        "checkpoint_best": str(checkpoints.best_path) if checkpoints.best_step is not None else None,
        "checkpoint_best_step": checkpoints.best_step,
        "best_val_loss": checkpoints.best_score,
        "config": config.to_dict(),
    }
    if bundle.metric == "bits_per_byte" and summary["val_loss"] is not None:
        summary["val_bits_per_byte"] = summary["val_loss"] / math.log(2)
    return summary


def format_summary(summary: dict) -> str:
    """The one-screen summary printed at the end of a run."""
    def number(value, spec):
        return "n/a" if value is None else format(value, spec)

    if summary["metric"] == "bits_per_byte":
        headline = (f"val bits/byte  {number(summary.get('val_bits_per_byte'), '.3f')}   "
                    f"(unigram baseline {summary['baseline']:.3f})")
    else:
        headline = (f"val accuracy   {number(summary['val_accuracy'], '.3f')}   "
                    f"(chance {summary['baseline']:.3f})")
    minutes, seconds = divmod(int(summary["wall_seconds"]), 60)
    names = summary["layers"]
    layers = f"{names[0]} x{len(names)}" if len(set(names)) == 1 else " ".join(names)
    lines = [
        "",
        f"seqarch fit: {summary['recipe']} done",
        f"  model          {layers}, d_model {summary['config']['model'].get('d_model')}",
        f"  parameters     {summary['parameters']:,}",
        f"  data           {summary['data']}",
        f"  steps          {summary['steps']} in {minutes}m{seconds:02d}s, {summary['tokens_per_s']:,.0f} tokens/s",
        f"  val loss       {number(summary['val_loss'], '.4f')}   "
        f"perplexity {number(summary['val_perplexity'], '.3f')}",
        f"  {headline}",
        f"  run folder     {summary['run_dir']}/",
        "                 config.yaml  metrics.csv  summary.json  checkpoints/{last,best}.ckpt",
    ]
    return "\n".join(lines)


def generate(args: list[str]) -> str:
    """Sample as `seqarch generate ckpt=... prompt=... max_new_tokens=... temperature=... top_k=... seed=...`;
    prints and returns the text (bytes decoded as UTF-8, or token ids for synthetic-task models)."""
    from seqarch.runs import model_from_checkpoint

    options = {"ckpt": None, "prompt": "\n", "max_new_tokens": 200, "temperature": 0.8, "top_k": None, "seed": 0}
    given = parse_overrides(args, raw_keys=("prompt",))
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} for generate; valid keys: {', '.join(options)}")
    options.update(given)
    if options["ckpt"] is None:
        raise ConfigError("generate needs ckpt=<checkpoint file or run folder>")
    for key in ("max_new_tokens", "seed"):
        if not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < 0:
            raise ConfigError(f"{key} must be a non-negative int, got {options[key]!r}")
    if not isinstance(options["temperature"], (int, float)) or options["temperature"] < 0:
        raise ConfigError(f"temperature must be a number >= 0, got {options['temperature']!r}")
    if options["top_k"] is not None and (not isinstance(options["top_k"], int) or options["top_k"] < 1):
        raise ConfigError(f"top_k must be an int >= 1, got {options['top_k']!r}")
    path, contents = read_checkpoint(str(options["ckpt"]))
    hparams = contents["hyper_parameters"]
    model = model_from_checkpoint(contents)  # LoRA adapters of an extended run merged
    as_bytes = hparams["metric"] == "bits_per_byte"
    prompt = str(options["prompt"])
    from seqarch.models.hf import load_tokenizer

    tokenizer = load_tokenizer(contents)  # an hf:<dir> with its own tokenizer; None otherwise
    if tokenizer is not None:
        ids = tokenizer(prompt)["input_ids"] or [tokenizer.bos_token_id or 0]
    elif as_bytes:
        ids = list(prompt.encode("utf-8")) or [10]
    else:
        try:
            ids = [int(token) for token in prompt.split()]
        except ValueError as error:
            raise ConfigError(f"this model reads token ids: give prompt=\"3 17 5\", got {prompt!r}") from error
        if not ids or not all(0 <= i < model.vocab_size for i in ids):
            raise ConfigError(f"prompt token ids must be in [0, {model.vocab_size}), got {prompt!r}")
    tokens = model.generate(torch.tensor([ids]), options["max_new_tokens"], temperature=float(options["temperature"]),
                            top_k=options["top_k"], generator=torch.Generator().manual_seed(options["seed"]))
    new = tokens[0, len(ids):].tolist()
    if tokenizer is not None:
        text = prompt + tokenizer.decode(new)
    else:
        text = prompt + (bytes(new).decode("utf-8", errors="replace") if as_bytes else " " + " ".join(map(str, new)))
    print(text)
    return text


__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "fit", "format_summary", "generate", "resolve_fit_config", "train"]
