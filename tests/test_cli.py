"""The command line end to end: every recipe, run folders, resume, generate, and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from seqarch import list_mixers
from seqarch.cli import main
from seqarch.models.lm import SeqLM
from seqarch.train.config import list_recipes, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_every=2",
        "trainer.val_batches=1", "trainer.log_every=1", "trainer.num_threads=1", "trainer.progress=false",
        "optim.warmup_steps=1"]


def only_run(out_dir: Path, recipe: str) -> Path:
    runs = sorted((out_dir / recipe).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def recipe_mixers(recipe: str) -> list[str]:
    mixer = load_recipe(recipe)["model"]["mixer"]
    return [mixer] if isinstance(mixer, str) else mixer


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny s4d run (2 steps, byte data from a small folder) shared by the tests that read it."""
    out = tmp_path_factory.mktemp("runs")
    corpus = out / "corpus"
    corpus.mkdir()
    for index in range(40):
        (corpus / f"doc{index}.txt").write_text(f"def function_{index}(x):\n    return x * {index}\n" * 8)
    assert main(["fit", "recipe=s4d", *TINY, "data=text", f"data.path={corpus}", f"out_dir={out}"]) == 0
    return only_run(out, "s4d")


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_recipe_trains_through_the_cli_or_names_the_missing_mixer(recipe, tmp_path, capsys):
    missing = [name for name in recipe_mixers(recipe) if name not in list_mixers()]
    code = main(["fit", f"recipe={recipe}", *TINY, f"out_dir={tmp_path}"])
    captured = capsys.readouterr()
    if missing:
        assert code == 2
        assert captured.err == (f"seqarch fit: mixer {missing[0]!r} is not registered (yet); "
                                f"registered: {', '.join(list_mixers())}\n")
        assert not any(tmp_path.iterdir())  # nothing written for a run that cannot start
        return
    assert code == 0, captured.err
    run = only_run(tmp_path, recipe)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["layers"] == recipe_mixers(recipe) * (
        load_recipe(recipe)["model"]["n_layers"] // len(recipe_mixers(recipe)))
    assert summary["metric"] == "bits_per_byte" and 4 < summary["baseline"] < 6
    assert summary["val_bits_per_byte"] > 0 and summary["tokens_trained"] == 2 * 4 * 32
    assert "val bits/byte" in captured.out and str(run) in captured.out


def test_run_folder_holds_config_metrics_checkpoints_and_summary(trained):
    assert {p.name for p in trained.iterdir()} >= {"config.yaml", "metrics.csv", "summary.json", "checkpoints"}
    assert {p.name for p in (trained / "checkpoints").iterdir()} == {"last.ckpt", "best.ckpt"}
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["model"]["d_model"] == 32 and config["data"]["source"] == "text"
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert any(row["val_loss"] for row in rows) and any(row["loss"] for row in rows)
    summary = json.loads((trained / "summary.json").read_text())
    for key in ("parameters", "tokens_per_s", "val_loss", "val_perplexity", "val_bits_per_byte", "baseline"):
        assert summary[key] is not None and summary[key] > 0, key
    assert summary["val_perplexity"] == pytest.approx(torch.tensor(summary["val_loss"]).exp().item(), rel=1e-4)


def test_runs_never_overwrite_each_other(tmp_path, trained):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    corpus = config["data"]["path"]
    args = ["fit", "recipe=s4d", *TINY, "trainer.max_steps=1", "data=text", f"data.path={corpus}",
            f"out_dir={tmp_path}"]
    assert main(args) == 0 and main(args) == 0
    assert len(list((tmp_path / "s4d").iterdir())) == 2


def test_resume_continues_the_step_count_and_the_optimizer_state(tmp_path, trained, capsys):
    code = main(["fit", f"ckpt={trained}", "trainer.max_steps=4", f"out_dir={tmp_path}", "trainer.progress=false"])
    assert code == 0, capsys.readouterr().err
    resumed = only_run(tmp_path, "s4d")
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == str(trained / "checkpoints" / "last.ckpt")
    assert summary["tokens_trained"] == 2 * 4 * 32  # this session trained steps 3 and 4 only
    before = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    after = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert before["global_step"] == 2 and after["global_step"] == 4
    adam_before = before["optimizer_states"][0]["state"]
    adam_after = after["optimizer_states"][0]["state"]
    assert all(float(state["step"]) == 2 for state in adam_before.values())
    assert all(float(state["step"]) == 4 for state in adam_after.values())  # restored, then 2 more steps
    assert after["lr_schedulers"][0]["last_epoch"] == 4
    steps = [int(row["step"]) for row in csv.DictReader((resumed / "metrics.csv").open())]
    assert min(steps) >= 2


def test_generate_samples_from_a_run_through_the_recurrent_path(trained, capsys):
    assert main(["generate", f"ckpt={trained}", "prompt=def ", "max_new_tokens=6", "temperature=0"]) == 0
    printed = capsys.readouterr().out
    contents = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    model = SeqLM.from_config(contents["hyper_parameters"]["model_kwargs"]).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in contents["state_dict"].items()})
    tokens = torch.tensor([list(b"def ")])
    with torch.no_grad():
        for _ in range(6):  # greedy decoding by full forward passes, independent of the recurrent path
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert printed == bytes(tokens[0].tolist()).decode("utf-8", errors="replace") + "\n"


