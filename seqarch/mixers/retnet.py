"""RetNet: multi-scale retention (MSR), as torchscale 0.3.0's `MultiScaleRetention` computes it.

Sun et al. (2023), "Retentive Network: A Successor to Transformer for Large Language Models",
section 2.2; the reference implementation is torchscale (torchscale/component/multiscale_retention.py,
the decays and rotation angles in torchscale/architecture/retnet.py `RetNetRelPos`). Legend: B batch,
L length, D model width, H heads, K query/key head dim (= D / H), V value head dim (= value_factor * D / H).

    q, k = Rot(x W_Q), Rot(x W_K)  per head,    v = x W_V
    raw_n = s Σ_{m<=n} γ^(n-m) (q_n·k_m) v_m     γ_h = 1 - 2^(-5-h), s = K^-1/2 (seqarch.ops.retention)
    r_n   = s Σ_{m<=n} γ^(n-m) (q_n·k_m)         the score row sum (no gradient, as in torchscale)
    c_n   = Σ_{m<=n} γ^(n-m)                     the decay-mask row sum
    o_n = raw_n / max(|r_n|, sqrt(c_n))          decay rows / sqrt(c_n), scores / max(|row sum|, 1)
    y = (swish(x W_G) ⊙ RMSNorm_head(o)) W_O     RMS norm over each head's V channels, no affine

Rot is torchscale's rotation: channel pairs (2i, 2i+1) turned by n θ_i, θ_i = base^(-i / (K/2 - 1)).
The two normalisations are torchscale's parallel form. They are per-(head, token) scalars, but the
RMS norm's eps makes them matter: at torchscale's initial weight scale the mean square of o is within
a few decades of eps. r_n is retention with v = 1, so every form carries one extra value column
(Σ γ^(n-m) k_m) and the chunkwise, parallel and recurrent forms and one decoding step all compute
the parallel form's function exactly; c_n depends only on the absolute position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqarch.backends import check_backend
from seqarch.mixers.base import MixerState, SequenceMixer, check_input, check_positive, check_state, element_size
from seqarch.ops.retention import BACKENDS, Backend, default_log_decay, describe_backend, retention, retention_step
from seqarch.registry import register


def rotation_angles(key_dim: int, base: float, device=None) -> torch.Tensor:
    """torchscale's RetNet rotation angles θ_i = base^(-i / (K/2 - 1)), i = 0..K/2-1 (`RetNetRelPos`:
    1 / base^linspace(0, 1, K/2)): (K/2,) float64."""
    return base ** -torch.linspace(0, 1, key_dim // 2, dtype=torch.float64, device=device)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn channel pairs (2i, 2i+1) of x (B, H, L, K) by the angles whose cos, sin are (L, K/2)
    (torchscale's `theta_shift` with `rotate_every_two`)."""
    pairs = rearrange(x, "... (k two) -> ... k two", two=2)
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rearrange(turned, "... k two -> ... (k two)")


