"""Inputs and gradient runs shared by the Mamba-3 scan tests (tests/test_mamba3_scan.py at tiny sizes,
tests/test_mamba3_compiled.py at sizes that reach the kernel's vector tiles)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from seqarch.ops.mamba3 import Mamba3ScanState


class Sizes(NamedTuple):
    batch: int
    heads: int
    headdim: int
    groups: int
    dstate: int
    angles: int


def scan_inputs(sizes: Sizes, length: int, dtype, rank: int = 1, seed: int = 0, initial_state: bool = False) -> dict:
    """Random inputs at the scales the mixer feeds the op: dt = softplus(.) around 0.3 (with a tail),
    A = -(1 + |.|) as the heavy-tail activation gives, RMS-normed B/C plus biases near 1,
    trapezoid weights in (0, 1), angular velocities tanh(.) * pi; optionally a carried-in state."""
    BATCH, HEADS, HEADDIM, GROUPS, DSTATE, ANGLES = sizes  # noqa: N806 (the test files' names)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    bc_shape = (BATCH, length, GROUPS, DSTATE) if rank == 1 else (BATCH, length, rank, GROUPS, DSTATE)
    inputs = {
        "x": randn(BATCH, length, HEADS, HEADDIM),
        "dt": F.softplus(randn(BATCH, length, HEADS) - 1),
        "A": -(1 + randn(BATCH, length, HEADS).abs()),
        "B": F.rms_norm(randn(*bc_shape), (DSTATE,)),
        "C": F.rms_norm(randn(*bc_shape), (DSTATE,)),
        "trap": torch.sigmoid(randn(BATCH, length, HEADS)),
        "angles": torch.tanh(randn(BATCH, length, HEADS, ANGLES)) * math.pi,
        "D": randn(HEADS),
        "z": randn(BATCH, length, HEADS, HEADDIM),
        "B_bias": 1 + 0.3 * randn(HEADS, rank, DSTATE),
        "C_bias": 1 + 0.3 * randn(HEADS, rank, DSTATE),
    }
    if rank > 1:
        inputs.update(mimo_x=randn(HEADS, rank, HEADDIM), mimo_z=randn(HEADS, rank, HEADDIM),
                      mimo_o=randn(HEADS, rank, HEADDIM))
    if initial_state:
        inputs["initial_state"] = Mamba3ScanState(
            angle=torch.rand(BATCH, HEADS, ANGLES, generator=gen, dtype=dtype) * 2 * math.pi,
            ssm=randn(BATCH, HEADS, HEADDIM, DSTATE), k=randn(BATCH, rank, HEADS, DSTATE),
            x=randn(BATCH, HEADS, HEADDIM))
    return inputs


def run_with_grads(fn, inputs: dict, **options):
    """Output, final state and the gradient of every floating input under fixed random cotangents."""
    leaves = {}
    for name, value in inputs.items():
        if name == "initial_state":
            leaves[name] = Mamba3ScanState(*(t.detach().clone().requires_grad_(True) for t in value))
        else:
            leaves[name] = value.detach().clone().requires_grad_(True)
    y, final = fn(**leaves, output_final_state=True, **options)
    gen = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    # The angle is wrapped to [0, 2 pi), so only its cos / sin are smooth: weight those.
    loss = loss + (torch.cos(final.angle) * torch.randn(final.angle.shape, generator=gen, dtype=y.dtype)).sum()
    for tensor in (final.ssm, final.k, final.x):
        loss = loss + (tensor * torch.randn(tensor.shape, generator=gen, dtype=y.dtype)).sum()
    loss.backward()
    grads = {}
    for name, leaf in leaves.items():
        if name == "initial_state":
            fields = zip(Mamba3ScanState._fields, leaf, strict=True)
            grads.update({f"initial_state.{field}": t.grad for field, t in fields})
        else:
            grads[name] = leaf.grad
    return y, final, grads
