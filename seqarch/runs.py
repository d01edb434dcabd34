"""Run folders and checkpoints on disk.

    runs/<recipe>/<YYYYmmdd-HHMMSS>/        one folder per run, never reused
        config.yaml                        the resolved configuration
        metrics.csv                        one row per logged step / validation (Lightning CSVLogger)
        checkpoints/last.ckpt, best.ckpt   the latest state, and the one with the lowest finite val_loss
        summary.json                       parameters, tokens/s, final validation metrics, baseline, status

A folder is claimed with an atomic mkdir, so two runs started in the same second get
`<timestamp>`, `<timestamp>-2`, ... and never write into each other.

Checkpoints are read with `torch.load(weights_only=True)`: seqarch writes only tensors and plain
containers (dicts, lists, str, int, float, bool, None), so no global needs allow-listing, and a file
that names any other Python object (a pickle whose `__reduce__` would run code) is refused before
anything in it runs. JSON is written strictly: NaN and infinities become null, and the top-level
`non_finite` map names each such value and what it was.

`model_from_checkpoint` rebuilds the SeqLM of any checkpoint (LoRA adapters merged), optionally with
overridden attention keys. Training (seqarch.train) and the evals (seqarch.evals) both read runs
through this module; it imports neither.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seqarch.overrides import ConfigError

if TYPE_CHECKING:
    from seqarch.models.lm import SeqLM


class RunStopped(RuntimeError):
    """A run that started but did not finish: it diverged (exit code 3) or was interrupted (130).
    The message is the one line the CLI prints; `summary` is what summary.json holds."""

    def __init__(self, message: str, exit_code: int, summary: dict | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.summary = summary


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
    contents = load_checkpoint_file(path)
    hparams = contents.get("hyper_parameters") if isinstance(contents, dict) else None
    if not isinstance(hparams, dict) or "config" not in hparams or "state_dict" not in contents:
        raise ConfigError(f"checkpoint {str(path)!r} was not written by `seqarch fit` (no seqarch config in it)")
    return path, contents


def load_checkpoint_file(path: Path) -> Any:
    """torch.load with weights_only=True; ConfigError for a file that is not a checkpoint, or that holds
    objects other than tensors and plain containers (refused unread: none of its code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                     "")
        raise ConfigError(f"checkpoint {str(path)!r} refused: it holds Python objects other than tensors and plain "
                          f"containers, which seqarch never writes and will not unpickle ({found or 'not loadable'} "
                          "under weights_only=True)") from None
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt or not a checkpoint: "
                          f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def model_from_checkpoint(contents: dict, attention_overrides: dict[str, Any] | None = None) -> SeqLM:
    """The trained SeqLM of checkpoint `contents` (LoRA merged), in eval mode; `attention_overrides`
    replace keys of the attention config (the weights do not depend on them)."""
    from seqarch.models.lm import SeqLM
    from seqarch.models.lora import apply_lora, merge_lora

    hparams = contents["hyper_parameters"]
    kwargs = dict(hparams["model_kwargs"])
    if attention_overrides:
        kwargs["attention"] = {**(kwargs.get("attention") or {}), **attention_overrides}
    try:
        model = SeqLM.from_config(kwargs)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from error
    lora = hparams["config"].get("lora") or {}
    if lora.get("rank"):
        apply_lora(model, lora["rank"], lora["alpha"])
    model.load_state_dict({key.removeprefix("model."): value for key, value in contents["state_dict"].items()})
    merge_lora(model)
    return model.eval()


def finite_or_null(payload: Any, where: str = "", replaced: dict | None = None) -> Any:
    """`payload` with NaN / infinite floats replaced by None; `replaced` collects {path: 'nan' | 'inf' | '-inf'}."""
    if isinstance(payload, float) and not math.isfinite(payload):
        if replaced is not None:
            replaced[where] = "nan" if math.isnan(payload) else ("inf" if payload > 0 else "-inf")
        return None
    if isinstance(payload, dict):
        return {key: finite_or_null(value, f"{where}.{key}" if where else str(key), replaced)
                for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_or_null(value, f"{where}[{index}]", replaced) for index, value in enumerate(payload)]
    return payload


def strict_json(payload: dict, indent: int = 2) -> str:
    """JSON that strict parsers accept: non-finite floats written as null and listed under `non_finite`."""
    replaced: dict[str, str] = {}
    clean = finite_or_null(payload, "", replaced)
    if replaced:
        clean["non_finite"] = replaced
    return json.dumps(clean, indent=indent, allow_nan=False) + "\n"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(strict_json(payload))


__all__ = ["RunStopped", "claim_run_dir", "finite_or_null", "load_checkpoint_file", "model_from_checkpoint",
           "read_checkpoint", "resolve_checkpoint", "strict_json", "write_json"]
