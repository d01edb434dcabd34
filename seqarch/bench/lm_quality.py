"""Language-model quality at matched size: every mixer at three parameter counts on the same bytes.

Legend: d model width (d_model), h SwiGLU hidden width, L window length (bytes), B batch, N parameters.

Each mixer is trained from scratch as a byte-level SeqLM (vocabulary 256, tied embedding, seqarch's
default block: mixer + SwiGLU) on the embedded corpus, the installed Python standard library
(seqarch.data.text.stdlib_corpus: no download, the same bytes on every machine with the same Python),
and scored by validation bits per byte. Three sizes are the reference mixer's (attention's) parameter
counts at three widths; every other mixer is matched to each within `match_tolerance` (5%) by
`match_size`: the valid width closest to the target from below or above (as `match_params` of the speed
benchmark chooses widths), then the SwiGLU hidden width that brings the total to the target (a mixer's
projections come in coarse steps, e.g. Mamba-2's heads of 32 channels; the MLP absorbs the remainder).

Every run of every mixer reads the same token stream: `steps` batches of B windows of L + 1 bytes at
offsets drawn once from `data_seed` (independent of the mixer, the lr and the weight seed), so tokens
seen = steps x B x L for all; each run records the SHA-256 of the bytes it trained on to prove it.
The learning rate is tuned per mixer at the smallest size (the lr with the lowest validation bits per
byte over `lrs`, first seed) and reused at the two larger sizes (a simplification: larger models usually
want a smaller lr, so the larger sizes are, if anything, under-tuned for every mixer alike).

Like the MQAR sweep (seqarch.bench.quality), every run is cached as <out>/runs/<key>.json the moment it
finishes and skipped on rerun; `budget_s` stops starting new runs, and a larger size of a mixer waits
until its lr is tuned. The report (lm_quality.md, bpb_vs_params.png) says what is done.

    rows = run_lm_quality(lm_quality_settings("quick"))
    write_lm_quality_report(rows, settings, Path("benchmarks/results/quality/lm/quick"))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seqarch.bench.quality import finite_or_null
from seqarch.data.text import BYTE_VOCAB, stdlib_corpus, unigram_bits_per_byte
from seqarch.models.block import build_block
from seqarch.models.mlp import swiglu_hidden_size
from seqarch.registry import list_mixers


@dataclass(frozen=True)
class LMQualitySettings:
    mixers: tuple[str, ...] = ()  # registry names; empty: every registered mixer
    reference: str = "attention"  # the sizes are this mixer's parameter counts at `reference_widths`
    reference_widths: tuple[int, ...] = (64, 128, 192)  # three sizes: ~0.22M, 0.82M, 1.8M parameters at 4 layers
    n_layers: int = 4
    match_tolerance: float = 0.05  # |params / target - 1| allowed; a mixer that cannot get closer is an error row
    seq_len: int = 256  # window L (bytes)
    batch_size: int = 16  # windows per step
    steps: int = 1500  # optimizer steps; tokens seen = steps x batch_size x seq_len for every run
    lrs: tuple[float, ...] = (1e-3, 2.2e-3, 4.6e-3)  # peak lrs tried at the smallest size, per mixer
    seeds: tuple[int, ...] = (0,)  # weight seeds (the data order is `data_seed`'s, the same for all)
    warmup_steps: int = 100  # linear warmup, then cosine to 10% of the peak at `steps`
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # AdamW; not on norms, biases and other 1-D parameters
    grad_clip: float = 1.0  # max gradient norm; 0: off
    data_seed: int = 0  # draws the training offsets
    val_percent: float = 5.0  # standard-library files held out (by path hash) for validation
    val_windows: int = 256  # validation windows of L bytes spread evenly over the held-out stream, all scored
    log_every: int = 100  # steps between recorded training losses
    threads: int = 1  # torch threads
    budget_s: float = 0.0  # stop starting new runs after this many seconds (0: none)
    out: str = "lm_quality_results"  # <out>/runs/<key>.json per finished run

    def __post_init__(self):
        registered = list_mixers()
        unknown = [name for name in (*self.mixers, self.reference) if name not in registered]
        if unknown:
            raise ValueError(f"lm_quality: unknown mixer {unknown[0]!r}; registered mixers: {', '.join(registered)}")
        if len(self.reference_widths) < 1 or list(self.reference_widths) != sorted(set(self.reference_widths)):
            raise ValueError(f"lm_quality: reference_widths must be increasing and distinct, got "
                             f"{list(self.reference_widths)}")
        if not self.lrs or min(self.lrs) <= 0 or not self.seeds:
            raise ValueError(f"lm_quality: need lrs > 0 and at least one seed, got {list(self.lrs)}, "
                             f"{list(self.seeds)}")
        for name in ("n_layers", "seq_len", "batch_size", "steps", "val_windows", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"lm_quality: {name} must be >= 1, got {getattr(self, name)}")
        if min(self.reference_widths) < 8:
            raise ValueError(f"lm_quality: reference_widths must be >= 8, got {list(self.reference_widths)}")
        if not 0 < self.match_tolerance < 1 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.val_percent < 100:
            raise ValueError("lm_quality: need 0 < match_tolerance < 1, 0 <= min_lr_ratio <= 1, "
                             "0 < val_percent < 100")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.budget_s < 0:
            raise ValueError("lm_quality: warmup_steps, weight_decay, grad_clip and budget_s must be >= 0")

    @property
    def mixer_names(self) -> list[str]:
        """The reference first (its runs define the sizes), then the others in registry order."""
        names = list(self.mixers) if self.mixers else list_mixers()
        return sorted(names, key=lambda name: name != self.reference)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


# --- matched sizes -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def lm_parameters(mixer: str, d_model: int, n_layers: int, mlp_hidden: int | None = None,
                  ffn_ratio: float | None = None) -> int:
    """Parameters of the byte-level SeqLM (tied embedding, default block): n_layers blocks, the embedding
    and the final norm, counted on one block built on the meta device. ValueError if the width is invalid."""
    overrides = {} if ffn_ratio is None else {"ffn_ratio": ffn_ratio}
    block = build_block(mixer, mlp=True, mlp_hidden=mlp_hidden, d_model=d_model, device="meta", **overrides)
    return n_layers * sum(p.numel() for p in block.parameters()) + BYTE_VOCAB * d_model + d_model


@dataclass(frozen=True)
class Size:
    """One mixer's model at one size: width, channel-mixer width, its parameters and the target."""

    mixer: str
    index: int  # 0: smallest
    target: int  # the reference's parameters at this size
    d_model: int
    mlp_hidden: int | None  # SwiGLU width; None for a mixer with its own channel mixer (RWKV)
    ffn_ratio: float | None  # that own channel mixer's width / d_model (RWKV's `ffn_ratio`); None otherwise
    parameters: int

    @property
    def mismatch(self) -> float:
        return self.parameters / self.target - 1


