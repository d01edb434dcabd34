"""Hyena's long filters: the implicit (MLP) filter it trains with, and the modal filter it distils to.

Poli, Massaroli, Nguyen et al. (2023), "Hyena Hierarchy: Towards Larger Convolutional Language
Models", section 3.3; Massaroli et al. (2023), "Laughing Hyena Distillery". Legend: O long
convolutions (order - 1), D channels per convolution, L length, F positional features,
H hidden width of the filter MLP, M complex modes.

Implicit filter, as safari's `HyenaFilter` (HazyResearch/safari, src/models/sequence/hyena.py:
`PositionalEmbedding`, `Sin`, `ExponentialModulation`), for positions l < max_len with
t_l = l / (max_len - 1) in [0, 1]:

    z_l = [t_l, cos(2 pi f_k l / max_len), -sin(2 pi f_k l / max_len)]_k   (F = 1 + 2 bands; the initial z)
    h_l = Linear(Sin(Linear(... Sin(Linear(z_l)))))  * exp(-t_l |delta_c|)   (O * D channels)

z is a trainable parameter (1, max_len, F), initialised to the features above and trained with its
own learning rate (safari's lr_pos_emb); t and the decays are fixed. Sin(x) = sin(w * x) with one
learnable frequency vector w (one entry per hidden unit) shared by every Sin of the MLP (safari builds
one `Sin` module and reuses it). The filter's tensors carry safari's optimizer tags, `_optim =
{"lr": ..., "weight_decay": 0.0}`, which seqarch.train's parameter groups honour. The decay rates
|delta_c| are spread linearly over the channels between log(target) / slow_pct and log(target) /
fast_pct, so channel c has fallen to `target` after a fraction between fast_pct and slow_pct of
max_len. Channels are laid out as safari's: c = d * O + o for long convolution o, model channel d.

Modal filter: h_l = 2 Re(sum_m R_m lambda_m^l) (seqarch/ops/modal_fit.py), the impulse response
of a diagonal recurrence, defined for every l.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from seqarch.ops.modal_fit import ModalFit, modal_kernel


class Sin(nn.Module):
    """sin(w * x) with a learnable frequency per feature, w of shape (1, width) (the paper's filter activation)."""

    def __init__(self, width: int, frequency: float, device=None, dtype=None):
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, width), frequency, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


def positional_features(max_len: int, emb_dim: int, length: int | None = None, device=None,
                        dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Hyena's positional features z (L, F) and normalised positions t (L, 1) for l < length (default
    max_len): t_l = l / (max_len - 1), then cos and -sin of 2 pi f_k l / max_len for (F - 1) / 2 bands
    f_k spaced linearly from 1e-4 to bands - 1 (safari's `PositionalEmbedding`)."""
    length = max_len if length is None else length
    positions = torch.arange(length, device=device, dtype=torch.float64)
    t = positions / (max_len - 1)
    bands = (emb_dim - 1) // 2
    frequencies = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=torch.float64)
    angle = 2 * math.pi * positions[:, None] * frequencies / max_len  # (L, bands)
    z = torch.cat([t[:, None], torch.cos(angle), -torch.sin(angle)], dim=-1)
    return z.to(dtype), t[:, None].to(dtype)


