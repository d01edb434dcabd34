"""The quality side of the benchmark: recall (MQAR) and state tracking, every registered mixer, as the papers run it.

Legend: d model width (d_model), L sequence length, P key-value pairs per example, V vocabulary.

Multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models", section 3 and figure 2): each mixer is trained from scratch in a two-layer SeqLM per
cell (d, L, P) with Zoology's data (V 8192, keys and values from disjoint halves, power-law query gaps,
seqarch.data.synthetic) and Zoology's optimiser (torch's AdamW defaults: betas 0.9 / 0.999, weight decay
0.01; no warmup, no gradient clip; cosine to zero over the budget; early stop at validation accuracy
0.99), in both Zoology's figure-2 block (mixer only, `mlp=False`) and seqarch's default block (mixer +
SwiGLU). Like Zoology it sweeps the learning rate per mixer and keeps the best; it runs two seeds per
learning rate and reports their mean and range at the best one.

State tracking (seqarch.data.state_tracking): parity and the word problem of Z5 (addition mod 5) or S5,
trained at length L and evaluated at L, 2L and 4L: the axis on which DeltaNet with negative eigenvalues,
RWKV-7 and Mamba-3 claim to beat diagonal recurrences and attention.

Training is a plain loop (`train_run`), typed and called directly: the hidden states of every position
go through the blocks, but the output layer and the loss are computed only at the scored positions (the
full-vocabulary head at V 8192 would make a step 4-13x slower for nothing). Every run (one mixer x block
x cell x lr x seed) is cached as <out>/runs/<key>.json the moment it finishes; a rerun with the same
settings skips finished runs, so a long sweep can be completed over several sessions (`budget_s` stops
starting new runs after that many seconds). The report says which cells are done, and marks itself
INVALID if attention does not reach 0.99 on every finished MQAR cell (then the budget or the harness is
wrong, not attention: every published MQAR study has attention solve these cells).

    rows = run_quality_sweep(quality_settings("quick"))
    write_quality_report(rows, Path("benchmarks/results/quality/quick"))
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
from typing import Any, Literal

import torch
import torch.nn.functional as F

from seqarch.data.state_tracking import GROUPS, word_problem
from seqarch.data.synthetic import IGNORE, multiquery_associative_recall
from seqarch.registry import list_mixers
from seqarch.runs import finite_or_null

Task = Literal["mqar", "parity", "z5", "s5"]
GATE_ACCURACY = 0.99  # attention must reach this on every finished MQAR cell, or the report is INVALID


@dataclass(frozen=True)
class Cell:
    """One task size: MQAR at (d, L, P) or a state-tracking task trained at (d, L)."""

    task: Task
    d_model: int
    seq_len: int
    num_kv_pairs: int = 0  # MQAR only

    @property
    def name(self) -> str:
        pairs = f"-P{self.num_kv_pairs}" if self.task == "mqar" else ""
        return f"{self.task}-d{self.d_model}-L{self.seq_len}{pairs}"


@dataclass(frozen=True)
class QualitySettings:
    mixers: tuple[str, ...] = ()  # registry names; empty: every registered mixer
    # (d, L, P) MQAR cells: Zoology's figure-2 sizes that separate the mixers (L 64 alone does not)
    mqar_cells: tuple[tuple[int, int, int], ...] = ((64, 64, 4), (64, 128, 8), (128, 128, 8))
    state_tasks: tuple[str, ...] = ()  # state-tracking tasks: "parity", "z5", "s5"; empty: none
    state_cells: tuple[tuple[int, int], ...] = ((64, 32),)  # (d, train L) for each state task
    length_factors: tuple[int, ...] = (1, 2, 4)  # state tasks are evaluated at L times each factor
    blocks: tuple[str, ...] = ("no_mlp", "default")  # "no_mlp": Zoology's figure 2; "default": mixer + SwiGLU
    vocab_size: int = 8192  # MQAR vocabulary (Zoology: 8192); keys from [1, V/2), values from [V/2, V)
    n_layers: int = 2  # Zoology's depth for MQAR
    lrs: tuple[float, ...] = (4.6e-4, 1e-3, 2.2e-3)  # peak lrs, log-spaced (10^(1/3) apart); the best is reported
    seeds: tuple[int, ...] = (0, 1)  # each seeds the weights and the data order (the data is fixed per cell)
    steps: int = 3000  # most optimizer steps per run
    batch_size: int = 64  # examples per step
    # Zoology's optimiser is torch's AdamW with its defaults. beta2 matters: at 0.98 (an LM habit) the
    # second moment of an embedding row forgets between the rare steps its token appears at V 8192, and
    # attention stalled at 0.73-0.94 in 3,000 steps where it reaches 0.99 in 1,000-1,250 (docs/benchmarks.md)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warmup steps (Zoology: none), then cosine decay to zero at `steps`
    weight_decay: float = 0.01  # AdamW (Zoology: torch's default 0.01), not on 1-D or `_no_weight_decay` params
    grad_clip: float = 0.0  # max gradient norm; 0: off (Zoology: off)
    eval_every: int = 250  # steps between validation passes (early stopping looks at these)
    stop_accuracy: float = 0.99  # early stop once validation accuracy reaches this (Zoology: 0.99)
    num_train: int = 100_000  # fixed training set per cell, as Zoology (100,000; 20,000 was memorised: docs)
    num_val: int = 500  # validation examples, all scored
    threads: int = 1  # torch threads (1: the machine is usually shared)
    budget_s: float = 0.0  # stop starting new runs after this many seconds (0: none); the rest stay "pending"
    out: str = "quality_results"  # <out>/runs/<key>.json per finished run

    def __post_init__(self):
        registered = list_mixers()
        unknown = [name for name in self.mixers if name not in registered]
        if unknown:
            raise ValueError(f"quality: unknown mixer {unknown[0]!r}; registered mixers: {', '.join(registered)}")
        bad_blocks = [block for block in self.blocks if block not in ("no_mlp", "default")]
        if bad_blocks or not self.blocks:
            raise ValueError(f"quality: blocks={list(self.blocks)}; valid: no_mlp, default")
        bad_tasks = [task for task in self.state_tasks if task not in GROUPS]
        if bad_tasks:
            raise ValueError(f"quality: state task {bad_tasks[0]!r}; valid: {', '.join(GROUPS)}")
        for d_model, seq_len, pairs in self.mqar_cells:
            if pairs < 1 or 4 * pairs > seq_len:
                raise ValueError(f"quality: MQAR cell (d {d_model}, L {seq_len}, P {pairs}) needs 1 <= P <= L / 4")
            if self.vocab_size < 2 * pairs + 2:
                raise ValueError(f"quality: vocab_size {self.vocab_size} has too few keys for {pairs} pairs")
        if not self.lrs or min(self.lrs) <= 0 or not self.seeds:
            raise ValueError(f"quality: need lrs > 0 and at least one seed, got {list(self.lrs)}, {list(self.seeds)}")
        for name in ("n_layers", "steps", "batch_size", "num_train", "num_val", "threads", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"quality: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.budget_s < 0:
            raise ValueError("quality: warmup_steps, weight_decay, grad_clip and budget_s must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"quality: adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")

    @property
    def mixer_names(self) -> list[str]:
        return list(self.mixers) if self.mixers else list_mixers()

    def cells(self) -> list[Cell]:
        mqar = [Cell("mqar", d, length, pairs) for d, length, pairs in self.mqar_cells]
        return mqar + [Cell(task, d, length) for task in self.state_tasks for d, length in self.state_cells]


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; its hash names the cached result."""

    mixer: str
    block: str
    cell: Cell
    lr: float
    seed: int
    vocab_size: int
    n_layers: int
    steps: int
    batch_size: int
    adam_betas: tuple[float, float]
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_every: int
    stop_accuracy: float
    num_train: int
    num_val: int
    length_factors: tuple[int, ...]

    @property
    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        return f"{self.cell.name}-{self.block}-{self.mixer}-lr{self.lr:g}-s{self.seed}-{digest}"