def _own_channel_mixer(mixer: str, width: int, n_layers: int) -> bool:
    """True when the block ignores the SwiGLU width: the mixer brings its own channel mixer (RWKV)."""
    default = swiglu_hidden_size(width)
    return lm_parameters(mixer, width, n_layers, default + 8) == lm_parameters(mixer, width, n_layers, default)


def _fit_channels(mixer: str, width: int, n_layers: int, target: int, own: bool) -> tuple[float, int, int, float]:
    """At `width`: the channel-mixer width F (SwiGLU hidden, or the own channel mixer's F = ffn_ratio x d)
    whose model is nearest `target`; returns (|F / default F - 1|, F, parameters, ffn_ratio or 0).
    Parameters are linear in F, so two counts give the slope; the rounding of F is then checked exactly."""
    def count(hidden: int) -> tuple[int, float]:
        if own:  # F + 0.5 so that the mixer's int(d x ratio) lands on F exactly
            ratio = (hidden + 0.5) / width
            return lm_parameters(mixer, width, n_layers, ffn_ratio=ratio), ratio
        return lm_parameters(mixer, width, n_layers, hidden), 0.0

    if own:
        default_ratio = build_block(mixer, mlp=True, d_model=width, device="meta").mixer.config.ffn_ratio
        default = int(width * default_ratio) // 32 * 32 or 32
    else:
        default = swiglu_hidden_size(width)
    base, _ = count(default)
    slope = (count(default + 64)[0] - base) / 64
    best = max(2, round(default + (target - base) / slope))
    choices = {max(32, best // 32 * 32), best // 32 * 32 + 32, max(2, best // 2 * 2), best // 2 * 2 + 2}
    fitted = min((abs(count(hidden)[0] - target), hidden) for hidden in choices)[1]
    params, ratio = count(fitted)
    return abs(fitted / default - 1), fitted, params, ratio


def match_size(mixer: str, target: int, n_layers: int, index: int = 0, max_width: int = 4096) -> Size:
    """The model of `mixer` closest to `target` parameters: at the valid widths (multiples of 8) just below
    and just above the target at the default channel width, the channel-mixer width F that brings the total
    nearest the target (the SwiGLU hidden width; for RWKV, whose block uses its own channel-mix, that
    channel-mix's F through `ffn_ratio`); of the two widths, the one whose F moves least from its default
    (8/3 d; RWKV-6 3.5 d, RWKV-7 4 d) among those within 0.5% of the target, else the closer.
    ValueError when no width up to `max_width` is valid."""
    below = above = None
    for width in range(8, max_width + 1, 8):
        try:
            params = lm_parameters(mixer, width, n_layers)
        except ValueError:
            continue
        if params < target:
            below = width
        else:
            above = width
            break
    widths = [width for width in (below, above) if width is not None]
    if not widths:
        raise ValueError(f"lm_quality: no width up to {max_width} is valid for mixer {mixer!r}")
    own = _own_channel_mixer(mixer, widths[0], n_layers)
    candidates = []
    for width in widths:
        change, hidden, params, ratio = _fit_channels(mixer, width, n_layers, target, own)
        off = abs(params - target)
        candidates.append((off > 0.005 * target, change, off, width, hidden, params, ratio))
    *_, width, hidden, params, ratio = min(candidates)  # within 0.5% first, then the least change of F
    return Size(mixer, index, target, width, None if own else hidden, ratio if own else None, params)


def plan_sizes(settings: LMQualitySettings) -> dict[str, list[Size]]:
    """mixer -> its Size at each of the reference's widths; ValueError naming any mixer outside the tolerance."""
    targets = [lm_parameters(settings.reference, width, settings.n_layers) for width in settings.reference_widths]
    sizes = {mixer: [match_size(mixer, target, settings.n_layers, index) for index, target in enumerate(targets)]
             for mixer in settings.mixer_names}
    for mixer, mixer_sizes in sizes.items():
        for size in mixer_sizes:
            if abs(size.mismatch) > settings.match_tolerance:
                raise ValueError(f"lm_quality: {mixer} at size {size.index} has {size.parameters:,} parameters, "
                                 f"{size.mismatch:+.1%} from the target {size.target:,} (tolerance "
                                 f"{settings.match_tolerance:.0%}); change reference_widths or n_layers")
    return sizes


# --- runs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMRunSpec:
    """Everything that determines one training run; its hash names the cached result."""

    mixer: str
    size: int  # index into the sizes, 0 smallest
    target_params: int
    d_model: int
    mlp_hidden: int | None
    ffn_ratio: float | None
    lr: float
    seed: int
    n_layers: int
    seq_len: int
    batch_size: int
    steps: int
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    data_seed: int
    val_percent: float
    val_windows: int
    log_every: int

    @property
    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        return f"size{self.size}-{self.mixer}-d{self.d_model}-h{self.mlp_hidden}-lr{self.lr:g}-s{self.seed}-{digest}"


def _spec(settings: LMQualitySettings, size: Size, lr: float, seed: int) -> LMRunSpec:
    shared = {name: getattr(settings, name) for name in ("n_layers", "seq_len", "batch_size", "steps",
                                                         "warmup_steps", "min_lr_ratio", "weight_decay",
                                                         "grad_clip", "data_seed", "val_percent", "val_windows",
                                                         "log_every")}
    return LMRunSpec(size.mixer, size.index, size.target, size.d_model, size.mlp_hidden, size.ffn_ratio, lr,
                     seed, **shared)


def tuning_specs(settings: LMQualitySettings, sizes: dict[str, list[Size]]) -> list[LMRunSpec]:
    """Stage 1: every mixer at the smallest size, every lr, the first seed (reference first)."""
    return [_spec(settings, sizes[mixer][0], lr, settings.seeds[0]) for mixer in settings.mixer_names
            for lr in settings.lrs]


def best_lr(settings: LMQualitySettings, sizes: dict[str, list[Size]], mixer: str,
            results: dict[str, dict[str, Any]]) -> float | None:
    """The tuned lr of `mixer`: lowest validation bits per byte at the smallest size (first seed); None until
    every lr has run, or when none finished with a finite loss."""
    runs = [results.get(_spec(settings, sizes[mixer][0], lr, settings.seeds[0]).key) for lr in settings.lrs]
    if any(run is None for run in runs):
        return None
    scored = [(run["val_bpb"], run["spec"]["lr"]) for run in runs if run["status"] == "ok"
              and run["val_bpb"] is not None and math.isfinite(run["val_bpb"])]
    return min(scored)[1] if scored else None


def scaling_specs(settings: LMQualitySettings, sizes: dict[str, list[Size]],
                  results: dict[str, dict[str, Any]]) -> list[LMRunSpec]:
    """Stage 2, for the mixers whose lr is tuned: the other seeds at the smallest size, then every larger
    size, every seed, at the tuned lr (size outermost, so a budget cut leaves whole larger sizes pending)."""
    tuned = {mixer: best_lr(settings, sizes, mixer, results) for mixer in settings.mixer_names}
    specs = [_spec(settings, sizes[mixer][0], lr, seed) for mixer, lr in tuned.items() if lr is not None
             for seed in settings.seeds[1:]]
    specs += [_spec(settings, sizes[mixer][index], lr, seed) for index in range(1, len(settings.reference_widths))
              for mixer, lr in tuned.items() if lr is not None for seed in settings.seeds]
    return specs


# --- data ----------------------------------------------------------------------------------------
def load_corpus(settings: LMQualitySettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8 streams: the standard-library corpus (tests may replace this function)."""
    return stdlib_corpus(settings.val_percent)


def train_offsets(spec: LMRunSpec, stream_length: int) -> torch.Tensor:
    """(steps, B) start offsets of the training windows, drawn from `data_seed` alone: the same for every
    mixer, width, lr and weight seed."""
    generator = torch.Generator().manual_seed(spec.data_seed)
    return torch.randint(0, stream_length - spec.seq_len - 1, (spec.steps, spec.batch_size), generator=generator)


def batch_at(stream: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, L + 1) uint8 windows of `stream` starting at `offsets` (B,)."""
    return stream[offsets[:, None] + torch.arange(seq_len + 1)]


def validation_starts(stream_length: int, seq_len: int, windows: int) -> torch.Tensor:
    """Start offsets of `windows` non-overlapping windows of L + 1 bytes spread evenly over the validation
    stream (so they sample every held-out file region, not only the first); fewer if the stream is short."""
    room = stream_length - 1 - seq_len  # the last valid start
    if room < 0:
        raise ValueError(f"lm_quality: the validation stream ({stream_length} bytes) is shorter than L {seq_len}")
    stride = max(seq_len, room // max(windows - 1, 1))
    return torch.arange(min(windows, room // stride + 1)) * stride


@torch.no_grad()
def validation_bpb(model, stream: torch.Tensor, seq_len: int, windows: int, batch_size: int) -> float:
    """Mean next-byte cross-entropy in bits over every position of `windows` non-overlapping windows spread
    evenly over the validation stream (`validation_starts`)."""
    starts = validation_starts(stream.numel(), seq_len, windows)
    count = len(starts)
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size):
        window = batch_at(stream, chunk, seq_len).long()
        logits = model(window[:, :-1]).float()
        total += F.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="sum").item()
    model.train()
    return total / (count * seq_len) / math.log(2)


def _lr_at(step: int, spec: LMRunSpec) -> float:
    """Linear warmup, then cosine from the peak to min_lr_ratio x peak at `steps`."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = min((step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1), 1.0)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_lm(spec: LMRunSpec):
    from seqarch.models.lm import SeqLM

    torch.manual_seed(spec.seed)
    own = {spec.mixer: {"ffn_ratio": spec.ffn_ratio}} if spec.ffn_ratio is not None else {}
    return SeqLM(BYTE_VOCAB, spec.d_model, spec.n_layers, mixer=spec.mixer, mlp=True, mlp_hidden=spec.mlp_hidden,
                 **own)


def train_lm_run(spec: LMRunSpec, train: torch.Tensor, val: torch.Tensor, threads: int = 1) -> dict[str, Any]:
    """Train one run on `train` and score it on `val`; returns its result row. A non-finite loss stops the
    run early (status "diverged", val_bpb None). Other exceptions propagate (the sweep records them)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = build_lm(spec)
    decay = [p for p in model.parameters() if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)]
    no_decay = [p for p in model.parameters() if p.ndim < 2 or getattr(p, "_no_weight_decay", False)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95))
    offsets = train_offsets(spec, train.numel())
    digest = hashlib.sha256()
    losses, window_losses, status = [], [], "ok"
    model.train()
    for step in range(spec.steps):
        window = batch_at(train, offsets[step], spec.seq_len)
        digest.update(window.numpy().tobytes())
        window = window.long()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.float().transpose(1, 2), window[:, 1:])
        if not math.isfinite(loss.item()):
            status = "diverged"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        window_losses.append(loss.item())
        if (step + 1) % spec.log_every == 0 or step + 1 == spec.steps:
            losses.append([step + 1, round(statistics.fmean(window_losses) / math.log(2), 4)])  # bits per byte
            window_losses = []
    train_seconds = time.perf_counter() - started
    bpb = validation_bpb(model, val, spec.seq_len, spec.val_windows, spec.batch_size) if status == "ok" else None
    return {"key": spec.key, "spec": dataclasses.asdict(spec), "status": status, "error": "",
            "val_bpb": bpb, "parameters": model.num_parameters(), "tokens": spec.steps * spec.batch_size * spec.seq_len,
            "tokens_sha256": digest.hexdigest() if status == "ok" else "", "train_bpb": losses,
            "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - started, 1)}


# --- the sweep -----------------------------------------------------------------------------------
def _run_all(specs: list[LMRunSpec], settings: LMQualitySettings, results: dict, runs_dir: Path, started: float,
             corpus: list, progress) -> None:
    for spec in specs:
        path = runs_dir / f"{spec.key}.json"
        if spec.key in results:
            continue
        if path.is_file():
            results[spec.key] = json.loads(path.read_text())
            continue
        if settings.budget_s and time.perf_counter() - started > settings.budget_s:
            continue  # pending: a later rerun picks it up
        if not corpus:
            corpus.extend(load_corpus(settings))
        try:
            result = train_lm_run(spec, corpus[0], corpus[1], settings.threads)
        except Exception as error:  # a mixer that cannot run is a result, not a crash of the sweep
            result = {"key": spec.key, "spec": dataclasses.asdict(spec), "status": "error", "val_bpb": None,
                      "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        path.write_text(json.dumps(finite_or_null(result), indent=1, allow_nan=False) + "\n")  # strict JSON
        results[spec.key] = result
        shown = f"{result['val_bpb']:.4f} bpb" if result.get("val_bpb") is not None else result["status"]
        channels = f"h {spec.mlp_hidden}" if spec.ffn_ratio is None else f"ffn {spec.ffn_ratio:.2f} d"
        progress(f"lm_quality size {spec.size} {spec.mixer:<14} d {spec.d_model:<4} {channels:<10} "
                 f"lr {spec.lr:<7g} seed {spec.seed} {shown} ({result.get('seconds', '-')} s) {result['error']}")


def run_lm_quality(settings: LMQualitySettings, progress=print) -> list[dict[str, Any]]:
    """Run every run not cached in <out>/runs/ (tuning first, then the larger sizes at the tuned lrs), write
    <out>/lm_quality.json and return its rows: one per mixer x size (mean over seeds at the tuned lr)."""
    runs_dir = Path(settings.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sizes = plan_sizes(settings)
    results: dict[str, dict[str, Any]] = {}
    corpus: list[torch.Tensor] = []  # loaded on the first run that needs it
    _run_all(tuning_specs(settings, sizes), settings, results, runs_dir, started, corpus, progress)
    _run_all(scaling_specs(settings, sizes, results), settings, results, runs_dir, started, corpus, progress)
    rows = summarize_lm(settings, sizes, results)
    (Path(settings.out) / "lm_quality.json").write_text(json.dumps(finite_or_null(rows), indent=1,
                                                                   allow_nan=False) + "\n")
    return rows


def summarize_lm(settings: LMQualitySettings, sizes: dict[str, list[Size]],
                 results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mixer x size: the tuned lr, validation bits per byte (mean, min, max over seeds), every
    setting that makes the row comparable (params, tokens, steps, seeds), and the lr sweep at size 0."""
    rows = []
    for index in range(len(settings.reference_widths)):
        for mixer in settings.mixer_names:
            size = sizes[mixer][index]
            lr = best_lr(settings, sizes, mixer, results)
            runs = ([results.get(_spec(settings, size, lr, seed).key) for seed in settings.seeds]
                    if lr is not None else [])
            done = [run for run in runs if run is not None]
            scored = [run["val_bpb"] for run in done if run["status"] == "ok" and run["val_bpb"] is not None]
            lr_sweep = {}
            for candidate in settings.lrs:
                run = results.get(_spec(settings, sizes[mixer][0], candidate, settings.seeds[0]).key)
                if run is not None:
                    lr_sweep[f"{candidate:g}"] = run["val_bpb"] if run["status"] == "ok" else run["status"]
            errors = [run["error"] or run["status"] for run in done if run["status"] != "ok"]
            rows.append({
                "mixer": mixer, "size": index, "target_params": size.target, "parameters": size.parameters,
                "mismatch": round(size.mismatch, 5), "d_model": size.d_model, "mlp_hidden": size.mlp_hidden,
                "ffn_ratio": size.ffn_ratio,
                "n_layers": settings.n_layers, "lr": lr, "lr_sweep": lr_sweep, "seeds": list(settings.seeds),
                "steps": settings.steps, "batch_size": settings.batch_size, "seq_len": settings.seq_len,
                "tokens": settings.tokens,
                "val_bpb": statistics.fmean(scored) if scored else None,
                "val_bpb_min": min(scored) if scored else None, "val_bpb_max": max(scored) if scored else None,
                "seconds": [run.get("seconds") for run in done],
                "tokens_sha256": sorted({run.get("tokens_sha256", "") for run in done} - {""}),
                "runs_done": len(done), "runs_total": len(settings.seeds),
                "status": _status(lr, len(lr_sweep) == len(settings.lrs), len(done), len(settings.seeds)),
                "error": errors[0] if errors else "",
            })
    return rows


def _status(lr: float | None, tuned: bool, done: int, total: int) -> str:
    if lr is None:
        return "failed" if tuned else "pending"  # failed: no lr of the sweep finished with a finite loss
    return "done" if done == total else "partial" if done else "pending"


# --- report --------------------------------------------------------------------------------------
def _params(value: int) -> str:
    return f"{value / 1e6:.3f}M"


def lm_quality_lines(rows: list[dict[str, Any]], settings: LMQualitySettings, baseline_bpb: float | None = None,
                     plot: str | None = None) -> list[str]:
    """The report's Markdown lines (without a title): settings in one paragraph, then the table."""
    done = sum(row["runs_done"] for row in rows)
    total = sum(row["runs_total"] for row in rows)
    hashes = {digest for row in rows for digest in row["tokens_sha256"]}
    lines = [f"Byte-level SeqLM ({settings.n_layers} layers, default block: mixer + SwiGLU, tied embedding, "
             f"V 256) per mixer, trained from scratch on the standard-library corpus "
             f"({settings.val_percent:g}% of files held out) for {settings.steps} steps of {settings.batch_size} "
             f"windows of {settings.seq_len} bytes = {settings.tokens:,} tokens, the same windows in the same order "
             f"for every run (data seed {settings.data_seed}; "
             + ("every finished run's SHA-256 of its training bytes is identical" if len(hashes) == 1 else
                f"{len(hashes)} distinct training-byte hashes: NOT the same stream") + "). "
             f"AdamW (0.9, 0.95), weight decay {settings.weight_decay:g}, clip {settings.grad_clip:g}, "
             f"{settings.warmup_steps} warmup steps, cosine to {settings.min_lr_ratio:g} x peak. "
             f"The lr is tuned per mixer at the smallest size over {', '.join(f'{lr:g}' for lr in settings.lrs)} "
             f"(seed {settings.seeds[0]}) and reused at the larger sizes. Validation: bits per byte over every "
             f"position of {settings.val_windows} windows of {settings.seq_len} bytes spread evenly over the "
             "held-out stream.",
             ""]
    if baseline_bpb is not None:
        lines += [f"A unigram byte model (no context) scores {baseline_bpb:.3f} bits per byte on the same "
                  "held-out bytes.", ""]
    lines += [f"Runs finished: {done} of the {total} that make the rows (plus the lr sweep at the smallest "
              "size). `params` is the model's count and its mismatch to the target (attention's count at the "
              "reference width); `channel mixer` the SwiGLU hidden width that absorbs the remainder (default "
              "8/3 d), or for RWKV its own channel-mix width (RWKV-6 default 3.5 d, RWKV-7 4 d); `bpb` the mean "
              "over seeds [min-max]; `s per run` wall seconds (one thread, shared machine).", ""]
    edge = sorted({row["mixer"] for row in rows if row["lr"] is not None and len(settings.lrs) > 1
                   and row["lr"] in (min(settings.lrs), max(settings.lrs))})
    if edge:
        lines += [f"The tuned lr is at an end of the lr grid for {', '.join(edge)}: the best lr may lie outside it "
                  "(widen `lrs` before reading a ranking).", ""]
    if plot:
        lines += [f"![validation bits per byte against parameters]({plot})", ""]
    header = ["mixer", "size", "params (mismatch)", "d", "channel mixer", "lr", "lr sweep (size 0 bpb)", "seeds",
              "steps", "tokens", "val bpb [min-max]", "s per run", "done"]
    body = []
    for row in sorted(rows, key=lambda row: (row["size"], row["val_bpb"] is None, row["val_bpb"] or 0)):
        bpb = (f"{row['val_bpb']:.4f} [{row['val_bpb_min']:.4f}-{row['val_bpb_max']:.4f}]"
               if row["val_bpb"] is not None else row["status"] + (f": {row['error']}" if row["error"] else ""))
        sweep = ", ".join(f"{lr}: {value:.3f}" if isinstance(value, float) else f"{lr}: {value}"
                          for lr, value in row["lr_sweep"].items()) or "—"
        seconds = ", ".join(f"{value:.0f}" for value in row["seconds"] if value is not None) or "—"
        channels = (f"SwiGLU {row['mlp_hidden']}" if row["ffn_ratio"] is None else f"own, {row['ffn_ratio']:.2f} d")
        body.append([row["mixer"], str(row["size"]), f"{_params(row['parameters'])} ({row['mismatch']:+.1%})",
                     str(row["d_model"]), channels, "—" if row["lr"] is None else f"{row['lr']:g}",
                     sweep, ",".join(map(str, row["seeds"])), str(row["steps"]), f"{row['tokens']:,}", bpb, seconds,
                     f"{row['runs_done']}/{row['runs_total']}"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body] + [""]
    return lines


def plot_bpb_vs_params(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """One line per mixer: validation bits per byte against parameters (log x). None when nothing is scored."""
    scored = [row for row in rows if row["val_bpb"] is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>pP*Xh"
    for number, mixer in enumerate(dict.fromkeys(row["mixer"] for row in scored)):
        points = sorted((row["parameters"], row["val_bpb"]) for row in scored if row["mixer"] == mixer)
        axes.plot([x for x, _ in points], [y for _, y in points], marker=markers[number % len(markers)], label=mixer,
                  linestyle="--" if mixer == "attention" else "-", color=f"C{number}" if number < 10 else "black")
    axes.set_xscale("log")
    axes.set_xlabel("parameters")
    axes.set_ylabel("validation bits per byte")
    axes.set_title("byte-level LM quality at matched size (same tokens for every mixer)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_lm_quality_report(rows: list[dict[str, Any]], settings: LMQualitySettings, out: Path,
                            header: list[str] | None = None, baseline_bpb: float | None = None) -> Path:
    """lm_quality.md (and bpb_vs_params.png when a row is scored) in `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_bpb_vs_params(rows, out / "bpb_vs_params.png")
    report = out / "lm_quality.md"
    lines = ["# seqarch language-model quality at matched size", ""] + (header or [])
    report.write_text("\n".join(lines + lm_quality_lines(rows, settings, baseline_bpb,
                                                         plot.name if plot else None)) + "\n")
    return report


def corpus_baseline(settings: LMQualitySettings) -> float:
    """Bits per byte of a unigram byte model on the scored validation bytes (the no-context bar)."""
    train, val = load_corpus(settings)
    starts = validation_starts(val.numel(), settings.seq_len, settings.val_windows)
    return unigram_bits_per_byte(train, batch_at(val, starts, settings.seq_len)[:, 1:].reshape(-1))


# --- presets -------------------------------------------------------------------------------------
LM_GRIDS: dict[str, dict[str, Any]] = {
    # a smoke run sized for < 10 min on one thread: tiny models, two lrs, 60 steps of 8 x 64 bytes
    "quick": {"reference_widths": (48, 64, 96), "n_layers": 2, "seq_len": 64, "batch_size": 8, "steps": 60,
              "lrs": (2.2e-3, 4.6e-3), "warmup_steps": 10, "val_windows": 64, "log_every": 20},
    # issue 14's item 5: three sizes x every mixer, lr tuned at the smallest (cost: docs/benchmarks.md)
    "default": {},
}


def lm_quality_settings(preset: str, **overrides: Any) -> LMQualitySettings:
    """The settings of a named preset (see LM_GRIDS) with `overrides` on top."""
    if preset not in LM_GRIDS:
        raise ValueError(f"lm_quality preset {preset!r}; valid: {', '.join(LM_GRIDS)}")
    return dataclasses.replace(LMQualitySettings(), **{**LM_GRIDS[preset], **overrides})


__all__ = ["LMQualitySettings", "LMRunSpec", "LM_GRIDS", "Size", "best_lr", "corpus_baseline", "lm_parameters",
           "lm_quality_lines", "lm_quality_settings", "match_size", "plan_sizes", "plot_bpb_vs_params",
           "run_lm_quality", "scaling_specs", "summarize_lm", "train_lm_run", "train_offsets", "tuning_specs",
           "validation_bpb", "validation_starts", "write_lm_quality_report"]
