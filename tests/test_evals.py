"""Passkey data, perplexity vs length and passkey scoring, and `seqarch eval` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from seqarch.cli import main
from seqarch.data.passkey import NEEDLE, QUESTION, passkey_example, passkey_overhead
from seqarch.data.sources import build_data
from seqarch.data.synthetic import IGNORE
from seqarch.evals.passkey import passkey_accuracy, passkey_trials, score_answers
from seqarch.evals.perplexity import perplexity_vs_length, window_nll
from seqarch.models.lm import SeqLM

TINY = ["model.d_model=32", "model.n_layers=2", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_every=2",
        "trainer.val_batches=1", "trainer.num_threads=1", "trainer.progress=false", "optim.warmup_steps=1"]
NEEDLE_START = NEEDLE.split(b"{")[0]  # b"the pass key is "


class Oracle(nn.Module):
    """Predicts the next byte of a passkey answer by reading the key after the needle in its input;
    every other position gets uniform logits. `wrong_after` > 0 makes it answer 0 beyond that many bytes."""

    def __init__(self, wrong_after: int = 0):
        super().__init__()
        self.wrong_after = wrong_after

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, 256)
        for row, sequence in enumerate(tokens.tolist()):
            text = bytes(sequence)
            key_start = text.index(NEEDLE_START) + len(NEEDLE_START)
            answer_start = text.index(QUESTION) + len(QUESTION)
            for position in range(answer_start - 1, len(text)):
                digit = text[key_start + position - answer_start + 1]
                far = self.wrong_after and len(text) > self.wrong_after
                logits[row, position, ord("0") if far else digit] = 10.0
        return logits


class Uniform(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, 256)


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_example_has_the_needle_at_its_depth_and_the_answer_last(depth):
    length = 301
    example, answer_start = passkey_example(length, depth, "40913", filler_offset=17)
    text = bytes(example)
    assert len(example) == length and answer_start == length - 5 and text.endswith(QUESTION + b"40913")
    needle = NEEDLE.replace(b"{key}", b"40913")
    assert text.count(needle) == 1
    filler = length - passkey_overhead(5)
    assert text.index(needle) == round(depth * filler)
    with pytest.raises(ValueError, match="too short"):
        passkey_example(passkey_overhead(5) - 1, 0.5, "40913")
    with pytest.raises(ValueError, match="depth"):
        passkey_example(200, 1.5, "40913")


def test_passkey_source_scores_only_the_digits_at_random_lengths():
    bundle = build_data("passkey", seed=3, seq_len=160, num_train=64, num_val=8)
    inputs, targets = bundle.train[:]
    assert inputs.shape == targets.shape == (64, 160) and bundle.vocab_size == 256 and bundle.metric == "accuracy"
    assert (targets[:, :-5] == IGNORE).all()
    assert ((targets[:, -5:] >= ord("0")) & (targets[:, -5:] <= ord("9"))).all()
    padding = (inputs == 0).sum(dim=1)
    assert padding.max() > 40 and len(set(padding.tolist())) > 10  # haystack lengths vary
    for row in range(64):
        text = bytes(inputs[row].tolist()).lstrip(b"\0")
        key = bytes(targets[row, -5:].tolist())
        assert NEEDLE.replace(b"{key}", key) in text and text.endswith(QUESTION + key[:4])
    with pytest.raises(ValueError, match="seq_len >= 79"):
        build_data("passkey", seq_len=60)


def test_passkey_accuracy_table_shape_and_range():
    lengths, depths = [100, 257], [0.0, 0.5, 1.0]
    perfect = passkey_accuracy(Oracle(), lengths, depths, trials=4)
    assert [(r["length"], r["depth"]) for r in perfect] == [(n, d) for n in lengths for d in depths]
    assert all(r["accuracy"] == 1.0 and r["digit_accuracy"] == 1.0 for r in perfect)
    short_only = passkey_accuracy(Oracle(wrong_after=150), lengths, depths, trials=30)
    assert all(r["accuracy"] == 1.0 for r in short_only if r["length"] == 100)
    for row in (r for r in short_only if r["length"] == 257):  # always answers 0: ~1 digit in 10 right
        assert row["accuracy"] == 0.0 and 0.0 < row["digit_accuracy"] < 0.25
    with pytest.raises(ValueError, match="need lengths >= 79"):
        passkey_accuracy(Oracle(), [50], depths)


def test_teacher_forced_exact_match_equals_greedy_decoding():
    model = SeqLM(vocab_size=256, d_model=32, n_layers=1, attention={"n_heads": 2}).eval()
    with torch.no_grad():  # bias the head towards digits so that greedy decoding sometimes gets some right
        model.head.weight[ord("0"):ord("9") + 1] *= 4
    examples = passkey_trials(90, 0.5, 6, num_digits=2, seed=0)
    exact, _ = score_answers(model, examples, num_digits=2)
    decoded = model.generate(examples[:, :-2], 2, temperature=0)[:, -2:]
    assert torch.equal(exact, (decoded == examples[:, -2:]).all(dim=1))
    first_digit = model(examples[:, :-2])[:, -1].argmax(-1)
    assert torch.equal(first_digit, decoded[:, 0])


def test_perplexity_rows_and_the_uniform_model():
    stream = torch.randint(0, 256, (3000,), dtype=torch.uint8)
    rows = perplexity_vs_length(Uniform(), stream, [16, 100, 1000], num_windows=5)
    assert [r["length"] for r in rows] == [16, 100, 1000] and [r["windows"] for r in rows] == [2, 2, 2]
    for row in rows:
        assert math.isclose(row["perplexity"], 256.0, rel_tol=1e-6)
        assert math.isclose(row["bits_per_token"], 8.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="shorter than length"):
        perplexity_vs_length(Uniform(), stream, [16, 5000])


def test_every_length_scores_the_text_before_the_same_end_points():
    seen = []

    class Recorder(Uniform):
        def forward(self, tokens):
            seen.append(tokens[:, -1].clone())
            return super().forward(tokens)

    stream = torch.randint(0, 256, (2000,), dtype=torch.uint8)
    perplexity_vs_length(Recorder(), stream, [10, 64, 400], num_windows=3, batch_size=8)
    assert len(seen) == 3 and all(torch.equal(last, seen[0]) for last in seen)
    assert torch.equal(seen[0], stream[torch.tensor([399, 799, 1199])].long())


def test_last_half_scoring_skips_the_first_half():
    class FirstHalfWrong(nn.Module):  # certain and right on the second half, uniform on the first
        def forward(self, tokens):
            logits = torch.zeros(*tokens.shape, 256)
            length = tokens.shape[1]
            logits[:, length // 2:].scatter_(-1, windows[:, 1:][:, length // 2:, None], 50.0)
            return logits

    windows = torch.randint(0, 256, (3, 41))
    assert window_nll(FirstHalfWrong(), windows, "last_half").max() < 1e-6
    expected = (40 - 20) / 40 * math.log(256)
    assert torch.allclose(window_nll(FirstHalfWrong(), windows, "all"), torch.full((3,), expected), rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("eval-runs")
    attention = out / "attention"
    assert main(["fit", "recipe=transformer", *TINY, "model.attention.n_heads=2", "data=passkey", "data.seq_len=96",
                 "data.num_train=16", "data.num_val=4", f"run_dir={attention}"]) == 0
    s4d = out / "s4d"
    assert main(["fit", "recipe=s4d", *TINY, "model.d_model=64", "data.seq_len=32", f"run_dir={s4d}"]) == 0
    return {"attention": attention, "s4d": s4d}


def test_eval_passkey_writes_a_fresh_results_folder(runs, capsys):
    args = ["eval", f"ckpt={runs['attention']}", "task=passkey", "depths=[0,1]", "trials=2", "rope_scaling=yarn"]
    assert main(args) == 0
    assert main(args) == 0
    folders = sorted((runs["attention"] / "evals" / "passkey-yarn").iterdir())
    assert len(folders) == 2  # the second eval did not overwrite the first
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == {"results.json", "results.csv", "results.md", "heatmap.png"}
    result = json.loads((folders[0] / "results.json").read_text())
    assert [r["length"] for r in result["rows"]] == [96, 96, 192, 192, 384, 384, 768, 768]  # 48 is too short
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["digit_accuracy"] <= 1 for r in result["rows"])
    assert result["settings"]["rope_factor"] == 8.0 and result["settings"]["max_position"] == 96
    assert (folders[0] / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "| depth \\ length |" in capsys.readouterr().out


def test_evaluate_runs_on_the_requested_threads_and_restores_them(runs, monkeypatch):
    """evaluate() itself honours num_threads (scripts call it without the CLI), and puts it back."""
    import seqarch.evals.command as command

    seen = []
    original = command._evaluate
    monkeypatch.setattr(command, "_evaluate", lambda contents, options: seen.append(torch.get_num_threads())
                        or original(contents, options))
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    options = command.parse_eval_config([f"ckpt={runs['attention']}", "task=passkey", "depths=[0]", "trials=1",
                                         "lengths=[96]", f"num_threads={wanted}"])
    command.evaluate(command.read_checkpoint(str(runs["attention"]))[1], options)
    assert seen == [wanted]
    assert torch.get_num_threads() == before


def test_eval_ppl_rescales_attention_and_ignores_scaling_for_other_mixers(runs, tmp_path, capsys):
    rows = {}
    for scaling in ("keep", "linear"):
        assert main(["eval", f"ckpt={runs['attention']}", "task=ppl", "lengths=[64,192]", "windows=2",
                     f"rope_scaling={scaling}", f"out={tmp_path / scaling}"]) == 0
        rows[scaling] = json.loads((tmp_path / scaling / "results.json").read_text())["rows"]
        assert all(r["perplexity"] > 1 and math.isfinite(r["perplexity"]) for r in rows[scaling])
    assert rows["keep"][1]["nll"] != rows["linear"][1]["nll"]  # the same weights under another RoPE
    capsys.readouterr()
    assert main(["eval", f"ckpt={runs['s4d']}", "task=ppl", "windows=2", "rope_scaling=yarn",
                 f"out={tmp_path / 's4d'}"]) == 0
    output = capsys.readouterr().out
    assert "note: rope_scaling=yarn ignored: mixer s4d has no RoPE" in output
    lengths = [r["length"] for r in json.loads((tmp_path / "s4d" / "results.json").read_text())["rows"]]
    assert lengths == [16, 32, 64, 128, 256]


@pytest.mark.parametrize(("args", "message"), [
    (["task=ppl"], "eval needs ckpt="),
    (["task=bleu"], "task must be one of ppl, passkey"),
    (["task=ppl", "rope_scaling=xpos"], "rope_scaling must be one of"),
    (["task=passkey", "depths=[0,2]"], "depths must be a non-empty list of numbers in [0, 1]"),
    (["task=ppl", "lengths=64"], "lengths must be a non-empty list of ints >= 2"),
    (["task=ppl", "beam=4"], "unknown key 'beam' for eval"),
    (["task=passkey", "lengths=[40]"], "need lengths >= 79"),
])
def test_eval_bad_input_is_one_line(runs, args, message, capsys):
    ckpt = [] if args == ["task=ppl"] else [f"ckpt={runs['attention']}"]
    assert main(["eval", *ckpt, *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_eval_never_writes_into_an_existing_folder(runs, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["eval", f"ckpt={runs['attention']}", "task=ppl", "windows=1", f"out={tmp_path / 'taken'}"]) == 2
    assert "already exists" in capsys.readouterr().err and not any((tmp_path / "taken").iterdir())