def test_print_config_shows_the_resolved_config_and_writes_nothing(tmp_path, capsys):
    assert main(["fit", "recipe=transformer", "model.d_model=64", f"out_dir={tmp_path}", "print_config=true"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["d_model"] == 64 and shown["model"]["mixer"] == "attention"
    assert shown["data"]["source"] == "stdlib" and shown["trainer"]["max_steps"] > 0
    assert not any(tmp_path.iterdir())


def test_list_shows_mixers_recipes_and_data_sources(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("mixers:", "recipes:", "data sources:", "attention", "s4d", "hybrid", "mqar", "stdlib"):
        assert word in out


def _bad_inputs(trained: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint")
    return [
        (["train"], "seqarch: unknown command 'train'; valid commands: fit, generate, list"),
        (["fit", "recipe=nope"], "seqarch fit: unknown recipe 'nope'; valid: deltanet, gated_deltanet, hybrid"),
        (["fit", "recipe=s4d", "optim.lrr=1"], "seqarch fit: unknown config key 'lrr' for optim; valid keys:"),
        (["fit", "recipe=s4d", "data=wiki"], "seqarch fit: unknown data source 'wiki'; valid: stdlib, text"),
        (["fit", "recipe=s4d", "model.mixer=lstm"], "seqarch fit: mixer 'lstm' is not registered (yet); registered:"),
        (["fit", "recipe=s4d", "model.s4d.d_stat=3"],
         "seqarch fit: model: unknown config key 'd_stat' for mixer 's4d'"),
        (["fit", "recipe=s4d", "trainer.max_steps=2.5"], "seqarch fit: config key 'max_steps' for trainer must be int"),
        (["fit", f"ckpt={tmp_path / 'missing.ckpt'}"], "does not exist; give a .ckpt file or a run folder"),
        (["fit", f"ckpt={corrupt}"], "is corrupt or not a checkpoint"),
        (["fit", f"ckpt={trained}"], "is at step 2; set trainer.max_steps above it"),
        (["fit", "recipe=s4d", f"run_dir={trained}"], f"run_dir {str(trained)!r} already exists"),
        (["generate", f"ckpt={corrupt}"], "seqarch generate: checkpoint"),
        (["generate", f"ckpt={trained}", "max_new_tokens=-1"], "max_new_tokens must be a non-negative int"),
        (["generate", f"ckpt={trained}", "colour=red"], "unknown key 'colour' for generate"),
        (["list", "extra"], "list takes no arguments"),
    ]


def test_bad_input_is_one_line_exit_code_2_and_nothing_is_lost(trained, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*")}
    for argv, message in _bad_inputs(trained, tmp_path):
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 2, argv
        assert message in captured.err, (argv, captured.err)
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*")} == before


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "seqarch.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_console_entry_point_reports_bad_input_without_a_traceback(tmp_path):
    result = run_cli("fit", "recipe=nope", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("seqarch fit: unknown recipe 'nope'") and result.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.timeout(900)  # two processes each import Lightning; on a loaded 2-core machine that alone takes minutes
def test_ddp_trains_two_steps_over_two_cpu_processes(tmp_path):
    result = run_cli("fit", "recipe=transformer", *TINY, "trainer.strategy=ddp", "trainer.devices=2",
                     f"out_dir={tmp_path}", cwd=tmp_path, timeout=840)
    assert result.returncode == 0, result.stderr[-2000:]
    run = only_run(tmp_path, "transformer")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["tokens_trained"] == 2 * 2 * 4 * 32  # two processes, each a batch of 4 x 32 per step
    assert result.stdout.count("seqarch fit: transformer done") == 1


def test_generate_from_a_task_model_reads_and_prints_token_ids(tmp_path, capsys):
    args = ["fit", "recipe=transformer", "data=induction", "data.seq_len=16", "data.vocab_size=8", "data.batch_size=4",
            "data.num_train=16", "data.num_val=8", "model.d_model=16", "model.n_layers=1", "model.attention.n_heads=2",
            "trainer.max_steps=1", "trainer.val_every=1", "trainer.val_batches=1", "trainer.num_threads=1",
            "trainer.progress=false", f"out_dir={tmp_path}"]
    assert main(args) == 0
    run = only_run(tmp_path, "transformer")
    capsys.readouterr()
    assert main(["generate", f"ckpt={run}", "prompt=3 5 0", "max_new_tokens=4", "temperature=0"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:3] == ["3", "5", "0"] and len(printed) == 7 and all(0 <= int(t) < 8 for t in printed)
    assert main(["generate", f"ckpt={run}", "prompt=hello"]) == 2
    assert "this model reads token ids" in capsys.readouterr().err