def run_specs(settings: QualitySettings) -> list[RunSpec]:
    """Every run of the sweep in the order that tells the most early (the cache does not depend on it):
    cells outermost (a budget cut leaves whole later cells pending); within a cell attention first, every
    block, seed and lr (the sanity gate needs its row complete), then per block the other mixers; in both,
    seed by seed, each seed over all lrs (so every lr has run once before any second seed)."""
    shared = {name: getattr(settings, name) for name in (
        "vocab_size", "n_layers", "steps", "batch_size", "adam_betas", "warmup_steps", "weight_decay", "grad_clip",
        "eval_every", "stop_accuracy", "num_train", "num_val", "length_factors")}
    first = [name for name in settings.mixer_names if name == "attention"]
    others = [name for name in settings.mixer_names if name != "attention"]
    specs = []
    for cell in settings.cells():
        specs += [RunSpec(mixer, block, cell, lr, seed, **shared) for mixer in first for block in settings.blocks
                  for seed in settings.seeds for lr in settings.lrs]
        specs += [RunSpec(mixer, block, cell, lr, seed, **shared) for block in settings.blocks
                  for seed in settings.seeds for mixer in others for lr in settings.lrs]
    return specs


# --- data ----------------------------------------------------------------------------------------
def task_vocab(spec: RunSpec) -> int:
    return spec.vocab_size if spec.cell.task == "mqar" else len(GROUPS[spec.cell.task])


