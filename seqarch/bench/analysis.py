"""Scaling analysis of benchmark rows: fitted exponents and crossover lengths.

Exponent: the least-squares slope of log(time) against log(L). For train and prefill the time is
that of one run over L tokens (attention's quadratic term pushes it towards 2, a linear-time mixer
stays near 1); for decode it is the time of one token after a prefix of L (attention's KV cache
pushes it towards 1, a constant-state mixer stays near 0). At small L fixed overheads flatten
every curve, so the report also gives the slope over the largest few lengths.

Crossover: the length from which a mixer's tokens/s exceeds the reference's (attention) at every
larger measured length, interpolated linearly in log L between the two measured lengths where the
ratio of throughputs crosses 1. A length where the mixer was measured but the reference ran over
its budget (or was skipped after that) counts as the mixer being faster (ratio infinite); when the
crossing falls on such a length, that length itself is reported, as nothing finer is known.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fit_exponent(lengths: list[float], times: list[float]) -> float:
    """Slope of log(time) vs log(length) by least squares; needs two distinct lengths."""
    if len(lengths) != len(times) or len(set(lengths)) < 2:
        raise ValueError(f"fit_exponent needs >= 2 distinct lengths with one time each, got {lengths}, {times}")
    if min(lengths) <= 0 or min(times) <= 0:
        raise ValueError("fit_exponent needs positive lengths and times")
    slope, _ = np.polyfit(np.log(lengths), np.log(times), 1)
    return float(slope)


def crossover_length(lengths: list[int], ratios: list[float]) -> float | None:
    """Where `ratios` (mixer tokens/s / reference tokens/s at each length) last crosses above 1.

    Returns the smallest measured length when the mixer is faster everywhere, None when it is
    not faster at the largest length, else the log-log interpolated crossing point."""
    if not lengths:
        return None
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    lengths = [lengths[i] for i in order]
    ratios = [ratios[i] for i in order]
    if ratios[-1] <= 1:
        return None
    index = len(ratios) - 1
    while index > 0 and ratios[index - 1] > 1:
        index -= 1
    if index == 0:
        return float(lengths[0])
    if math.isinf(ratios[index]):
        return float(lengths[index])
    low, high = math.log(lengths[index - 1]), math.log(lengths[index])
    r_low, r_high = math.log(ratios[index - 1]), math.log(ratios[index])
    fraction = -r_low / (r_high - r_low)  # where log ratio = 0 on the segment
    return math.exp(low + fraction * (high - low))


def ok_rows(rows: list[dict[str, Any]], mixer: str, mode: str) -> list[dict[str, Any]]:
    """Rows of one mixer and mode that were measured, by length."""
    found = [row for row in rows if row["mixer"] == mixer and row["mode"] == mode and row["status"] == "ok"]
    return sorted(found, key=lambda row: row["seq_len"])


def exponents(rows: list[dict[str, Any]], mixer: str, mode: str, tail: int = 3) -> tuple[float | None, float | None]:
    """(slope over all measured lengths, slope over the largest `tail` lengths) of one mixer and mode."""
    measured = ok_rows(rows, mixer, mode)
    lengths = [row["seq_len"] for row in measured]
    if mode == "decode":
        times = [row["latency_ms"] for row in measured]
    else:
        times = [row["time_s"] for row in measured]
    full = fit_exponent(lengths, times) if len(lengths) >= 2 else None
    last = fit_exponent(lengths[-tail:], times[-tail:]) if len(lengths) > tail else None
    return full, last


def crossover(rows: list[dict[str, Any]], mixer: str, reference: str, mode: str) -> tuple[float | None, str]:
    """(crossover length, explanation) of `mixer` against `reference` in `mode`."""
    mine = {row["seq_len"]: row["tokens_per_s"] for row in ok_rows(rows, mixer, mode)}
    theirs = {row["seq_len"]: row["tokens_per_s"] for row in ok_rows(rows, reference, mode)}
    theirs.update({row["seq_len"]: 0.0 for row in rows if row["mixer"] == reference and row["mode"] == mode
                   and row["status"] in ("over_budget", "skipped") and row["seq_len"] in mine})
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None, "no common measured length"
    value = crossover_length(common, [mine[length] / theirs[length] if theirs[length] else math.inf
                                      for length in common])
    if value is None:
        return None, f"slower at L={common[-1]} (largest common length)"
    if value == common[0]:
        return value, f"faster at every measured length (from L={common[0]})"
    return value, f"faster from L≈{value:,.0f}"
