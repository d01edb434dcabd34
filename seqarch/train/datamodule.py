"""LightningDataModule over a seqarch data source (see seqarch/data/sources.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from seqarch.data.sources import DataBundle, build_data


class SeqDataModule(pl.LightningDataModule):
    """Training batches in a seeded shuffled order (Lightning shards them under DDP); validation
    batches in a fixed order, so every validation sees the same windows.

    A resumed run shuffles with seed + the step it resumes from, so it does not replay the batches
    it started with; it does not reproduce the exact order an uninterrupted run would have seen."""

    def __init__(self, data: dict, seed: int = 0):
        """data: {"source": name, **config keys of that source}."""
        super().__init__()
        settings = dict(data)
        self.source = settings.pop("source")
        self.settings = settings
        self.batch_size = settings["batch_size"]
        self.seed = seed
        self.bundle: DataBundle | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.bundle is None:
            self.bundle = build_data(self.source, seed=self.seed, **self.settings)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.bundle.train, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(self.seed + self._resumed_step()))

    def _resumed_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_step if trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.bundle.val, batch_size=self.batch_size, shuffle=False)


__all__ = ["SeqDataModule"]