def make_data(spec: RunSpec, num_examples: int, seq_len: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (N, L) of the run's task; `split` 0 is training, others validation (distinct seeds).
    The data depends on the cell only (not on the run's seed), so every mixer and lr sees the same set; it is
    generated once per process and cell (100,000 MQAR examples take minutes) and never written to."""
    return _cell_data(spec.cell.task, spec.vocab_size, spec.cell.num_kv_pairs, num_examples, seq_len, split)


@functools.lru_cache(maxsize=4)
def _cell_data(task: str, vocab_size: int, num_kv_pairs: int, num_examples: int, seq_len: int,
               split: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * split + seq_len)
    if task == "mqar":
        return multiquery_associative_recall(num_examples, seq_len, vocab_size, num_kv_pairs, generator=generator)
    return word_problem(num_examples, seq_len, task, generator=generator)


# --- model and loss ------------------------------------------------------------------------------
def build_model(spec: RunSpec):
    from seqarch.models.lm import SeqLM

    torch.manual_seed(spec.seed)
    return SeqLM(task_vocab(spec), spec.cell.d_model, spec.n_layers, mixer=spec.mixer, mlp=spec.block == "default")


def scored_logits(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, targets (B, L) -> (logits (S, V), targets (S,)) at the S scored positions only: every position
    goes through the blocks (the mixers need the whole sequence), the final norm and head only where scored."""
    x = model._embed(inputs, 0)
    context = {}  # what layers pass on within the call, as SeqLM.forward (RWKV-7's v_first)
    for layer in model.layers:
        x = layer(x, context=context)
    scored = targets != IGNORE
    return model.head(model.norm(x[scored])), targets[scored]


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """Fraction of scored positions whose argmax is the target."""
    model.eval()
    correct = total = 0
    for start in range(0, len(inputs), batch_size):
        logits, wanted = scored_logits(model, inputs[start:start + batch_size], targets[start:start + batch_size])
        correct += (logits.argmax(-1) == wanted).sum().item()
        total += wanted.numel()
    model.train()
    return correct / max(total, 1)


def _optimizer(model, spec: RunSpec) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim < 2 or getattr(param, "_no_weight_decay", False) else decay).append(param)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.adam_betas))


