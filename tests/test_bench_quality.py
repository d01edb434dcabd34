"""The MQAR quality sweep: its grid, its rows in quality.json, and the report section built from them."""

from __future__ import annotations

import importlib
import json

import pytest

from seqarch.bench.commands import quality_rows, run_bench
from seqarch.bench.quality import GRIDS, QualitySettings, fit_args, run_quality_sweep
from seqarch.bench.report import write_quality_report
from seqarch.bench.settings import parse_bench_settings
from seqarch.registry import list_mixers
from tests.bench_helpers import in_process, tiny_settings

ROW_KEYS = {"mixer", "d_model", "seq_len", "num_kv_pairs", "accuracy", "chance", "parameters", "steps", "lr",
            "train_seconds", "status", "error"}


def tiny_quality(tmp_path, **overrides) -> QualitySettings:
    values = {"mixers": ("attention", "s4d"), "widths": (32, 64), "seq_lens": (16, 32), "tokens_per_pair": 4,
              "vocab_size": 32, "steps": 2, "batch_size": 8, "num_train": 32, "num_val": 16,
              "out": str(tmp_path / "quality")}
    return QualitySettings(**{**values, **overrides})


def test_cross_grid_sweeps_width_at_the_shortest_length_and_length_at_the_widest_width():
    settings = QualitySettings(widths=(128, 32, 64), seq_lens=(256, 64, 128), tokens_per_pair=16, vocab_size=256)
    assert settings.cells() == [(32, 64), (64, 64), (128, 64), (128, 128), (128, 256)]
    full = QualitySettings(widths=(32, 64), seq_lens=(64, 128), grid="full", tokens_per_pair=16).cells()
    assert sorted(full) == [(32, 64), (32, 128), (64, 64), (64, 128)]
    assert [settings.num_kv_pairs(length) for length in (64, 128, 256)] == [4, 8, 16]  # Zoology's scaling


def test_each_cell_trains_through_seqarch_fit_with_the_mqar_data(tmp_path):
    settings = QualitySettings(steps=300, lr=1e-3, seed=3)
    args = fit_args(settings, "mamba", 64, 128, tmp_path / "run")
    for expected in ("model.mixer=mamba", "model.d_model=64", "data=mqar", "data.seq_len=128", "data.num_kv_pairs=16",
                     "trainer.max_steps=300", "trainer.val_every=300", "optim.lr=0.001", "trainer.num_threads=1",
                     "optim.warmup_steps=10", "optim.min_lr_ratio=1.0", "optim.weight_decay=0.0", "optim.grad_clip=0.0",
                     "seed=3"):
        assert expected in args


@pytest.mark.parametrize("overrides, message", [
    ({"mixers": ("nope",)}, "unknown mixer 'nope'"),
    ({"grid": "diagonal"}, "valid: cross, full"),
    ({"seq_lens": (4,)}, "holds no pair"),
    ({"vocab_size": 12}, "too few keys"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in"),
    ({"weight_decay": -0.1}, "weight_decay and grad_clip >= 0"),
])
def test_bad_quality_settings_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        QualitySettings(**overrides)


def test_every_registered_mixer_is_in_the_sweep_and_trains_at_the_smallest_default_width(tmp_path):
    # The committed quick report once lacked mamba; every registered mixer must be a row, and each must
    # run at the narrowest default width (d=32, below the contract suite's 64).
    assert QualitySettings().mixer_names == list_mixers()
    assert {"attention", "hyena", "mamba", "mamba2", "retnet", "rwkv6", "s4d"} <= set(list_mixers())
    settings = tiny_quality(tmp_path, mixers=(), widths=(min(QualitySettings().widths),), seq_lens=(8,), steps=1,
                            batch_size=4, num_train=8, num_val=4)
    rows = run_quality_sweep(settings, progress=lambda line: None)
    assert [row["mixer"] for row in rows] == list_mixers()
    assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows if row["error"]]


def test_bench_reads_quality_true_and_checks_the_grid_name():
    assert parse_bench_settings(["quality=true"]).quality == "true"
    assert parse_bench_settings(["quality=false"]).quality == ""
    assert parse_bench_settings(["quality=runs/quality.json"]).quality == "runs/quality.json"
    with pytest.raises(ValueError, match="quality_grid='huge'; valid: quick, default"):
        parse_bench_settings(["quality_grid=huge"])


