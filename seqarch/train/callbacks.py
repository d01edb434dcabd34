"""Callbacks: the progress bar, and the run's checkpoints with the guards that keep them sound.

`RunCheckpoints` owns checkpoints/last.ckpt and checkpoints/best.ckpt:

- last.ckpt is rewritten after every validation during training, at the end of training and when
  the run is interrupted, so it always holds the latest state saved (after the final step for a run
  that finishes), whatever the validation loss did;
- best.ckpt is a copy of last.ckpt taken when a validation's loss is finite and lower than every
  earlier one of this run; the final validation after training counts too;
- a state whose weights are not all finite is never written, and a non-finite training loss stops
  the run before its backward pass (`Diverged`), so the last checkpoint written stays the resumable one;
- Ctrl-C (while `InterruptRequest` is installed) stops at the end of the current step, after saving
  last.ckpt (`Interrupted`); a second Ctrl-C stops at once.

Files are written to a temporary name and renamed, so a crash mid-write never leaves half a checkpoint.
Under DDP every decision is agreed across processes (any process diverging or interrupted stops all).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the metrics logged with prog_bar=True: loss, tok/s, val_loss, val_bpb
    or val_acc; the `v_num` of the logger version is dropped (the run folder names the run)."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "tok/s" in metrics:
            metrics["tok/s"] = f"{float(metrics['tok/s']):,.0f}"
        return metrics


class Diverged(Exception):
    """Training produced a non-finite loss (or non-finite weights) at `step` (1-based: the step attempted)."""

    def __init__(self, step: int, what: str, loss: float | None = None):
        super().__init__(f"{what} at step {step}")
        self.step = step
        self.what = what
        self.loss = loss  # the non-finite training loss (None when the weights were the problem)


class Interrupted(Exception):
    """Ctrl-C was pressed; raised at a step boundary once last.ckpt holds that step."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


class InterruptRequest:
    """While installed (a context manager, main thread only), the first SIGINT only sets `requested`;
    the next one raises KeyboardInterrupt as usual. The previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> InterruptRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class RunCheckpoints(Callback):
    """last.ckpt / best.ckpt of one run, and the divergence and interrupt guards (see the module docstring)."""

    def __init__(self, dirpath: Path, interrupt: InterruptRequest | None = None):
        self.dirpath = Path(dirpath)
        self.interrupt = interrupt
        self.last_step: int | None = None  # global step held by last.ckpt (None: not written in this run)
        self.best_step: int | None = None
        self.best_score: float | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.ckpt"

    def save_last(self, trainer, pl_module) -> None:
        """Write the current state to last.ckpt; Diverged (nothing written) if a weight is not finite."""
        if self.last_step == trainer.global_step:
            return
        if not trainer.strategy.reduce_boolean_decision(_all_finite(pl_module), all=True):
            raise Diverged(trainer.global_step, "the weights became non-finite")
        temporary = self.dirpath / "last.ckpt.part"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(temporary)  # every process calls it; the first one writes
        if trainer.is_global_zero:
            os.replace(temporary, self.last_path)
        self.last_step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            value = float(loss.detach())
            what = "another process's training loss is not finite" if finite else f"the training loss is {value}"
            raise Diverged(trainer.global_step + 1, what, None if finite else value)

    def _stop_if_interrupted(self, trainer, pl_module) -> None:
        requested = self.interrupt is not None and self.interrupt.requested
        if trainer.strategy.reduce_boolean_decision(requested, all=False):
            self.save_last(trainer, pl_module)
            raise Interrupted(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._stop_if_interrupted(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self.save_last(trainer, pl_module)
        score = trainer.callback_metrics.get("val_loss")
        if score is not None and self.last_step == trainer.global_step:  # last.ckpt holds the validated state
            score = float(score)
            if math.isfinite(score) and (self.best_score is None or score < self.best_score):
                if trainer.is_global_zero:
                    temporary = self.dirpath / "best.ckpt.part"
                    shutil.copyfile(self.last_path, temporary)
                    os.replace(temporary, self.best_path)
                self.best_score, self.best_step = score, trainer.global_step
        if trainer.state.fn == TrainerFn.FITTING:
            self._stop_if_interrupted(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save_last(trainer, pl_module)


__all__ = ["Diverged", "InterruptRequest", "Interrupted", "ProgressBar", "RunCheckpoints"]