def _lr_at(step: int, spec: RunSpec) -> float:
    """Linear warmup, then cosine to zero at `steps`."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(spec.steps - spec.warmup_steps, 1)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_run(spec: RunSpec, threads: int = 1) -> dict[str, Any]:
    """Train one run; returns its result row (accuracy at the train length and, for state tasks, at each
    length factor; steps used; parameters; seconds). Exceptions propagate (the sweep records them)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    length = spec.cell.seq_len
    train_inputs, train_targets = make_data(spec, spec.num_train, length, split=0)
    val_inputs, val_targets = make_data(spec, spec.num_val, length, split=1)
    model = build_model(spec)
    optimizer = _optimizer(model, spec)
    order = torch.Generator().manual_seed(spec.seed)
    permutation, cursor = torch.randperm(spec.num_train, generator=order), 0
    best, history, step = 0.0, [], 0
    model.train()
    while step < spec.steps:
        if cursor + spec.batch_size > spec.num_train:  # a new epoch over the fixed training set
            permutation, cursor = torch.randperm(spec.num_train, generator=order), 0
        batch = permutation[cursor:cursor + spec.batch_size]
        cursor += spec.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        logits, wanted = scored_logits(model, train_inputs[batch], train_targets[batch])
        loss = F.cross_entropy(logits.float(), wanted)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        step += 1
        if step % spec.eval_every == 0 or step == spec.steps:
            current = accuracy(model, val_inputs, val_targets, spec.batch_size)
            history.append([step, round(current, 4)])
            best = max(best, current)
            if current >= spec.stop_accuracy:
                break
    final = accuracy(model, val_inputs, val_targets, spec.batch_size)
    by_length = {}
    if spec.cell.task != "mqar":
        for factor in spec.length_factors:
            inputs, targets = make_data(spec, spec.num_val, length * factor, split=2)
            by_length[str(length * factor)] = accuracy(model, inputs, targets, spec.batch_size)
    return {"key": spec.key, "spec": dataclasses.asdict(spec), "accuracy": final, "best_accuracy": max(best, final),
            "accuracy_by_length": by_length, "steps_run": step, "final_loss": loss.item(),
            "parameters": model.num_parameters(), "seconds": round(time.perf_counter() - started, 1),
            "history": history, "status": "ok", "error": ""}


