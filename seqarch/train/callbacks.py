"""Callbacks: a progress bar that shows loss and tokens/s (and no version number)."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the metrics logged with prog_bar=True: loss, tok/s, val_loss, val_bpb
    or val_acc; the `v_num` of the logger version is dropped (the run folder names the run)."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "tok/s" in metrics:
            metrics["tok/s"] = f"{float(metrics['tok/s']):,.0f}"
        return metrics


__all__ = ["ProgressBar"]
