"""Hyena: gated long convolutions with implicit filters, with exact and distilled decoding.

Poli, Massaroli, Nguyen et al. (2023), "Hyena Hierarchy: Towards Larger Convolutional Language
Models"; distillation from Massaroli et al. (2023), "Laughing Hyena Distillery". Legend: B batch,
L new tokens, T tokens seen (history), D model width, N order, O = N - 1 long convolutions,
S = N + 1 projected streams, W short-conv width, M complex modes of a distilled filter.

    x^0, ..., x^{N-1}, v = split(ShortConv(in_proj(u)))          S streams of width D
    z = v
    for n = N-1, ..., 1:   z = h^n * (x^n . z) + D^n . (x^n . z)   (causal long convolution, FFT)
    y = out_proj(x^0 . z)

This is the reference implementation's loop; in the paper's Definition 3.1 it is the order-N
recurrence whose first filter is the short convolution (order 2 is H3's q . (h * (k . v))).

Filters h^n (seqarch/mixers/hyena_filter.py) are implicit (an MLP of positional features times a
decay) and exist for l < max_len. Two decoding modes:

- exact (default): the state keeps, for every long convolution n, its input w^n_s = x^n_s . z_s
  for all T tokens seen (history (B, O, D, T)) plus the short conv's last W - 1 projected inputs.
  A new token's convolutions are dot products with that history: O(O D T) per token, and the
  state grows with T, which is Hyena's known decoding cost.
- distilled (after `distill(d_state)`): each filter is replaced by a fitted diagonal SSM
  h_l = 2 Re(sum_m R_m lambda_m^l) with M = d_state / 2 modes; the parallel path convolves with
  its materialised kernel, and step runs the recurrence s = lambda s + w, z = 2 Re(R . s) + D w:
  O(O D M) per token with a constant state (B, O, D, M) complex.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from seqarch.mixers.base import (
    MixerState,
    SequenceMixer,
    check_input,
    check_positive,
    check_state,
    complex_dtype,
    element_size,
)
from seqarch.mixers.hyena_filter import ImplicitFilter, ModalFilter
from seqarch.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqarch.ops.fftconv import fftconv
from seqarch.ops.modal_fit import fit_modal, modal_powers, power_blocks
from seqarch.registry import register


@dataclass(frozen=True)
class HyenaConfig:
    d_model: int = 256
    order: int = 2  # N: N + 1 projected streams, N - 1 long convolutions (2 = one, as H3)
    max_len: int = 2048  # filters are defined for l < max_len; positions t = l / (max_len - 1)
    short_conv_width: int = 3  # depthwise causal conv on the projected streams (paper: 3)
    filter_emb_dim: int = 3  # positional features: t and (emb_dim - 1) / 2 cos/sin bands; odd >= 3
    filter_hidden: int = 64  # width of the filter MLP ("filter_order" in the reference code)
    filter_layers: int = 2  # inner Linear + Sin layers of the filter MLP
    sine_frequency: float = 1.0  # initial frequency w of the Sin activation (one vector shared by the MLP's Sins)
    filter_lr: float | None = 1e-3  # lr of the filter MLP (safari's HyenaFilter lr); None: the optimizer's lr
    pos_emb_lr: float = 1e-5  # lr of the trainable positional features z (safari's lr_pos_emb); 0: not trained
    fast_decay_pct: float = 0.3  # fastest channel decays to decay_target at this fraction of max_len
    slow_decay_pct: float = 1.5  # slowest channel decays to decay_target at this fraction of max_len
    decay_target: float = 1e-2  # envelope value that defines the two decay percentages

    def __post_init__(self):
        check_positive("hyena", d_model=self.d_model)
        if self.order < 2:
            raise ValueError(f"hyena: order must be >= 2 (order 2 = one long convolution), got {self.order}")
        if self.max_len < 2:
            raise ValueError(f"hyena: max_len must be >= 2, got {self.max_len}")
        if self.short_conv_width < 1:
            raise ValueError(f"hyena: short_conv_width must be >= 1, got {self.short_conv_width}")
        if self.filter_emb_dim < 3 or self.filter_emb_dim % 2 == 0:
            raise ValueError(f"hyena: filter_emb_dim must be odd and >= 3, got {self.filter_emb_dim}")
        if self.filter_hidden < 1 or self.filter_layers < 0:
            raise ValueError(f"hyena: need filter_hidden >= 1 and filter_layers >= 0, got "
                             f"{self.filter_hidden}, {self.filter_layers}")
        if not 0 < self.fast_decay_pct <= self.slow_decay_pct:
            raise ValueError(f"hyena: need 0 < fast_decay_pct <= slow_decay_pct, got "
                             f"{self.fast_decay_pct}, {self.slow_decay_pct}")
        if not 0 < self.decay_target < 1:
            raise ValueError(f"hyena: decay_target must be in (0, 1), got {self.decay_target}")
        if self.filter_lr is not None and self.filter_lr <= 0:
            raise ValueError(f"hyena: filter_lr must be positive or None, got {self.filter_lr}")
        if self.pos_emb_lr < 0:
            raise ValueError(f"hyena: pos_emb_lr must be >= 0, got {self.pos_emb_lr}")

    @property
    def n_streams(self) -> int:
        return self.order + 1

    @property
    def n_filters(self) -> int:
        return self.order - 1


@dataclass
class HyenaState(MixerState):
    """Exact decoding: grows with the tokens seen."""

    conv: torch.Tensor  # (B, S * D, W - 1) last projected inputs of the short conv
    history: torch.Tensor  # (B, O, D, T) input of each long convolution, every token seen
    position: int  # tokens seen so far


@dataclass
class HyenaModalState(MixerState):
    """Distilled decoding: constant size."""

    conv: torch.Tensor  # (B, S * D, W - 1) last projected inputs of the short conv
    modal: torch.Tensor  # (B, O, D, M) complex, the diagonal SSM state of each filter
    position: int  # tokens seen so far


@register("hyena", HyenaConfig)
class HyenaMixer(SequenceMixer):
    def __init__(self, config: HyenaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(width, config.n_streams * width, **factory)
        self.short_conv = nn.Conv1d(config.n_streams * width, config.n_streams * width, config.short_conv_width,
                                    groups=config.n_streams * width, **factory)
        self.filter: ImplicitFilter | ModalFilter = ImplicitFilter(
            config.n_filters, width, config.max_len, config.filter_emb_dim, config.filter_hidden,
            config.filter_layers, config.sine_frequency, config.fast_decay_pct, config.slow_decay_pct,
            config.decay_target, config.filter_lr, config.pos_emb_lr, **factory)
        self.skip = nn.Parameter(torch.randn(config.n_filters, width, **factory))  # D^n in h * w + D w
        self.out_proj = nn.Linear(width, width, **factory)
        self.out_proj._is_residual_projection = True  # scaled by 1/sqrt(depth) in the model init (safari)
        self.filter._no_reinit = True  # the implicit filter's MLP keeps its own init (sine, decay window)
        self._kernel_cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    # --- mode ---------------------------------------------------------------------------------
    @property
    def distilled(self) -> bool:
        """True after distill(): modal filters, constant-size recurrent state."""
        return isinstance(self.filter, ModalFilter)

    @property
    def state_grows_with_length(self) -> bool:  # a ClassVar on the base; here it depends on the mode
        return not self.distilled

    def distill(self, d_state: int = 16) -> torch.Tensor:
        """Replace each implicit filter by a diagonal SSM of real state size d_state (d_state / 2
        complex modes) fitted over l < max_len, and switch step() to the O(D d_state) recurrence.

        Returns the relative L2 error ||h - h_fit|| / ||h|| per channel, shape (order - 1, d_model).
        The fit runs in float64 (seqarch.ops.modal_fit.fit_modal); it is a one-way conversion."""
        if self.distilled:
            raise ValueError("hyena: this mixer is already distilled")
        if d_state < 2 or d_state % 2:
            raise ValueError(f"hyena: distill needs an even d_state >= 2, got {d_state}")
        implicit = self.filter
        with torch.no_grad():
            h = copy.deepcopy(implicit).double().kernel(self.config.max_len)  # (O, D, max_len)
            decay = rearrange(implicit.decay_per_step().double(), "o d -> (o d)")
        fit = fit_modal(rearrange(h, "o d l -> (o d) l"), d_state // 2, decay)
        weight = self.in_proj.weight
        self.filter = ModalFilter(fit, self.config.n_filters, device=weight.device, dtype=weight.dtype)
        self._kernel_cache = None
        return rearrange(fit.relative_error, "(o d) -> o d", o=self.config.n_filters)

    # --- filters ------------------------------------------------------------------------------
    def _check_state(self, state, batch_size: int, what: str) -> None:
        if self.distilled:
            check_state(state, HyenaModalState, batch_size, what, complex_fields=("modal",))
        else:
            check_state(state, HyenaState, batch_size, what)

    def _check_length(self, total: int, what: str) -> None:
        if total > self.config.max_len and not self.distilled:
            raise ValueError(f"hyena.{what}: {total} tokens exceed max_len={self.config.max_len}, the longest "
                             f"sequence the implicit filters are defined for; build with a larger max_len "
                             f"(or distill(), whose modal filters extend to any length)")

    def _kernels(self, length: int, reversed_taps: bool = False) -> torch.Tensor:
        """Filters (O, D, length); with reversed_taps, h[length - 1 - s] at s (what a new token's
        output needs against the history). Under no_grad both are memoised and reused until a
        parameter changes, so that step() neither reruns the filter MLP over every position nor
        flips the filter for each token. The memo grows by doubling (up to max_len for implicit
        filters), so token-by-token decoding recomputes it O(log T) times."""
        if torch.is_grad_enabled():
            kernel = self.filter.kernel(length)
            return kernel.flip(-1) if reversed_taps else kernel
        key = (tuple((p.data_ptr(), p._version, p.dtype) for p in self.filter.parameters()), type(self.filter))
        cache = self._kernel_cache
        if cache is None or cache[0] != key or cache[1].shape[-1] < length:
            grown = 2 * cache[1].shape[-1] if cache is not None and cache[0] == key else length
            if not self.distilled:
                grown = min(grown, self.config.max_len)
            cache = self._kernel_cache = (key, self.filter.kernel(max(length, grown)), None)
        if not reversed_taps:
            return cache[1][..., :length]
        if cache[2] is None:
            cache = self._kernel_cache = (key, cache[1], cache[1].flip(-1))
        flipped = cache[2]
        return flipped[..., flipped.shape[-1] - length:]

    # --- shared pieces ------------------------------------------------------------------------
    def _streams(self, x: torch.Tensor, conv_state: torch.Tensor | None):
        """x (B, L, D) -> streams (S, B, D, L) after projection and short conv (continuing from
        conv_state (B, S * D, W - 1) when given), and the new conv state (None without one)."""
        projected = rearrange(self.in_proj(x), "b l c -> b c l")
        weight, bias = rearrange(self.short_conv.weight, "c 1 w -> c w"), self.short_conv.bias
        # The eager conv: the FFT convolutions after it want (B, D, L) rows, and the compiled
        # kernel's channel-last output made Hyena's training step 1.2-1.3x slower (measured).
        streams = rearrange(causal_conv1d(projected, weight, bias, initial_states=conv_state, backend="parallel"),
                            "b (s d) l -> s b d l", s=self.config.n_streams)
        if conv_state is None:
            return streams, None
        inputs = torch.cat([conv_state.to(projected.dtype), projected], dim=-1)
        return streams, inputs[..., inputs.shape[-1] - conv_state.shape[-1]:]

    def _output(self, gate: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out_proj(rearrange(gate * z, "b d l -> b l d"))

    # --- the contract -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "hyena.forward")
        self._check_length(x.shape[1], "forward")
        streams, _ = self._streams(x, None)
        kernels = self._kernels(x.shape[1])
        z = streams[-1]
        for n in range(self.config.n_filters):
            z = fftconv(z * streams[self.config.n_filters - n], kernels[n], self.skip[n])
        return self._output(streams[0], z)

    def init_state(self, batch_size: int, device=None, dtype=None) -> HyenaState | HyenaModalState:
        cfg = self.config
        factory = self.state_factory(device, dtype)
        device, dtype = factory["device"], factory["dtype"]
        conv = torch.zeros(batch_size, cfg.n_streams * cfg.d_model, cfg.short_conv_width - 1, device=device,
                           dtype=dtype)
        if self.distilled:
            modal = torch.zeros(batch_size, cfg.n_filters, cfg.d_model, self.filter.n_modes, device=device,
                                dtype=complex_dtype(dtype))
            return HyenaModalState(conv=conv, modal=modal, position=0)
        history = torch.zeros(batch_size, cfg.n_filters, cfg.d_model, 0, device=device, dtype=dtype)
        return HyenaState(conv=conv, history=history, position=0)

    def prefill(self, x: torch.Tensor, state):
        check_input(x, self.d_model, 3, "hyena.prefill")
        self._check_state(state, x.shape[0], "hyena.prefill")
        self._check_length(state.position + x.shape[1], "prefill")
        streams, conv = self._streams(x, state.conv)
        if self.distilled:
            z, modal = self._prefill_modal(streams, state.modal)
            return self._output(streams[0], z), HyenaModalState(conv=conv.to(state.conv.dtype), modal=modal,
                                                                 position=state.position + x.shape[1])
        past = state.position
        kernels = self._kernels(past + x.shape[1])
        z = streams[-1]
        inputs = []
        for n in range(self.config.n_filters):
            w = torch.cat([state.history[:, n].to(z.dtype), z * streams[self.config.n_filters - n]], dim=-1)
            inputs.append(w.to(state.history.dtype))
            z = fftconv(w, kernels[n], self.skip[n])[..., past:]  # all T inputs, keep the new outputs
        new_state = HyenaState(conv=conv.to(state.conv.dtype), history=torch.stack(inputs, dim=1),
                               position=past + x.shape[1])
        return self._output(streams[0], z), new_state

    def _prefill_modal(self, streams: torch.Tensor, modal: torch.Tensor):
        """Distilled prefill: FFT conv with the modal kernel, plus the initial state decaying into
        the chunk (z_t += 2 Re(R . lambda^(t+1) s0)), and the final state
        s_L = lambda^L s0 + sum_s lambda^(L-1-s) w_s."""
        length = streams.shape[-1]
        kernels = self._kernels(length)
        residue, log_rate, angle = self.filter.complex_residue(), self.filter.log_rate, self.filter.angle
        z = streams[-1]
        finals = []
        for n in range(self.config.n_filters):
            w = z * streams[self.config.n_filters - n]  # (B, D, L)
            s0 = modal[:, n].to(residue.dtype)  # (B, D, M)
            z = fftconv(w, kernels[n], self.skip[n])
            final = s0 * modal_powers(log_rate[n], angle[n], torch.tensor([length], device=w.device))[..., 0]
            contributions = []
            for start, stop in power_blocks(residue[n].numel(), length):
                into = modal_powers(log_rate[n], angle[n], torch.arange(start + 1, stop + 1, device=w.device))
                contributions.append(2 * torch.einsum("bdm,dm,dmp->bdp", s0, residue[n], into).real)
                back = modal_powers(log_rate[n], angle[n], torch.arange(length - 1 - start, length - 1 - stop, -1,
                                                                        device=w.device))
                final = final + torch.einsum("bdp,dmp->bdm", w[..., start:stop].to(residue.dtype), back)
            z = z + torch.cat(contributions, dim=-1).to(z.dtype)
            finals.append(final.to(modal.dtype))
        return z, torch.stack(finals, dim=1)

    def step(self, x_t: torch.Tensor, state):
        check_input(x_t, self.d_model, 2, "hyena.step")
        self._check_state(state, x_t.shape[0], "hyena.step")
        self._check_length(state.position + 1, "step")
        cfg = self.config
        projected = self.in_proj(x_t)  # (B, S * D)
        weight = rearrange(self.short_conv.weight, "c 1 w -> c w")
        streams, conv = causal_conv1d_update(projected, state.conv.to(projected.dtype), weight, self.short_conv.bias)
        streams = rearrange(streams, "b (s d) -> s b d", s=cfg.n_streams)
        z = streams[-1]
        if self.distilled:
            poles, residue = self.filter.poles(), self.filter.complex_residue()
            modal = []
            for n in range(cfg.n_filters):
                w = z * streams[cfg.n_filters - n]
                s = poles[n] * state.modal[:, n].to(poles.dtype) + w[..., None].to(poles.dtype)  # (B, D, M)
                z = 2 * (residue[n] * s).sum(-1).real.to(w.dtype) + self.skip[n] * w
                modal.append(s.to(state.modal.dtype))
            new_state = HyenaModalState(conv=conv.to(state.conv.dtype), modal=torch.stack(modal, dim=1),
                                        position=state.position + 1)
        else:
            seen = state.position + 1
            taps = self._kernels(seen, reversed_taps=True)
            history = torch.empty(*state.history.shape[:-1], seen, dtype=state.history.dtype,
                                  device=state.history.device)  # (B, O, D, T + 1), one copy of the past
            history[..., :-1] = state.history
            for n in range(cfg.n_filters):
                w = z * streams[cfg.n_filters - n]
                history[:, n, :, -1] = w
                # z_t = sum_s h[t - s] w_s: the history against the reversed filter taps.
                z = torch.linalg.vecdot(history[:, n].to(w.dtype), taps[n]) + self.skip[n] * w  # (B, D)
            new_state = HyenaState(conv=conv.to(state.conv.dtype), history=history, position=seen)
        return self.out_proj(streams[0] * z), new_state

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting) at context `seq_len`:
        the short conv over the S streams (2 S D W), per long filter the gate (D) and either the
        exact convolution of the history with the memoised taps (2 L D) or, once distilled, the
        modal step (complex multiply-add 8 and 2 Re(R s) 4 per mode: 12 D M). The filter MLP is
        not counted: decoding memoises its taps."""
        cfg = self.config
        short = 2 * cfg.n_streams * self.d_model * cfg.short_conv_width
        per_filter = 12 * self.d_model * self.filter.n_modes if self.distilled else 2 * seq_len * self.d_model
        return short + cfg.n_filters * (self.d_model + per_filter)

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = element_size(dtype)
        conv = batch_size * cfg.n_streams * cfg.d_model * (cfg.short_conv_width - 1) * element
        if self.distilled:
            complex_bytes = element_size(complex_dtype(dtype))
            return conv + batch_size * cfg.n_filters * cfg.d_model * self.filter.n_modes * complex_bytes
        return conv + batch_size * cfg.n_filters * cfg.d_model * seq_len * element