# --- the sweep -----------------------------------------------------------------------------------
def run_quality_sweep(settings: QualitySettings, progress=print) -> list[dict[str, Any]]:
    """Run every run of `settings` not already cached in <out>/runs/, then write and return the summary
    rows (<out>/quality.json): one per task x block x mixer x cell, best lr by mean accuracy over seeds."""
    runs_dir = Path(settings.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {}
    for spec in run_specs(settings):
        path = runs_dir / f"{spec.key}.json"
        if path.is_file():
            results[spec.key] = json.loads(path.read_text())
            continue
        if settings.budget_s and time.perf_counter() - started > settings.budget_s:
            continue  # pending: a later rerun picks it up
        try:
            result = train_run(spec, settings.threads)
        except Exception as error:  # a mixer that cannot run at this size is a result, not a crash of the sweep
            result = {"key": spec.key, "spec": dataclasses.asdict(spec), "status": "error",
                      "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        path.write_text(json.dumps(finite_or_null(result), indent=1, allow_nan=False) + "\n")  # strict JSON
        results[spec.key] = result
        accuracy_text = f"{result['accuracy']:.3f}" if result["status"] == "ok" else result["error"]
        progress(f"quality {spec.cell.name:<18} {spec.block:<8} {spec.mixer:<10} lr {spec.lr:<7g} seed {spec.seed} "
                 f"accuracy {accuracy_text} ({result.get('steps_run', '-')} steps, {result.get('seconds', '-')} s)")
    rows = summarize(settings, results)
    write_quality(rows, Path(settings.out) / "quality.json")
    return rows


def summarize(settings: QualitySettings, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, block, mixer): the lr whose seeds' mean accuracy is highest among finished lrs."""
    rows = []
    specs = run_specs(settings)
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.cell, spec.block, spec.mixer), []).append(spec)
    for (cell, block, mixer), group in groups.items():
        finished = [results[spec.key] for spec in group if spec.key in results]
        ok = [result for result in finished if result["status"] == "ok"]
        per_lr: dict[float, list[dict]] = {}
        for result in ok:
            per_lr.setdefault(result["spec"]["lr"], []).append(result)
        row = {"task": cell.task, "block": block, "mixer": mixer, "d_model": cell.d_model, "seq_len": cell.seq_len,
               "num_kv_pairs": cell.num_kv_pairs, "vocab_size": settings.vocab_size if cell.task == "mqar"
               else len(GROUPS[cell.task]), "accuracy": None, "accuracy_min": None, "accuracy_max": None,
               "lr": None, "lr_means": {}, "seeds": list(settings.seeds), "lrs": list(settings.lrs),
               "steps": settings.steps, "steps_run": None, "batch_size": settings.batch_size, "parameters": None,
               "accuracy_by_length": {}, "runs_done": len(finished), "runs_total": len(group),
               "status": "done" if len(finished) == len(group) else ("partial" if finished else "pending"),
               "error": next((result["error"] for result in finished if result["status"] == "error"), "")}
        if per_lr:
            means = {lr: statistics.fmean(result["accuracy"] for result in runs) for lr, runs in per_lr.items()}
            best_lr = max(means, key=lambda lr: (means[lr], -lr))
            best = per_lr[best_lr]
            lengths = sorted({length for result in best for length in result["accuracy_by_length"]}, key=int)
            row.update(accuracy=means[best_lr], accuracy_min=min(result["accuracy"] for result in best),
                       accuracy_max=max(result["accuracy"] for result in best), lr=best_lr,
                       lr_means={f"{lr:g}": round(mean, 4) for lr, mean in sorted(means.items())},
                       steps_run=[result["steps_run"] for result in best], parameters=best[0]["parameters"],
                       accuracy_by_length={length: statistics.fmean(result["accuracy_by_length"][length]
                                                                    for result in best) for length in lengths})
        rows.append(row)
    return rows


def sanity_gate(rows: list[dict[str, Any]]) -> list[str]:
    """The finished MQAR cells where attention's best mean accuracy is below GATE_ACCURACY (empty: valid)."""
    return [f"{row['block']} d={row['d_model']} L={row['seq_len']} P={row['num_kv_pairs']}: {row['accuracy']:.3f}"
            for row in rows if row["task"] == "mqar" and row["mixer"] == "attention" and row["status"] == "done"
            and row["accuracy"] is not None and row["accuracy"] < GATE_ACCURACY]


def write_quality(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(finite_or_null(rows), indent=1, allow_nan=False) + "\n")  # strict JSON


# --- report --------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in body])


