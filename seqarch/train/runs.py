"""Run folders and checkpoints on disk.

    runs/<recipe>/<YYYYmmdd-HHMMSS>/        one folder per run, never reused
        config.yaml                        the resolved configuration
        metrics.csv                        one row per logged step / validation (Lightning CSVLogger)
        checkpoints/last.ckpt, best.ckpt   the final state, and the one with the lowest val_loss
        summary.json                       parameters, tokens/s, final validation metrics, baseline

A folder is claimed with an atomic mkdir, so two runs started in the same second get
`<timestamp>`, `<timestamp>-2`, ... and never write into each other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from seqarch.train.config import ConfigError


def claim_run_dir(out_dir: str, recipe: str, run_dir: str | None) -> Path:
    """Create and return a fresh run folder; an explicit `run_dir` that exists is an error."""
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists():
            raise ConfigError(f"run_dir {run_dir!r} already exists; choose a new folder or leave run_dir unset "
                              f"for a fresh {out_dir}/<recipe>/<timestamp>/")
        path.mkdir(parents=True)
        return path
    parent = Path(out_dir) / recipe
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        path = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a fresh run folder under {parent}")


def resolve_checkpoint(ckpt: str) -> Path:
    """A checkpoint file, or a run folder (its checkpoints/last.ckpt)."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {ckpt!r} does not exist; give a .ckpt file or a run folder "
                          "(runs/<recipe>/<timestamp>/ holding checkpoints/last.ckpt)")
    return path


def read_checkpoint(ckpt: str) -> tuple[Path, dict[str, Any]]:
    """(path, contents) of a seqarch checkpoint; ConfigError when it is missing, unreadable or foreign.
    `hf:<dir>` reads a Hugging Face directory into the same shape (seqarch.models.hf.read_hf_checkpoint)."""
    from seqarch.models.hf import read_hf_checkpoint

    converted = read_hf_checkpoint(ckpt)
    if converted is not None:
        return converted
    path = resolve_checkpoint(ckpt)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a checkpoint: "
                          f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    hparams = contents.get("hyper_parameters") if isinstance(contents, dict) else None
    if not isinstance(hparams, dict) or "config" not in hparams or "state_dict" not in contents:
        raise ConfigError(f"checkpoint {str(path)!r} was not written by `seqarch fit` (no seqarch config in it)")
    return path, contents


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


__all__ = ["claim_run_dir", "read_checkpoint", "resolve_checkpoint", "write_json"]
