"""S4D specifics: the kernel is the ZOH-discretised impulse response; initialisations."""

from __future__ import annotations

import math

import pytest
import torch

from seqarch import build_mixer
from tests.tolerance import assert_close


def test_kernel_matches_zoh_definition_and_long_lengths():
    mixer = build_mixer("s4d", d_model=4, d_state=8).double()
    length = 3000
    kernel = mixer.kernel(length)
    dt = mixer.log_dt.exp()[:, None]
    A = torch.complex(-mixer.log_A_real.exp(), mixer.A_imag)
    C = torch.view_as_complex(mixer.C.contiguous())
    dA, dB = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A
    h = torch.zeros(4, 4, dtype=torch.complex128)
    expected = []
    for t in range(length):
        h = dA * h + dB * (1.0 if t == 0 else 0.0)  # impulse response by the recurrence
        expected.append(2 * (C * h).sum(-1).real)
    assert_close(kernel, torch.stack(expected, -1), "s4d kernel vs impulse response")


def test_float32_kernel_keeps_phase_at_16k():
    mixer = build_mixer("s4d", d_model=2, d_state=64, init="lin")
    with torch.no_grad():
        mixer.log_dt.fill_(math.log(1e-3))  # slow decay: the kernel is still large at l = 16k
        k32 = mixer.kernel(16384)
        k64 = mixer.double().kernel(16384)
    assert_close(k32, k64.float(), "float32 kernel at 16k", dtype=torch.float32, tolerance=1e-4)


def s4_inv_imag(state_size: int) -> list[float]:
    """S4D-Inv's imaginary parts as the S4 code evaluates them (state-spaces/s4,
    src/models/sequence/kernels/dplr.py, `dplr(init="inv", N=state_size)`): N / pi * (N / (1 + 2n) - 1)
    with N the full state size, for the N // 2 modes n = 0 .. N//2 - 1 it keeps."""
    return [state_size / math.pi * (state_size / (1 + 2 * n) - 1) for n in range(state_size // 2)]


def test_inv_init_is_s4s():
    for d_state in (2, 8, 64):
        inv = build_mixer("s4d", d_model=3, d_state=d_state, init="inv")
        expected = torch.tensor(s4_inv_imag(d_state), dtype=torch.float64).expand(3, -1)
        assert_close(inv.A_imag.double(), expected, f"S4D-Inv imag(A), d_state={d_state}", dtype=torch.float32)
    # The value quoted in issue 13: d_state 64, n = 0 gives 64/pi * 63 = 1283.4 (not 315.8 with N = 32).
    assert build_mixer("s4d", d_state=64).A_imag[0, 0].item() == pytest.approx(1283.4, abs=0.05)


def test_initialisations():
    lin = build_mixer("s4d", d_model=2, d_state=8, init="lin")
    n = torch.arange(4, dtype=torch.float32)
    assert_close(lin.A_imag[0], math.pi * n, "S4D-Lin imag(A)")
    assert_close(-lin.log_A_real.exp(), torch.full((2, 4), -0.5), "real(A) = -1/2")
    dt = lin.log_dt.exp()
    assert (dt >= 1e-3).all() and (dt <= 1e-1).all()


def test_choices_and_sizes_are_checked():
    with pytest.raises(ValueError, match="config key 'init' for mixer 's4d' must be 'inv' \\| 'lin', got 'legs'"):
        build_mixer("s4d", d_model=8, init="legs")
    with pytest.raises(ValueError, match="s4d: d_model must be >= 1, got 0"):
        build_mixer("s4d", d_model=0)


def test_step_refuses_a_state_of_another_batch_size():
    """A batch-1 state is not broadcast over a batch of 2 (issue #18 item 8)."""
    mixer = build_mixer("s4d", d_model=8)
    with pytest.raises(ValueError, match="s4d.step: the state holds a batch of 1, the input a batch of 2"):
        mixer.step(torch.randn(2, 8), mixer.init_state(1))
