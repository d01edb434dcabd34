"""Helpers the bench tests share: an in-process executor and a tiny sweep."""

from __future__ import annotations

import torch

from seqarch.bench.case import run_case as run_case_here
from seqarch.bench.settings import BenchSettings


def in_process(spec, budget_s):
    """Executor running the case's measurement code in this process (no subprocess start-up).
    Width 64 below: the contract only promises that every mixer's defaults work at d_model=64."""
    return {"status": "ok", "wall_s": 0.0, **run_case_here(spec)}


def tiny_settings(tmp_path, **overrides) -> BenchSettings:
    values = {"seq_lens": (8, 13), "d_model": 64, "n_layers": 1, "vocab_size": 11, "warmup": 0, "repeats": 2,
              "decode_tokens": 2, "threads": torch.get_num_threads(), "out": str(tmp_path / "out"),
              "extrapolate_lens": (64, 128)}
    return BenchSettings(**{**values, **overrides})
