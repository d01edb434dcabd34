"""LightningModule around SeqLM: next-token loss, AdamW with warmup and cosine decay, metrics.

Legend: B batch, L length, V vocabulary.

Batches are (inputs (B, L), targets (B, L)) with targets == IGNORE where a position is not scored
(synthetic tasks score only their answers). Metrics (torchmetrics, so they reduce across DDP
processes): validation loss (mean over scored tokens), perplexity, accuracy, and for byte data
bits per byte = loss / ln 2.

Weight decay goes to the matrices of linear layers only; embeddings (and the head tied to them),
norms, biases and every parameter tagged `_no_weight_decay = True` (SSM dynamics such as A_log
and dt) are not decayed. A parameter tagged with safari's `_optim` dict (Hyena's filter) gets its
own group with those settings (its lr follows the same warmup and cosine schedule).
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from seqarch.data.synthetic import IGNORE
from seqarch.models.lm import SeqLM


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed linear-layer matrices, and everything else; then one group per
    distinct `_optim` dict (safari's convention: `p._optim = {"lr": 1e-5, "weight_decay": 0.0}` gives p
    those settings; a key it leaves out keeps the value of the group p would otherwise join)."""
    no_decay_ids = {id(p) for p in model.parameters() if getattr(p, "_no_weight_decay", False)}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.RMSNorm, nn.LayerNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, special = [], [], {}
    for parameter in model.parameters():  # unique parameters: a tied head appears once
        decayed = parameter.ndim >= 2 and id(parameter) not in no_decay_ids
        overrides = getattr(parameter, "_optim", None)
        if overrides:
            settings = {"weight_decay": weight_decay if decayed else 0.0, **overrides}
            special.setdefault(tuple(sorted(settings.items())), []).append(parameter)
        elif decayed:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return ([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            + [{"params": params, **dict(settings)} for settings, params in special.items()])


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over warmup, then cosine from 1 to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LMModule(pl.LightningModule):
    def __init__(self, config: dict, model_kwargs: dict, metric: str):
        """config: the resolved run config (saved in checkpoints); model_kwargs: SeqLM's init kwargs;
        metric: "bits_per_byte" or "accuracy", the headline metric of the data."""
        super().__init__()
        self.save_hyperparameters()
        self.model = SeqLM(**model_kwargs)
        self.optim = config["optim"]
        self.max_steps = config["trainer"]["max_steps"]
        vocab = self.model.vocab_size
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=IGNORE)
        self.val_accuracy = MulticlassAccuracy(num_classes=vocab, ignore_index=IGNORE, average="micro")
        self.train_tokens = 0  # tokens this process trained on in this session
        self.train_seconds = 0.0  # time in training steps (validation excluded)
        self._step_start = 0.0

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = self._loss(self.model(inputs), targets)  # logits (B, L, V)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_start
        tokens = batch[0].numel() * self.trainer.world_size
        self.train_tokens += tokens
        self.train_seconds += seconds
        self.log("tok/s", tokens / seconds, prog_bar=True, on_step=True, on_epoch=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, targets = batch
        logits = self.model(inputs)  # (B, L, V)
        scored = (targets != IGNORE).sum()
        self.val_loss.update(self._loss(logits, targets), weight=scored)
        self.val_perplexity.update(logits.float(), targets)
        self.val_accuracy.update(logits.flatten(0, 1), targets.flatten())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_ppl", self.val_perplexity.compute())
        self.log("val_acc", self.val_accuracy.compute(), prog_bar=self.hparams.metric == "accuracy")
        if self.hparams.metric == "bits_per_byte":
            self.log("val_bpb", loss / math.log(2), prog_bar=True)
        for metric in (self.val_loss, self.val_perplexity, self.val_accuracy):
            metric.reset()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run uses the learning rate of its configuration (e.g. `fit ckpt=<run> optim.lr=1e-4` after a
        divergence), not the one saved with the optimizer and schedule, which Lightning restores after this hook:
        the peak is replaced and the schedule's current factor kept."""
        lr = self.optim["lr"]
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                if group.get("initial_lr"):
                    group["lr"] = group["lr"] / group["initial_lr"] * lr
                    group["initial_lr"] = lr
        for schedule in checkpoint.get("lr_schedulers", []):
            bases = schedule.get("base_lrs")
            if bases and all(bases):
                if schedule.get("_last_lr"):
                    schedule["_last_lr"] = [last / base * lr for last, base in zip(schedule["_last_lr"], bases,
                                                                                   strict=True)]
                schedule["base_lrs"] = [lr] * len(bases)

    def configure_optimizers(self):
        optim = self.optim
        optimizer = torch.optim.AdamW(parameter_groups(self.model, optim["weight_decay"]), lr=optim["lr"],
                                      betas=(optim["beta1"], optim["beta2"]), eps=optim["eps"])
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, optim["warmup_steps"], self.max_steps, optim["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


__all__ = ["LMModule", "parameter_groups", "warmup_cosine"]