class ImplicitFilter(nn.Module):
    """Trainable positional features -> MLP with one shared sine activation -> exponential decay: kernel (O, D, L)."""

    # Its Linear layers map positions to filter taps, not tokens to features: FLOP accounting
    # (seqarch.bench.accounting) does not charge them per token.
    per_token_weights = False

    def __init__(self, n_filters: int, channels: int, max_len: int, emb_dim: int, hidden: int, layers: int,
                 sine_frequency: float, fast_decay_pct: float, slow_decay_pct: float, decay_target: float,
                 filter_lr: float | None = None, pos_emb_lr: float = 0.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.n_filters, self.channels, self.max_len, self.emb_dim = n_filters, channels, max_len, emb_dim
        z, _ = positional_features(max_len, emb_dim, device=device)
        z = z.to(dtype or torch.get_default_dtype())[None]  # (1, max_len, F), safari's shape
        if pos_emb_lr == 0.0:  # safari registers z as a buffer when its lr is 0
            self.register_buffer("z", z)
        else:
            self.z = nn.Parameter(z)
            self.z._optim = {"lr": pos_emb_lr, "weight_decay": 0.0}
            self.z._no_weight_decay = True
        # One module, so one frequency vector, applied after every Linear (safari reuses its `act`).
        activation = Sin(hidden, sine_frequency, **factory)
        modules: list[nn.Module] = [nn.Linear(emb_dim, hidden, **factory), activation]
        for _ in range(layers):
            modules += [nn.Linear(hidden, hidden, **factory), activation]
        modules.append(nn.Linear(hidden, n_filters * channels, bias=False, **factory))
        self.mlp = nn.Sequential(*modules)
        # Filter weights are not decayed and may have their own lr, as in safari (HyenaFilter lr, wd=0).
        for param in self.mlp.parameters():
            param._no_weight_decay = True
            param._optim = {"weight_decay": 0.0} if filter_lr is None else {"lr": filter_lr, "weight_decay": 0.0}
        self.slowest = abs(math.log(decay_target) / slow_decay_pct)
        self.fastest = abs(math.log(decay_target) / fast_decay_pct)

    def decay(self) -> torch.Tensor:
        """Envelope rates |delta_c| per unit t, (O * D,) in float64 with c = d * O + o, slowest first.
        Computed rather than stored, so a module cast to float64 keeps them exact."""
        return torch.linspace(self.slowest, self.fastest, self.n_filters * self.channels, dtype=torch.float64,
                              device=self.mlp[0].weight.device)

    def decay_per_step(self) -> torch.Tensor:
        """The envelope's decay rate per position, (O, D): envelope exp(-rate * l)."""
        return rearrange(self.decay() / (self.max_len - 1), "(d o) -> o d", o=self.n_filters)

    def features(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (trained) positional features z (L, F) and normalised positions t (L, 1) for l < length."""
        _, t = positional_features(self.max_len, self.emb_dim, length, self.z.device, self.z.dtype)
        return self.z[0, :length], t

    def kernel(self, length: int) -> torch.Tensor:
        """The filters h (O, D, length), length <= max_len."""
        z, t = self.features(length)
        h = self.mlp(z) * torch.exp(-t * self.decay().to(t.dtype))  # (L, O * D)
        return rearrange(h, "l (d o) -> o d l", o=self.n_filters)


class ModalFilter(nn.Module):
    """h_l = 2 Re(sum_m R_m lambda_m^l) per channel, lambda = exp(-exp(log_rate) + i angle): kernel (O, D, L).

    Built by HyenaMixer.distill from a fitted implicit filter. The poles and residues stay
    trainable (a distilled model can be fine-tuned); poles are excluded from weight decay."""

    def __init__(self, fit: ModalFit, n_filters: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}

        def shaped(tensor):
            return rearrange(tensor, "(o d) ... -> o d ...", o=n_filters).to(**factory)

        self.log_rate = nn.Parameter(shaped(fit.log_rate))  # (O, D, M)
        self.angle = nn.Parameter(shaped(fit.angle))  # (O, D, M)
        # Residues as (real, imag) pairs so optimizers see real tensors.
        self.residue = nn.Parameter(shaped(torch.view_as_real(fit.residue)))  # (O, D, M, 2)
        self.log_rate._no_weight_decay = True
        self.angle._no_weight_decay = True

    @property
    def n_modes(self) -> int:
        return self.angle.shape[-1]

    def complex_residue(self) -> torch.Tensor:
        return torch.view_as_complex(self.residue.contiguous())  # (O, D, M)

    def poles(self) -> torch.Tensor:
        """lambda (O, D, M) complex."""
        return torch.polar(torch.exp(-self.log_rate.exp()), self.angle)

    def kernel(self, length: int) -> torch.Tensor:
        """The filters h (O, D, length), any length."""
        return modal_kernel(self.log_rate, self.angle, self.complex_residue(), length)
