"""seqarch.bench: the harness writes every documented file and column, the memory probe sees a
known allocation, exponent fits and crossovers recover known values, an over-budget case is
recorded (not hung), and the analytic accounting matches textbook formulas without allocating.

Cases normally run in a fresh subprocess; the harness tests inject an in-process executor (same
measurement code, `case.run_case`) so that they take seconds. The two tests that exercise the real
subprocess path are marked slow because each pays for a fresh `import torch`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from seqarch import SeqLM, list_mixers
from seqarch.bench import bench_command, memory_command, parse_bench_settings, run_bench
from seqarch.bench.accounting import (
    PRESETS,
    account,
    count_parameters,
    match_width,
    matmul_flops_per_token,
    mixing_flops_per_token,
)
from seqarch.bench.analysis import crossover, crossover_length, fit_exponent
from seqarch.bench.memory import current_rss_bytes
from seqarch.bench.runner import COLUMNS, plan_widths, run_case
from tests.bench_helpers import in_process, tiny_settings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


# --- harness and report --------------------------------------------------------------------------
def test_harness_writes_every_file_with_the_documented_columns(tmp_path):
    settings = tiny_settings(tmp_path)
    report = run_bench(settings, progress=lambda line: None, execute=in_process)
    out = report.parent
    expected_files = {"results.json", "results.csv", "report.md", "decode_latency.png", "state_bytes.png",
                      "state_bytes_large.png"} | {f"{kind}_{mode}.png" for kind in ("throughput", "memory")
                                                  for mode in ("train", "prefill", "decode")}
    assert expected_files <= {path.name for path in out.iterdir()}
    with open(out / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    grid = {(mixer, mode, length) for mixer in list_mixers() for mode in ("train", "prefill", "decode")
            for length in ("8", "13")}
    assert {(row["mixer"], row["mode"], row["seq_len"]) for row in rows} == grid and len(rows) == len(grid)
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["tokens_per_s"]) > 0 and float(row["state_bytes"]) > 0 and int(row["samples"]) == 2
        assert int(row["params"]) > int(row["params_non_embedding"]) > 0
        assert (row["latency_ms"] != "") == (row["mode"] == "decode")
        if row["mode"] == "decode":  # the state actually held after the prefix equals state_nbytes
            assert row["state_bytes_measured"] == row["state_bytes"]
    saved = json.loads((out / "results.json").read_text())
    assert {"machine", "settings", "rows", "analytic_bench", "analytic_large"} <= set(saved)
    assert saved["machine"]["cpu_model"] and saved["machine"]["torch_version"] == torch.__version__
    text = report.read_text()
    for heading in ("## Machine and settings", "## Scaling exponents", "## Crossover against attention",
                    "## State bytes and analytic accounting", "## Quality: MQAR accuracy"):
        assert heading in text
    for image in expected_files - {"results.json", "results.csv", "report.md"}:
        assert f"({image})" in text, image


def test_hyena_filters_cover_the_longest_case_unless_the_user_sets_max_len(tmp_path):
    """Hyena's implicit filters exist below max_len (default 2048): a sweep to 4096 must raise it to
    the longest prefix plus decoded tokens, or every longer Hyena case fails."""
    settings = tiny_settings(tmp_path, seq_lens=(256, 4096), decode_tokens=8)
    assert settings.mixer_kwargs("hyena")["max_len"] == 4096 + 8
    assert "max_len" not in settings.mixer_kwargs("attention")
    chosen = tiny_settings(tmp_path, seq_lens=(256, 4096), mixer_overrides={"hyena": {"max_len": 9000}})
    assert chosen.mixer_kwargs("hyena")["max_len"] == 9000
    short = tiny_settings(tmp_path, seq_lens=(8, 13))
    assert short.mixer_kwargs("hyena")["max_len"] == 2048  # never below the default


def test_every_csv_column_is_documented():
    documented = DOCS.read_text()
    missing = [column for column in COLUMNS if f"`{column}`" not in documented]
    assert not missing, f"docs/benchmarks.md does not describe columns {missing}"


def test_quality_rows_fill_the_report_section(tmp_path):
    # accuracy = 0.1 + d / 1000 + L / 10^4: at L = 128, d = 32 -> 0.1448, d = 64 -> 0.1768
    quality = [{"mixer": mixer, "d_model": width, "seq_len": length, "accuracy": 0.1 + width / 1000 + length / 1e4}
               for mixer in ("attention", "s4d") for width in (32, 64) for length in (64, 128)]
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(quality))
    settings = tiny_settings(tmp_path, modes=("prefill",), seq_lens=(8,), quality=str(path))
    text = run_bench(settings, progress=lambda line: None, execute=in_process).read_text()
    assert "(accuracy_vs_width.png)" in text and "(accuracy_vs_length.png)" in text
    assert "| attention | 128 | 0.145 | 0.177 |" in text
    assert (tmp_path / "out" / "accuracy_vs_length.png").exists()


# --- the budget ----------------------------------------------------------------------------------
def test_over_budget_case_is_recorded_and_longer_lengths_skipped(tmp_path):
    def slow_attention(spec, budget_s):
        if spec["mixer"] == "attention" and spec["seq_len"] >= 13:
            return {"status": "over_budget", "wall_s": budget_s, "error": "killed"}
        return in_process(spec, budget_s)

    settings = tiny_settings(tmp_path, modes=("prefill",), seq_lens=(8, 13, 21), rounds=2)
    report = run_bench(settings, progress=lambda line: None, execute=slow_attention)
    saved = json.loads((report.parent / "results.json").read_text())
    rows = {(row["mixer"], row["seq_len"]): row for row in saved["rows"]}
    assert rows[("attention", 8)]["status"] == "ok" and rows[("attention", 8)]["samples"] == 4  # pooled rounds
    assert rows[("attention", 13)]["status"] == "over_budget"
    assert rows[("attention", 21)]["status"] == "skipped" and "L=13" in rows[("attention", 21)]["error"]
    assert rows[("s4d", 21)]["status"] == "ok"
    text = report.read_text()
    assert "over budget" in text
    ratio = rows[("s4d", 8)]["tokens_per_s"] / rows[("attention", 8)]["tokens_per_s"]
    assert f"| s4d | {ratio:.2f}x | — | — |" in text  # no ratio where the reference was not measured


@pytest.mark.slow
def test_a_case_that_would_run_for_hours_is_killed_at_its_budget():
    spec = {"mixer": "attention", "mode": "decode", "seq_len": 16, "d_model": 16, "n_layers": 1, "batch_size": 1,
            "vocab_size": 11, "warmup": 0, "repeats": 1, "decode_tokens": 10**9, "threads": 1}
    start = time.perf_counter()
    result = run_case(spec, budget_s=3.0)
    assert result["status"] == "over_budget"
    assert time.perf_counter() - start < 3.0 + 20.0  # killed, not waited for


# --- memory --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_peak_memory_of_a_known_allocation_is_measured_within_10_percent():
    size = 256 * 2**20
    result = run_case({"mode": "probe", "alloc_bytes": size, "threads": 1}, budget_s=300)
    assert result["status"] == "ok", result
    measured = result["peak_bytes"] - result["baseline_bytes"]
    assert abs(measured - size) <= 0.10 * size, f"measured {measured / 2**20:.1f} MiB for a 256 MiB tensor"


def test_peak_memory_is_the_case_own_even_when_the_parent_is_large():
    parent_block = torch.ones(512 * 2**20, dtype=torch.uint8)  # the parent's RSS exceeds the child's peak
    size = 64 * 2**20
    result = run_case({"mode": "probe", "alloc_bytes": size, "threads": 1}, budget_s=300)
    measured = result["peak_bytes"] - result["baseline_bytes"]
    assert abs(measured - size) <= 0.10 * size, f"measured {measured / 2**20:.1f} MiB for a 64 MiB tensor"
    del parent_block


def test_llama_2_13b_kv_cache_matches_the_textbook_formula_without_allocating():
    rss_before = current_rss_bytes()
    rows = {row["seq_len"]: row for row in account("attention", PRESETS["llama-2-13b"], [4096, 131072])}
    assert current_rss_bytes() - rss_before < 200 * 2**20  # 24 GiB of weights and 100 GiB of cache: not allocated
    # 2 (K and V) x 40 layers x 5120 channels x L tokens x 2 bytes (fp16)
    assert rows[4096]["state_bytes"] == 2 * 40 * 5120 * 4096 * 2  # ~3.4 GB
    assert rows[131072]["state_bytes"] == 2 * 40 * 5120 * 131072 * 2  # ~107 GB
    # Llama-2-13B has 13.016e9 parameters; our SwiGLU rounds its hidden width a little lower.
    assert abs(rows[4096]["params"] - 13.016e9) < 0.02 * 13.016e9
    # q k^T and the weighted sum of values over L keys: 2 * 2 * L * 5120 FLOPs per layer per token.
    assert rows[4096]["mixing_flops_per_token"] == 40 * 4 * 4096 * 5120
    assert rows[4096]["flops_per_token"] == rows[4096]["matmul_flops_per_token"] + rows[4096]["mixing_flops_per_token"]


@pytest.mark.parametrize("mixer", list_mixers())
def test_declared_flops_bound_what_torch_counts_in_a_decode_step(mixer):
    """torch's FlopCounterMode sees the matrix products of one decode step (not elementwise work):
    at least every per-token Linear, at most those plus the declared sequence-mixing FLOPs; the
    mixers whose step has no product beyond its Linear layers match exactly."""
    model = SeqLM(64, d_model=64, n_layers=2, mixer=mixer).eval()
    with torch.no_grad():
        _, state = model.prefill(torch.randint(0, 64, (1, 5)), model.init_state(1))
        _, state = model.step(torch.randint(0, 64, (1,)), state)  # Hyena grows its memoised taps here
        counter = FlopCounterMode(display=False)
        with counter:
            model.step(torch.randint(0, 64, (1,)), state)
    counted = counter.get_total_flops()
    mixing = [mixing_flops_per_token(layer.mixer, 7) for layer in model.layers]
    assert None not in mixing, f"{mixer} declares no flops_per_token"
    matmul = matmul_flops_per_token(model)
    assert matmul <= counted <= matmul + sum(mixing), (counted, matmul, mixing)
    if mixer in ("mamba", "s4d"):
        assert counted == matmul


@pytest.mark.parametrize("mixer", list_mixers())
def test_state_bytes_follow_state_grows_with_length(mixer):
    rows = account(mixer, PRESETS["gpt2-small"], [1024, 8192])
    grows = rows[0]["state_grows_with_length"]
    assert (rows[1]["state_bytes"] > rows[0]["state_bytes"]) == grows
    assert rows[0]["state_bytes"] > 0
    # a step reads its whole state, so decode FLOPs grow with the context exactly when the state does
    assert (rows[1]["mixing_flops_per_token"] > rows[0]["mixing_flops_per_token"]) == grows


def test_match_params_picks_the_closest_width():
    target = count_parameters("attention", 64, 2, 256)
    for mixer in list_mixers():
        width = match_width(mixer, target, 2, 256)
        error = abs(count_parameters(mixer, width, 2, 256) - target)
        for neighbour in (width - 16, width + 16):
            if neighbour >= 16:
                assert error <= abs(count_parameters(mixer, neighbour, 2, 256) - target)


def test_match_params_plans_one_width_per_mixer(tmp_path):
    settings = tiny_settings(tmp_path, match_params=True, d_model=128, n_layers=2, vocab_size=256)
    widths = plan_widths(settings)
    target = count_parameters("attention", 128, 2, 256)
    assert widths["attention"] == 128 and set(widths) == set(list_mixers())
    for mixer, width in widths.items():
        assert abs(count_parameters(mixer, width, 2, 256) - target) < 0.1 * target, (mixer, width)


def test_memory_command_prints_every_mixer_and_length(capsys):
    assert memory_command(["model=llama-2-13b", "seq_lens=[4096,131072]"]) == 0
    printed = capsys.readouterr().out
    assert "100.0 GiB" in printed and "3.1 GiB" in printed
    for mixer in list_mixers():
        assert printed.count(f"\n{mixer} ") == 2


# --- analysis ------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 1.0, 1.5, 2.0])
def test_exponent_fit_returns_the_known_slope(slope):
    lengths = [256, 512, 1024, 2048, 4096, 8192]
    wobble = [1.03, 0.98, 1.01, 0.97, 1.02, 1.0]  # +-3 % timing noise
    times = [3e-6 * length**slope * noise for length, noise in zip(lengths, wobble, strict=True)]
    assert abs(fit_exponent(lengths, times) - slope) < 0.02


def test_exponent_fit_needs_two_lengths():
    with pytest.raises(ValueError, match="2 distinct lengths"):
        fit_exponent([256, 256], [1.0, 2.0])


def test_crossover_is_interpolated_in_log_length():
    lengths = [256, 512, 1024, 2048, 4096]
    ratios = [(length / 1500) ** 0.5 for length in lengths]  # equal speed at L = 1500
    assert math.isclose(crossover_length(lengths, ratios), 1500, rel_tol=1e-9)
    assert crossover_length(lengths, [2.0] * 5) == 256  # faster everywhere
    assert crossover_length(lengths, [0.5] * 5) is None  # never faster
    assert math.isclose(crossover_length(lengths, [2, 0.5, 0.5, 2, 2]), 1024 * 2**0.5)  # the last crossing
    assert crossover_length(lengths, [0.5, 0.5, 0.5, math.inf, math.inf]) == 2048  # reference over budget from 2048


def test_crossover_counts_an_over_budget_reference_as_slower():
    def row(mixer, length, status, tokens_per_s=None):
        return {"mixer": mixer, "mode": "train", "seq_len": length, "status": status, "tokens_per_s": tokens_per_s}

    rows = [row("attention", 256, "ok", 100.0), row("s4d", 256, "ok", 50.0),
            row("attention", 512, "over_budget"), row("s4d", 512, "ok", 40.0),
            row("attention", 1024, "skipped"), row("s4d", 1024, "ok", 30.0)]
    assert crossover(rows, "s4d", "attention", "train")[0] == 512


# --- settings ------------------------------------------------------------------------------------
def test_overrides_parse_ranges_lists_and_mixer_keys():
    settings = parse_bench_settings(["mixers=all", "seq_lens=256..2048", "modes=[train,decode]", "s4d.d_state=8",
                                     "budget_s=5", "match_params=true"])
    assert settings.seq_lens == (256, 512, 1024, 2048) and settings.modes == ("train", "decode")
    assert settings.mixer_names == list_mixers() and settings.mixer_kwargs("s4d") == {"d_state": 8}
    assert settings.budget_s == 5.0 and settings.match_params
    assert parse_bench_settings(["mixers=attention,s4d", "seq_lens=64"]).seq_lens == (64,)


@pytest.mark.parametrize(("overrides", "message"), [
    (["seq_len=256"], "unknown key 'seq_len'; valid keys: .*seq_lens"),
    (["modes=[train,generate]"], "valid modes: train, prefill, decode"),
    (["mixers=mamba9"], "unknown mixer 'mamba9'; registered mixers: attention"),
    (["repeats=two"], "'repeats' .* must be int"),
    (["s4d.d_stat=8"], "unknown config key 'd_stat' for mixer 's4d'"),
    (["seq_lens=512..256"], "START..STOP"),
    (["budget_s"], "expected key=value"),
])
def test_bad_overrides_raise_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        bench_command(overrides)


def test_memory_command_rejects_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'llama-3'; valid: llama-2-7b"):
        memory_command(["model=llama-3"])


def test_standard_sweep_script_refuses_to_replace_results_without_overwrite(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run_standard_sweep.py"
    spec = importlib.util.spec_from_file_location("run_standard_sweep", script)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    monkeypatch.setattr(sweep, "RESULTS", tmp_path)
    (tmp_path / "standard").mkdir()
    (tmp_path / "standard" / "results.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["run_standard_sweep.py"])
    with pytest.raises(SystemExit) as stop:
        sweep.main()
    assert stop.value.code == 2
    assert "already holds a sweep's results; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "standard" / "results.json").read_text() == "{}"
    assert not (tmp_path / "standard" / "machine.json").exists()