def quality_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The report's Markdown lines (without a title): the sanity gate, MQAR per block, state tracking."""
    failed = sanity_gate(rows)
    attention_rows = [row for row in rows if row["task"] == "mqar" and row["mixer"] == "attention"]
    lines = []
    if failed:
        lines += ["**INVALID: attention did not reach 0.99 on every finished MQAR cell** (" + "; ".join(failed)
                  + "). Every published MQAR study has attention solve these cells, so the budget, the learning "
                  "rates or the harness are wrong here; read no comparison from this report.", ""]
    elif attention_rows and not any(row["status"] == "done" for row in attention_rows):
        lines += ["**NOT CHECKED: no MQAR cell of attention is finished, so the sanity gate (attention >= 0.99) "
                  "has not run; read no comparison from this report yet.**", ""]
    elif attention_rows:
        lines += [f"Sanity gate passed: attention reaches {GATE_ACCURACY} on every finished MQAR cell.", ""]
    done = sum(row["runs_done"] for row in rows)
    total = sum(row["runs_total"] for row in rows)
    lines += [f"Runs finished: {done} of {total}. A row's accuracy is the mean over its seeds at the learning rate "
              "with the best mean (range over seeds in brackets); `steps` is the budget and the steps each seed ran "
              "before early stopping at 0.99; `done` counts finished runs (lrs x seeds).", ""]
    mqar = [row for row in rows if row["task"] == "mqar"]
    for block in dict.fromkeys(row["block"] for row in mqar):
        title = ("Zoology's figure-2 block (mixer only, no MLP)" if block == "no_mlp"
                 else "seqarch's default block (mixer + SwiGLU MLP)")
        lines += [f"## MQAR, {title}", ""]
        body = []
        for row in (row for row in mqar if row["block"] == block):
            ran = ", ".join(map(str, row["steps_run"] or []))
            steps = f"{row['steps']} ({ran})" if ran else str(row["steps"])
            spread = (f"{_fmt(row['accuracy'])} [{_fmt(row['accuracy_min'])}-{_fmt(row['accuracy_max'])}]"
                      if row["accuracy"] is not None else row["status"])
            lr_means = ", ".join(f"{lr}: {mean:.3f}" for lr, mean in row["lr_means"].items()) or "—"
            body.append([row["mixer"], str(row["d_model"]), str(row["seq_len"]), str(row["num_kv_pairs"]),
                         str(row["vocab_size"]), spread, "—" if row["lr"] is None else f"{row['lr']:g}", lr_means,
                         ",".join(map(str, row["seeds"])), steps, str(row["batch_size"]),
                         "—" if row["parameters"] is None else f"{row['parameters']:,}",
                         f"{row['runs_done']}/{row['runs_total']}"])
        lines += _table(["mixer", "d", "L", "P", "V", "accuracy [min-max]", "best lr", "mean per lr", "seeds",
                         "steps (run)", "batch", "params", "done"], body) + [""]
    state = [row for row in rows if row["task"] != "mqar"]
    if state:
        lengths = sorted({int(length) for row in state for length in row["accuracy_by_length"]})
        lines += ["## State tracking: trained at L, evaluated at L, 2L, 4L", "",
                  "Word problems scored at every position (seqarch.data.state_tracking); chance is 1 / |G|.", ""]
        body = []
        for row in state:
            by_length = [_fmt(row["accuracy_by_length"].get(str(length))) for length in lengths]
            body.append([row["task"], row["block"], row["mixer"], str(row["d_model"]), str(row["seq_len"])] + by_length
                        + ["—" if row["lr"] is None else f"{row['lr']:g}", ",".join(map(str, row["seeds"])),
                           str(row["steps"]), str(row["batch_size"]),
                           "—" if row["parameters"] is None else f"{row['parameters']:,}",
                           f"{row['runs_done']}/{row['runs_total']}"])
        lines += _table(["task", "block", "mixer", "d", "train L"] + [f"acc L={length}" for length in lengths]
                        + ["best lr", "seeds", "steps", "batch", "params", "done"], body) + [""]
    errors = sorted({f"{row['mixer']} {row['block']} d={row['d_model']} L={row['seq_len']}: {row['error']}"
                     for row in rows if row["error"]})
    if errors:
        lines += ["Runs that failed:", ""] + [f"- {error}" for error in errors] + [""]
    return lines