def test_sweep_writes_quality_json_and_the_report_section(tmp_path):
    settings = tiny_quality(tmp_path)
    lines = []
    rows = run_quality_sweep(settings, progress=lines.append)
    assert rows == json.loads((tmp_path / "quality" / "quality.json").read_text())
    cells = [(32, 16), (64, 16), (64, 32)]
    assert [(row["mixer"], row["d_model"], row["seq_len"]) for row in rows] == [
        (mixer, width, length) for width, length in cells for mixer in ("attention", "s4d")]
    assert len(lines) == len(rows)
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["status"] == "ok", row["error"]
        assert 0 <= row["accuracy"] <= 1 and row["chance"] == pytest.approx(1 / 16)
        assert row["num_kv_pairs"] == row["seq_len"] // 4 and row["parameters"] > 0
    assert (tmp_path / "quality" / "runs" / "s4d-d64-L32" / "summary.json").is_file()

    report = write_quality_report(rows, tmp_path / "report")
    text = report.read_text()
    assert {"quality.md", "accuracy_vs_width.png", "accuracy_vs_length.png"} <= {
        path.name for path in report.parent.iterdir()}
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| mixer | L | kv pairs | d=32 | d=64 |"
    by_length = {tuple(line.strip("| ").split(" | ")[:3]): line.strip("| ").split(" | ")[3:] for line in table[1:]}
    assert set(by_length) == {(mixer, length, pairs) for mixer in ("attention", "s4d")
                              for length, pairs in (("16", "4"), ("32", "8"))}
    accuracy = {(row["mixer"], row["seq_len"], row["d_model"]): f"{row['accuracy']:.3f}" for row in rows}
    assert by_length[("s4d", "16", "4")] == [accuracy[("s4d", 16, 32)], accuracy[("s4d", 16, 64)]]
    assert by_length[("s4d", "32", "8")] == ["—", accuracy[("s4d", 32, 64)]]


def test_a_failing_cell_is_a_row_not_a_crash_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    def failing_fit(args):
        raise RuntimeError("mixer cannot run at this width\nsecond line")

    monkeypatch.setattr(importlib.import_module("seqarch.train.fit"), "fit", failing_fit)
    rows = run_quality_sweep(tiny_quality(tmp_path, mixers=("attention",)), progress=lambda line: None)
    assert {row["status"] for row in rows} == {"error"}
    assert rows[0]["error"] == "RuntimeError: mixer cannot run at this width" and rows[0]["accuracy"] is None
    skipped = run_quality_sweep(tiny_quality(tmp_path, mixers=("s4d",), out=str(tmp_path / "again"), budget_s=1e-9),
                                progress=lambda line: None)
    assert all(row["status"] == "skipped" and row["accuracy"] is None for row in skipped[1:])
    text = write_quality_report(rows + skipped, tmp_path / "report").read_text()
    assert "| attention | 16 | 4 | error | error |" in text
    assert "| s4d | 32 | 8 | — | skipped |" in text
    assert "- attention d=32 L=16: RuntimeError: mixer cannot run at this width" in text


def test_bench_quality_true_runs_the_sweep_into_the_speed_report(tmp_path, monkeypatch):
    monkeypatch.setitem(GRIDS, "quick", {"widths": (32,), "seq_lens": (16,), "tokens_per_pair": 4, "vocab_size": 16,
                                         "steps": 1, "batch_size": 4, "num_train": 8, "num_val": 4})
    settings = tiny_settings(tmp_path, mixers=("attention",), modes=("prefill",), quality="true",
                             quality_grid="quick")
    rows = quality_rows(settings, progress=lambda line: None)
    assert [(row["mixer"], row["d_model"], row["seq_len"], row["status"]) for row in rows] == [
        ("attention", 32, 16, "ok")]
    saved = tmp_path / "out" / "quality" / "quality.json"
    assert json.loads(saved.read_text()) == rows

    from_file = tiny_settings(tmp_path, mixers=("attention",), modes=("prefill",), quality=str(saved),
                              out=str(tmp_path / "report"))
    text = run_bench(from_file, progress=lambda line: None, execute=in_process).read_text()
    section = text[text.index("## Quality: MQAR accuracy vs width and length"):]
    assert f"| attention | 16 | 4 | {rows[0]['accuracy']:.3f} |" in section
    assert "![accuracy vs width](accuracy_vs_width.png)" in section
    assert (tmp_path / "report" / "accuracy_vs_length.png").is_file()
