"""Byte corpora: the stdlib split, windows, user files, the unigram baseline."""

from __future__ import annotations

import math

import pytest
import torch

from seqarch.data import build_data
from seqarch.data.text import ByteWindows, split_by_name, stdlib_files, text_files_corpus, unigram_bits_per_byte


def test_stdlib_split_is_deterministic_disjoint_and_by_file():
    root, files = stdlib_files()
    assert len(files) > 100 and all(path.suffix == ".py" for path in files)
    assert not any("site-packages" in path.parts for path in files)
    train, val = split_by_name(root, files, 5.0)
    train_again, val_again = split_by_name(root, list(reversed(files)), 5.0)
    assert set(train) == set(train_again) and set(val) == set(val_again)  # order does not matter
    assert not set(train) & set(val) and len(train) + len(val) == len(files)
    assert 0.01 < len(val) / len(files) < 0.12


def test_byte_windows_targets_are_the_next_bytes():
    stream = torch.frombuffer(bytearray(b"abcdefghijk"), dtype=torch.uint8)
    windows = ByteWindows(stream, seq_len=3)
    assert len(windows) == 3  # offsets 0, 3, 6 each need 4 bytes
    inputs, targets = windows[1]
    assert bytes(inputs.tolist()) == b"def" and bytes(targets.tolist()) == b"efg"


def test_unigram_baseline_matches_a_hand_computation():
    train = torch.tensor(list(b"aaab"), dtype=torch.uint8)
    val = torch.tensor(list(b"ab"), dtype=torch.uint8)
    # add-one counts: a 4, b 2, 254 others 1 -> total 260
    expected = -(math.log2(4 / 260) + math.log2(2 / 260)) / 2
    assert unigram_bits_per_byte(train, val) == pytest.approx(expected, rel=1e-12)


def test_text_folder_and_single_file(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for index in range(30):
        (folder / f"note{index}.txt").write_text(f"note number {index}\n" * 20)
    train, val = text_files_corpus(str(folder), 10.0)
    assert train.numel() > 0 and val.numel() > 0
    # one newline between documents within each split: 30 files in two streams -> 28 separators
    assert train.numel() + val.numel() == sum(p.stat().st_size for p in folder.iterdir()) + 28
    single = tmp_path / "one.txt"
    single.write_bytes(bytes(range(100)))
    train, val = text_files_corpus(str(single), 10.0)
    assert bytes(train.tolist()) == bytes(range(90)) and bytes(val.tolist()) == bytes(range(90, 100))
    bundle = build_data("text", path=str(folder), seq_len=16, val_percent=10.0)
    assert bundle.vocab_size == 256 and bundle.metric == "bits_per_byte" and bundle.tokenizer == "bytes"


def test_text_source_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_data("text", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs data.path"):
        build_data("text")
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ValueError, match="too little text for seq_len 16"):
        build_data("text", path=str(tmp_path / "tiny.txt"), seq_len=16)
    with pytest.raises(ValueError, match="unknown data source 'wiki'; valid: stdlib, text, hf"):
        build_data("wiki")


def test_hf_source_without_datasets_says_how_to_get_it():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs the optional package `datasets`"):
            build_data("hf", dataset="wikitext")
    else:
        with pytest.raises(ValueError, match="exactly one of data.dataset"):
            build_data("hf")