def plot_mqar_accuracy(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Bars of MQAR accuracy (best lr's mean over seeds, min-max as error bars) per mixer, one group per cell,
    one panel per block; rows not yet scored are left out. None when no MQAR row is scored."""
    scored = [row for row in rows if row["task"] == "mqar" and row["accuracy"] is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(dict.fromkeys(row["block"] for row in scored))
    cells = list(dict.fromkeys((row["d_model"], row["seq_len"], row["num_kv_pairs"]) for row in scored))
    mixers = list(dict.fromkeys(row["mixer"] for row in scored))
    figure, panels = plt.subplots(len(blocks), 1, figsize=(max(6.0, 1.2 + 0.5 * len(cells) * len(mixers)),
                                                          3.2 * len(blocks)), squeeze=False)
    width = 0.8 / len(mixers)
    for panel, block in zip(panels[:, 0], blocks, strict=True):
        for number, mixer in enumerate(mixers):
            found = {(row["d_model"], row["seq_len"], row["num_kv_pairs"]): row for row in scored
                     if row["block"] == block and row["mixer"] == mixer}
            xs = [index + (number - (len(mixers) - 1) / 2) * width for index, cell in enumerate(cells) if cell in found]
            picked = [found[cell] for cell in cells if cell in found]
            if not picked:
                continue
            means = [row["accuracy"] for row in picked]
            errors = [[mean - row["accuracy_min"] for mean, row in zip(means, picked, strict=True)],
                      [row["accuracy_max"] - mean for mean, row in zip(means, picked, strict=True)]]
            panel.bar(xs, means, width, yerr=errors, label=mixer, capsize=2)
        panel.axhline(GATE_ACCURACY, color="black", linewidth=0.8, linestyle="--")
        panel.set_xticks(range(len(cells)), [f"d {d}, L {length}, P {pairs}" for d, length, pairs in cells])
        panel.set_ylim(0, 1.05)
        panel.set_ylabel("MQAR accuracy")
        panel.set_title("Zoology's block (no MLP)" if block == "no_mlp" else "seqarch's block (mixer + SwiGLU)")
    panels[0, 0].legend(fontsize=7, ncol=min(len(mixers), 6), loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_quality_report(rows: list[dict[str, Any]], out: Path, header: list[str] | None = None) -> Path:
    """quality.md in `out` (title, `header` lines, the accuracy plot when an MQAR row is scored, then
    `quality_lines`); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    title = "# seqarch quality report" + (" — INVALID" if sanity_gate(rows) else "")
    plot = plot_mqar_accuracy(rows, out / "accuracy.png")
    figure = [f"![MQAR accuracy per mixer and cell]({plot.name})", ""] if plot else []
    report = out / "quality.md"
    report.write_text("\n".join([title, ""] + (header or []) + figure + quality_lines(rows)) + "\n")
    return report


# --- presets -------------------------------------------------------------------------------------
# `seqarch bench quality=true quality_grid=<name>` and benchmarks/run_quality_sweep.py --preset <name>.
GRIDS: dict[str, dict[str, Any]] = {
    # a smoke run sized for < 10 min on one idle thread: one small MQAR cell and parity, Zoology's block,
    # one lr, one seed, at most 600 steps (attention solves the MQAR cell in 300 with seeds 0 and 1)
    "quick": {"mqar_cells": ((64, 32, 4),), "vocab_size": 64, "lrs": (2.2e-3,), "seeds": (0,), "steps": 600,
              "eval_every": 100, "num_train": 4000, "num_val": 200,
              "state_tasks": ("parity",), "state_cells": ((32, 16),), "blocks": ("no_mlp",)},
    # issue 14's grid: three Zoology cells x 3 lrs x 2 seeds x 2 blocks x every mixer; resumable (cost: docs)
    "zoology": {},
    # parity and Z5 at L 32, evaluated at 32, 64, 128
    "state": {"mqar_cells": (), "state_tasks": ("parity", "z5"), "state_cells": ((64, 32),), "steps": 2000},
}


def quality_settings(preset: str, **overrides: Any) -> QualitySettings:
    """The settings of a named preset (see GRIDS) with `overrides` on top."""
    if preset not in GRIDS:
        raise ValueError(f"quality grid {preset!r}; valid: {', '.join(GRIDS)}")
    return dataclasses.replace(QualitySettings(), **{**GRIDS[preset], **overrides})


__all__ = ["GATE_ACCURACY", "GRIDS", "Cell", "QualitySettings", "RunSpec", "accuracy", "plot_mqar_accuracy",
           "quality_lines",
           "quality_settings", "run_quality_sweep", "run_specs", "sanity_gate", "scored_logits", "summarize",
           "train_run", "write_quality", "write_quality_report"]
