"""The language-model quality sweep (seqarch.bench.lm_quality): sizes matched within 5% for every mixer, the
same token stream for every run, lr tuning then scaling, the run cache that makes it resumable, the report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch

import seqarch.bench.lm_quality as lm
from seqarch.bench.lm_quality import (
    LMQualitySettings,
    best_lr,
    lm_parameters,
    lm_quality_settings,
    plan_sizes,
    run_lm_quality,
    scaling_specs,
    train_lm_run,
    train_offsets,
    tuning_specs,
    validation_bpb,
    validation_starts,
    write_lm_quality_report,
)
from seqarch.models.lm import SeqLM
from seqarch.registry import list_mixers


def _stream(seed: int, length: int) -> torch.Tensor:
    """Text-like bytes with structure a model can learn: a repeated phrase with random letters between."""
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.tensor(list(b"def f(x):\n    return x\n"), dtype=torch.uint8)
    noise = torch.randint(97, 123, (length,), generator=generator, dtype=torch.uint8)
    stream = noise.clone()
    for start in range(0, length - len(phrase), 40):
        stream[start:start + len(phrase)] = phrase
    return stream


@pytest.fixture
def corpus(monkeypatch):
    """A small in-memory corpus instead of the standard library (the tests are about the harness)."""
    train, val = _stream(0, 20000), _stream(1, 4000)
    monkeypatch.setattr(lm, "load_corpus", lambda settings: (train, val))
    return train, val


def tiny(tmp_path, **overrides) -> LMQualitySettings:
    values = {"mixers": ("attention", "s4d", "rwkv6"), "reference_widths": (48, 64, 96), "n_layers": 2,
              "seq_len": 16, "batch_size": 2, "steps": 3, "lrs": (1e-3, 3e-3), "seeds": (0,), "warmup_steps": 1,
              "val_windows": 4, "log_every": 1, "out": str(tmp_path / "lm")}
    return LMQualitySettings(**{**values, **overrides})


def test_every_mixer_is_matched_within_5_percent_at_the_quick_sizes_and_built_models_have_those_counts():
    settings = lm_quality_settings("quick")
    sizes = plan_sizes(settings)
    assert set(sizes) == set(list_mixers())
    targets = [lm_parameters("attention", width, settings.n_layers) for width in settings.reference_widths]
    assert targets == sorted(targets) and len(set(targets)) == 3
    for mixer, mixer_sizes in sizes.items():
        assert [size.target for size in mixer_sizes] == targets
        for size in mixer_sizes:
            assert abs(size.parameters / size.target - 1) <= 0.05, (mixer, size)
    for mixer in ("attention", "mamba2", "rwkv6"):  # the count is the real model's (SwiGLU, coarse heads, own FFN)
        size = sizes[mixer][1]
        spec = lm._spec(settings, size, 1e-3, 0)
        assert lm.build_lm(spec).num_parameters() == size.parameters


def test_a_mixer_that_cannot_be_matched_names_itself(monkeypatch):
    real = lm.match_size
    monkeypatch.setattr(lm, "match_size", lambda mixer, target, n_layers, index=0: dataclasses.replace(
        real(mixer, target, n_layers, index), parameters=int(target * 1.2)) if mixer == "s4d" else
        real(mixer, target, n_layers, index))
    with pytest.raises(ValueError, match=r"s4d at size 0 has .* \+20.0% from the target"):
        plan_sizes(LMQualitySettings(mixers=("attention", "s4d"), reference_widths=(48,), n_layers=2))


@pytest.mark.parametrize("overrides, message", [
    ({"mixers": ("nope",)}, "unknown mixer 'nope'"),
    ({"reference_widths": (32, 16)}, "increasing and distinct"),
    ({"lrs": ()}, "need lrs > 0"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"match_tolerance": 0.0}, "0 < match_tolerance < 1"),
])
def test_bad_settings_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        LMQualitySettings(**overrides)
    with pytest.raises(ValueError, match="lm_quality preset 'huge'; valid: quick, default"):
        lm_quality_settings("huge")


def test_every_run_reads_the_same_token_stream(tmp_path, corpus):
    """Different mixers, widths, lrs and weight seeds: the same offsets, the same bytes (and hash)."""
    settings = tiny(tmp_path, seeds=(0, 1))
    sizes = plan_sizes(settings)
    specs = tuning_specs(settings, sizes) + [dataclasses.replace(spec, seed=1) for spec in tuning_specs(settings,
                                                                                                         sizes)]
    assert len({(spec.mixer, spec.d_model, spec.lr, spec.seed) for spec in specs}) == len(specs) == 12
    offsets = [train_offsets(spec, corpus[0].numel()) for spec in specs]
    assert all(torch.equal(offsets[0], other) for other in offsets)
    assert not torch.equal(offsets[0], train_offsets(dataclasses.replace(specs[0], data_seed=1), corpus[0].numel()))
    expected = hashlib.sha256()
    for step in range(settings.steps):
        expected.update(corpus[0][offsets[0][step][:, None] + torch.arange(settings.seq_len + 1)].numpy().tobytes())
    results = [train_lm_run(spec, *corpus) for spec in specs[::3]]  # one per mixer's first lr, both seeds
    assert {result["tokens_sha256"] for result in results} == {expected.hexdigest()}
    assert all(result["tokens"] == settings.steps * settings.batch_size * settings.seq_len for result in results)


def test_validation_windows_are_spread_over_the_stream_without_overlap():
    starts = validation_starts(4000, 16, 3)
    assert starts.tolist() == [0, 1991, 3982] and starts[-1] + 17 <= 4000  # first, middle, last window
    assert validation_starts(100, 16, 50).tolist() == [0, 16, 32, 48, 64, 80]  # short stream: what fits
    with pytest.raises(ValueError, match="shorter than L 16"):
        validation_starts(10, 16, 3)


def test_validation_bits_per_byte_is_the_mean_cross_entropy_in_bits(corpus):
    torch.manual_seed(0)
    model = SeqLM(256, 16, 1, mixer="attention")
    val = corpus[1]
    windows = torch.stack([val[start:start + 17] for start in (0, 1991, 3982)]).long()
    with torch.no_grad():
        logits = model(windows[:, :-1])
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))
    assert validation_bpb(model, val, 16, 3, batch_size=2) == pytest.approx(nats.item() / math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="shorter than L 16"):
        validation_bpb(model, val[:10], 16, 3, batch_size=2)


def test_training_lowers_the_loss_on_learnable_bytes(tmp_path, corpus):
    spec = tuning_specs(tiny(tmp_path, steps=30, log_every=10), plan_sizes(tiny(tmp_path)))[1]  # attention, 3e-3
    result = train_lm_run(spec, *corpus)
    first, last = result["train_bpb"][0][1], result["train_bpb"][-1][1]
    assert result["status"] == "ok" and last < first - 0.5, result["train_bpb"]
    assert result["val_bpb"] < 8.0  # below the uniform 8 bits per byte


def test_tuning_then_scaling_cache_and_budget(tmp_path, corpus, monkeypatch):
    settings = tiny(tmp_path)
    lines = []
    rows = run_lm_quality(settings, progress=lines.append)
    sizes = plan_sizes(settings)
    assert len(lines) == 3 * 2 + 3 * 2  # tuning: 3 mixers x 2 lrs; then 2 larger sizes x 3 mixers at the tuned lr
    results = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "lm" / "runs").glob("*.json")}
    assert len(results) == 12
    for mixer in settings.mixer_names:
        tuned = best_lr(settings, sizes, mixer, results)
        sweep = [run for run in results.values() if run["spec"]["mixer"] == mixer and run["spec"]["size"] == 0]
        assert tuned == min(sweep, key=lambda run: run["val_bpb"])["spec"]["lr"]
        assert {run["spec"]["lr"] for run in results.values() if run["spec"]["mixer"] == mixer
                and run["spec"]["size"] > 0} == {tuned}
    assert [(row["mixer"], row["size"]) for row in rows] == [(m, i) for i in range(3) for m in settings.mixer_names]
    assert all(row["status"] == "done" and row["val_bpb"] is not None for row in rows)
    assert rows == json.loads((tmp_path / "lm" / "lm_quality.json").read_text())
    calls = []  # a rerun trains nothing
    monkeypatch.setattr(lm, "train_lm_run", lambda *args, **kwargs: calls.append(args))
    assert run_lm_quality(settings, progress=lines.append) == rows and calls == [] and len(lines) == 12
    # a budget cut after the tuning stage leaves the larger sizes pending, and the report says so
    for run in (tmp_path / "lm" / "runs").glob("size[12]-*.json"):
        run.unlink()
    pending = run_lm_quality(dataclasses.replace(settings, budget_s=1e-9), progress=lines.append)
    assert [row["status"] for row in pending] == ["done"] * 3 + ["pending"] * 6 and calls == []
    assert scaling_specs(settings, sizes, results)  # ... which a rerun without the budget would train


def test_the_report_has_one_row_per_mixer_and_size_with_every_setting_and_a_plot(tmp_path, corpus):
    settings = tiny(tmp_path)
    rows = run_lm_quality(settings, progress=lambda line: None)
    report = write_lm_quality_report(rows, settings, tmp_path / "report", header=["Header line.", ""],
                                     baseline_bpb=4.5)
    text = report.read_text()
    assert (tmp_path / "report" / "bpb_vs_params.png").stat().st_size > 1000
    assert "![validation bits per byte against parameters](bpb_vs_params.png)" in text
    assert "Header line." in text and "unigram byte model (no context) scores 4.500" in text
    assert "every finished run's SHA-256 of its training bytes is identical" in text
    assert "The tuned lr is at an end of the lr grid for " in text  # two lrs: every tuned lr is at an end
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == 9
    tokens = f"{settings.tokens:,}"
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] in settings.mixer_names and cells[1] in {"0", "1", "2"}
        assert "M (" in cells[2] and cells[7] == "0" and cells[8] == str(settings.steps) and cells[9] == tokens
        assert cells[4].startswith("own, " if cells[0] == "rwkv6" else "SwiGLU ")
        assert float(cells[5]) in settings.lrs and cells[-1] == "1/1"
    pending = [dict(row, val_bpb=None, val_bpb_min=None, val_bpb_max=None, runs_done=0, status="pending",
                    seconds=[], tokens_sha256=[]) for row in rows]
    text = write_lm_quality_report(pending, settings, tmp_path / "empty").read_text()
    assert "| pending |" in text and not (tmp_path / "empty" / "bpb_vs_params.png").exists()