@dataclass(frozen=True)
class RetNetConfig:
    d_model: int = 256
    n_heads: int | None = None  # retention heads; None: d_model // 64, at least 1 (paper: head dim 256)
    value_factor: int = 2  # value and gate width = value_factor * d_model, as in the paper
    decay: tuple[float, ...] | None = None  # per-head γ in (0, 1); None: 1 - 2^(-5-h)
    rope_base: float = 10000.0  # base of the q/k rotation angles base^(-i / (K/2 - 1)), as torchscale
    backend: Backend = "auto"  # training / prefill form ("auto" = "chunked"); all exact; see ops/retention.py
    chunk_size: int = 64  # chunkwise form's chunk; fastest of 16..256 on CPU (benchmarks/bench_retention.py)
    norm_eps: float = 1e-6  # eps of the per-head RMS norm (torchscale's layernorm_eps)
    bias: bool = False  # biases in the q/k/v/gate/output projections

    _renamed: ClassVar[dict[str, str]] = {"mode": "backend"}  # accepted for one release, as are the old values:
    _renamed_values: ClassVar[dict[str, dict[str, str]]] = {"backend": {"chunkwise": "chunked"}}

    def __post_init__(self):
        check_positive("retnet", d_model=self.d_model, n_heads=self.n_heads)
        if self.heads < 1 or self.d_model % self.heads:
            raise ValueError(f"retnet: d_model={self.d_model} is not divisible by n_heads={self.heads}")
        if self.key_dim % 2:
            raise ValueError(f"retnet: RoPE needs an even head dim, got d_model / n_heads = {self.key_dim}")
        if self.value_factor < 1:
            raise ValueError(f"retnet: value_factor must be >= 1, got {self.value_factor}")
        if self.decay is not None:
            if len(self.decay) != self.heads:
                raise ValueError(f"retnet: decay needs one γ per head ({self.heads}), got {len(self.decay)}")
            if not all(0 < gamma < 1 for gamma in self.decay):
                raise ValueError(f"retnet: every decay γ must lie in (0, 1), got {self.decay}")
        check_backend("retnet", self.backend, BACKENDS)
        if self.chunk_size < 1:
            raise ValueError(f"retnet: chunk_size must be >= 1, got {self.chunk_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"retnet: norm_eps must be positive, got {self.norm_eps}")

    @property
    def heads(self) -> int:
        return self.n_heads if self.n_heads is not None else max(1, self.d_model // 64)

    @property
    def key_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def value_width(self) -> int:
        return self.value_factor * self.d_model

    @property
    def value_dim(self) -> int:
        return self.value_width // self.heads


@dataclass
class RetNetState(MixerState):
    retention: torch.Tensor  # (B, H, K, V + 1): S after the tokens seen so far; last column Σ γ^(t-m) k_m
    position: int  # tokens seen so far = absolute position of the next token (for RoPE)


@register("retnet", RetNetConfig)
class RetNetMixer(SequenceMixer):
    def __init__(self, config: RetNetConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.d_model = width = config.d_model
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(width, width, bias=config.bias, **factory)
        self.k_proj = nn.Linear(width, width, bias=config.bias, **factory)
        self.v_proj = nn.Linear(width, config.value_width, bias=config.bias, **factory)
        self.g_proj = nn.Linear(width, config.value_width, bias=config.bias, **factory)
        self.out_proj = nn.Linear(config.value_width, width, bias=config.bias, **factory)
        # torchscale 0.3.0 (MultiScaleRetention.reset_parameters): Xavier-uniform, gain 2^-2.5 for
        # q, k, v, g and gain 1 for W_O. The per-head RMS norm has no parameters.
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.out_proj):
            proj._no_reinit = True  # the model init keeps torchscale's gains; W_O is also a residual projection
        self.out_proj._is_residual_projection = True

    def _project(self, x: torch.Tensor, start: int):
        """x (B, L, D) at absolute positions start.. -> q, k (B, H, L, K), v (B, H, L, V), gate (B, L, H V)."""
        heads = self.config.heads
        q = rearrange(self.q_proj(x), "b l (h k) -> b h l k", h=heads)
        k = rearrange(self.k_proj(x), "b l (h k) -> b h l k", h=heads)
        v = rearrange(self.v_proj(x), "b l (h v) -> b h l v", h=heads)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        angles = rotation_angles(self.config.key_dim, self.config.rope_base, x.device)
        angle = positions.to(compute)[:, None] * angles.to(compute)  # (L, K/2)
        cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)
        return rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin), v, F.silu(self.g_proj(x))

    def _output(self, retained: torch.Tensor, start: int, gate: torch.Tensor) -> torch.Tensor:
        """retained (B, H, L, V + 1) = [raw, r] at absolute positions start.., gate (B, L, H V) -> (B, L, D):
        o = raw / max(|r|, sqrt(c)), RMS norm per head and token, gate, W_O."""
        raw, row_sum = retained[..., :-1], retained[..., -1:].detach()
        length = raw.shape[2]
        positions = torch.arange(start + 1, start + length + 1, device=raw.device, dtype=torch.float64)
        # c_n = Σ_{m<=n} γ^m = (1 - γ^(n+1)) / (1 - γ), in float64 from log γ.
        log_gamma = self._log_decay(raw.device)[:, None]
        mask_sum = torch.expm1(positions * log_gamma) / torch.expm1(log_gamma)  # (H, L)
        denominator = torch.maximum(row_sum.abs(), mask_sum.sqrt().to(raw.dtype)[..., None])  # (B, H, L, 1)
        out = raw / denominator
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
        return self.out_proj(rearrange(out, "b h l v -> b l (h v)") * gate)

    def _log_decay(self, device) -> torch.Tensor:
        """log γ (H,) in float64 (not a buffer, so a float32 or bfloat16 model keeps decays near 1 exact)."""
        if self.config.decay is None:
            return default_log_decay(self.config.heads, device)
        return torch.tensor(self.config.decay, dtype=torch.float64, device=device).log()

    def _retain(self, q, k, v, state: torch.Tensor | None, output_final_state: bool):
        """Retention of [v, 1]: the extra value column is the score row sum r and its state Σ γ^(t-m) k_m."""
        cfg = self.config
        values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # (B, H, L, V + 1)
        return retention(q, k, values, decay=self._log_decay(q.device).exp(), backend=cfg.backend,
                         chunk_size=cfg.chunk_size, initial_state=state, output_final_state=output_final_state)

    def describe_paths(self, device: torch.device | str = "cpu") -> str:
        return "retention " + describe_backend(self.config.backend, device) + "; recurrent step"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, 3, "retnet.forward")
        q, k, v, gate = self._project(x, 0)
        out, _ = self._retain(q, k, v, None, False)
        return self._output(out, 0, gate)

    def init_state(self, batch_size: int, device=None, dtype=None) -> RetNetState:
        cfg = self.config
        zeros = torch.zeros(batch_size, cfg.heads, cfg.key_dim, cfg.value_dim + 1, **self.state_factory(device, dtype))
        return RetNetState(retention=zeros, position=0)

    def prefill(self, x: torch.Tensor, state: RetNetState) -> tuple[torch.Tensor, RetNetState]:
        check_input(x, self.d_model, 3, "retnet.prefill")
        check_state(state, RetNetState, x.shape[0], "retnet.prefill")
        q, k, v, gate = self._project(x, state.position)
        out, final = self._retain(q, k, v, state.retention.to(q.dtype), True)
        new_state = RetNetState(retention=final.to(state.retention.dtype), position=state.position + x.shape[1])
        return self._output(out, state.position, gate), new_state

    def step(self, x_t: torch.Tensor, state: RetNetState) -> tuple[torch.Tensor, RetNetState]:
        check_input(x_t, self.d_model, 2, "retnet.step")
        check_state(state, RetNetState, x_t.shape[0], "retnet.step")
        q, k, v, gate = self._project(x_t.unsqueeze(1), state.position)
        values = torch.cat([v[:, :, 0], v.new_ones(*v.shape[:2], 1)], dim=-1)  # (B, H, V + 1)
        out, retained = retention_step(q[:, :, 0], k[:, :, 0], values, state.retention.to(q.dtype),
                                       decay=self._log_decay(q.device).exp())
        new_state = RetNetState(retention=retained.to(state.retention.dtype), position=state.position + 1)
        return self._output(out.unsqueeze(2), state.position, gate).squeeze(1), new_state

    def state_nbytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        cfg = self.config
        element = element_size(dtype)
        return batch_size * cfg.heads * cfg.key_dim * (cfg.value_dim + 1) * element

    def flops_per_token(self, seq_len: int) -> int:
        """Decode FLOPs beyond the Linear weights (seqarch.bench.accounting): the retention step, per
        (head, key, value column) S = γ S + k v and o += q S (5 H K (V + 1), the extra column is the score
        row sum), and the normalisations (about 6 H V); independent of the context length."""
        cfg = self.config
        return 5 * cfg.heads * cfg.key_dim * (cfg.value_dim + 1) + 6 * cfg.heads * cfg.value_dim



RetNet = RetNetMixer  # the class's earlier name, kept as an alias for one release
