"""Data sources by name: each a frozen config dataclass and a builder returning a `DataBundle`.

    bundle = build_data("mqar", seq_len=64, num_kv_pairs=8)    # keys as in the recipe's data section
    bundle.train[0]  ->  (inputs (L,), targets (L,)) int64, targets == IGNORE where not scored

Byte-level text sources (`stdlib`, `text`, `hf`) are scored in bits per byte against the unigram
baseline of their own training split; synthetic tasks (`mqar`, `induction`, `selective_copy`) in
accuracy on the scored positions against chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, TensorDataset

from seqarch.configs import make_config
from seqarch.data.passkey import passkey_batch, passkey_overhead
from seqarch.data.synthetic import induction_heads, multiquery_associative_recall, selective_copying
from seqarch.data.text import (
    BYTE_VOCAB,
    ByteWindows,
    hf_corpus,
    stdlib_corpus,
    text_files_corpus,
    unigram_bits_per_byte,
)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    vocab_size: int
    metric: Literal["bits_per_byte", "accuracy"]  # the headline metric of this source
    baseline: float  # unigram bits per byte of the validation split, or chance accuracy
    baseline_name: str  # "unigram" or "chance"
    tokenizer: Literal["bytes", "ids"]  # how `seqarch generate` turns a prompt into tokens
    description: str  # one line for the summary


def _check_common(owner: str, seq_len: int, batch_size: int) -> None:
    if seq_len < 2:
        raise ValueError(f"{owner}: seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"{owner}: batch_size must be >= 1, got {batch_size}")


@dataclass(frozen=True)
class StdlibConfig:
    seq_len: int = 256  # bytes per training window
    batch_size: int = 16
    val_percent: float = 5.0  # share of files (by path hash) held out for validation

    def __post_init__(self):
        _check_common("data 'stdlib'", self.seq_len, self.batch_size)
        if not 0 < self.val_percent < 100:
            raise ValueError(f"data 'stdlib': val_percent must be in (0, 100), got {self.val_percent}")


@dataclass(frozen=True)
class TextConfig:
    path: str | None = None  # a text file or a folder of text files (required)
    seq_len: int = 256
    batch_size: int = 16
    val_percent: float = 5.0  # files by path hash, or the tail of a single file

    def __post_init__(self):
        _check_common("data 'text'", self.seq_len, self.batch_size)
        if self.path is None:
            raise ValueError("data 'text' needs data.path=<a text file or a folder of text files>")
        if not 0 < self.val_percent < 100:
            raise ValueError(f"data 'text': val_percent must be in (0, 100), got {self.val_percent}")


@dataclass(frozen=True)
class HFConfig:
    dataset: str | None = None  # a Hugging Face hub name (needs the `datasets` package)
    path: str | None = None  # or local data files (.txt, .json, .jsonl, .csv, .parquet)
    split: str = "train"  # the split to read; validation is carved out of it
    text_field: str = "text"  # the column holding the text
    seq_len: int = 256
    batch_size: int = 16
    val_percent: float = 5.0  # every round(100 / val_percent)-th record goes to validation

    def __post_init__(self):
        _check_common("data 'hf'", self.seq_len, self.batch_size)


@dataclass(frozen=True)
class MQARConfig:
    seq_len: int = 64  # tokens per example; needs 4 * num_kv_pairs <= seq_len, as in Zoology
    vocab_size: int = 256  # keys from [1, V/2), values from [V/2, V)
    num_kv_pairs: int = 8
    power_a: float = 0.01  # query gaps drawn with probability ~ gap^(power_a - 1)
    random_non_queries: bool = True  # fill non-query slots with random tokens (else 0)
    batch_size: int = 64
    num_train: int = 20000  # fixed training set, as Zoology trains on a fixed set
    num_val: int = 1000

    def __post_init__(self):
        _check_common("data 'mqar'", self.seq_len, self.batch_size)
        if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"data 'mqar': need 1 <= num_kv_pairs <= seq_len / 4, got {self.num_kv_pairs} "
                             f"with seq_len {self.seq_len}")
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"data 'mqar': vocab_size {self.vocab_size} has too few keys for "
                             f"{self.num_kv_pairs} pairs; need vocab_size >= {2 * self.num_kv_pairs + 2}")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError("data 'mqar': num_train and num_val must be >= 1")


@dataclass(frozen=True)
class InductionConfig:
    seq_len: int = 64
    vocab_size: int = 32  # token 0 is the trigger, answers and noise from [1, V)
    batch_size: int = 64
    num_train: int = 20000
    num_val: int = 1000

    def __post_init__(self):
        _check_common("data 'induction'", self.seq_len, self.batch_size)
        if self.seq_len < 4 or self.vocab_size < 3:
            raise ValueError("data 'induction': need seq_len >= 4 and vocab_size >= 3")


@dataclass(frozen=True)
class SelectiveCopyConfig:
    seq_len: int = 64  # context (seq_len - num_tokens) plus one copy marker per token
    vocab_size: int = 16  # 0 noise, 1 marker, data tokens from [2, V)
    num_tokens: int = 8
    batch_size: int = 64
    num_train: int = 20000
    num_val: int = 1000

    def __post_init__(self):
        _check_common("data 'selective_copy'", self.seq_len, self.batch_size)
        if not 1 <= self.num_tokens <= (self.seq_len) // 2 or self.vocab_size < 3:
            raise ValueError("data 'selective_copy': need 1 <= num_tokens <= seq_len / 2 and vocab_size >= 3")


@dataclass(frozen=True)
class PasskeyConfig:
    seq_len: int = 128  # bytes per example (haystack plus question plus answer)
    num_digits: int = 5  # digits of the key; only these are scored
    min_len: int | None = None  # shortest haystack drawn (uniform up to seq_len); None: the shortest possible
    batch_size: int = 32
    num_train: int = 20000  # fixed training set, seeded
    num_val: int = 1000

    def __post_init__(self):
        _check_common("data 'passkey'", self.seq_len, self.batch_size)
        if self.num_digits < 1:
            raise ValueError(f"data 'passkey': num_digits must be >= 1, got {self.num_digits}")
        shortest = passkey_overhead(self.num_digits)
        if self.seq_len < shortest:
            raise ValueError(f"data 'passkey': seq_len {self.seq_len} is too short for a {self.num_digits}-digit "
                             f"key; need seq_len >= {shortest}")
        if self.min_len is not None and not shortest <= self.min_len <= self.seq_len:
            raise ValueError(f"data 'passkey': min_len must be in [{shortest}, seq_len={self.seq_len}], "
                             f"got {self.min_len}")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError("data 'passkey': num_train and num_val must be >= 1")


def _byte_bundle(train: torch.Tensor, val: torch.Tensor, seq_len: int, what: str) -> DataBundle:
    if val.numel() <= seq_len or train.numel() <= seq_len:
        raise ValueError(f"{what}: too little text for seq_len {seq_len} "
                         f"({train.numel()} training and {val.numel()} validation bytes)")
    return DataBundle(ByteWindows(train, seq_len), ByteWindows(val, seq_len), BYTE_VOCAB, "bits_per_byte",
                      unigram_bits_per_byte(train, val), "unigram", "bytes",
                      f"{what}: {_size(train.numel())} train, {_size(val.numel())} validation, bytes")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def _task_bundle(make, config, seed: int, vocab_size: int, answers: int, what: str) -> DataBundle:
    train = make(config.num_train, generator=torch.Generator().manual_seed(seed))
    val = make(config.num_val, generator=torch.Generator().manual_seed(seed + 1_000_003))
    return DataBundle(TensorDataset(*train), TensorDataset(*val), vocab_size, "accuracy", 1 / answers, "chance",
                      "ids", f"{what}: {config.num_train} train / {config.num_val} validation examples")


def _stdlib(config: StdlibConfig, seed: int) -> DataBundle:
    return _byte_bundle(*stdlib_corpus(config.val_percent), config.seq_len, "Python standard library source")


def _text(config: TextConfig, seed: int) -> DataBundle:
    return _byte_bundle(*text_files_corpus(config.path, config.val_percent), config.seq_len, f"text {config.path}")


def _hf(config: HFConfig, seed: int) -> DataBundle:
    streams = hf_corpus(config.dataset, config.path, config.split, config.text_field, config.val_percent)
    return _byte_bundle(*streams, config.seq_len, f"hf {config.dataset or config.path}")


def _mqar(c: MQARConfig, seed: int) -> DataBundle:
    def make(n, generator):
        return multiquery_associative_recall(n, c.seq_len, c.vocab_size, c.num_kv_pairs, c.power_a,
                                             c.random_non_queries, generator)
    return _task_bundle(make, c, seed, c.vocab_size, c.vocab_size - c.vocab_size // 2,
                        f"MQAR, {c.num_kv_pairs} pairs")


def _induction(c: InductionConfig, seed: int) -> DataBundle:
    return _task_bundle(lambda n, generator: induction_heads(n, c.seq_len, c.vocab_size, generator),
                        c, seed, c.vocab_size, c.vocab_size - 1, "induction heads")


def _selective_copy(c: SelectiveCopyConfig, seed: int) -> DataBundle:
    return _task_bundle(lambda n, generator: selective_copying(n, c.seq_len, c.vocab_size, c.num_tokens, generator),
                        c, seed, c.vocab_size, c.vocab_size - 2, f"selective copying, {c.num_tokens} tokens")


def _passkey(c: PasskeyConfig, seed: int) -> DataBundle:
    min_len = c.min_len if c.min_len is not None else passkey_overhead(c.num_digits)

    def make(n, generator):
        return passkey_batch(n, c.seq_len, c.num_digits, min_len, generator)
    bundle = _task_bundle(make, c, seed, BYTE_VOCAB, 10, f"passkey retrieval, {c.num_digits} digits")
    bundle.tokenizer = "bytes"
    return bundle


@dataclass(frozen=True)
class DataSource:
    config_cls: type
    build: Any  # (config, seed) -> DataBundle
    summary: str  # one line for `seqarch list`


DATA_SOURCES: dict[str, DataSource] = {
    "stdlib": DataSource(StdlibConfig, _stdlib, "bytes of this Python's standard library source, split by file"),
    "text": DataSource(TextConfig, _text, "bytes of your text file or folder: data.path=..."),
    "hf": DataSource(HFConfig, _hf, "a Hugging Face dataset by name or local files (needs `datasets`)"),
    "mqar": DataSource(MQARConfig, _mqar, "multi-query associative recall (Zoology)"),
    "induction": DataSource(InductionConfig, _induction, "induction heads: recall the token after a trigger"),
    "selective_copy": DataSource(SelectiveCopyConfig, _selective_copy, "selective copying (Mamba, section 3.1)"),
    "passkey": DataSource(PasskeyConfig, _passkey, "passkey retrieval in byte filler at random depth and length"),
}


def data_config(name: str, **overrides: Any):
    """The validated config of data source `name`; ValueError names unknown sources and keys."""
    if name not in DATA_SOURCES:
        raise ValueError(f"unknown data source {name!r}; valid: {', '.join(DATA_SOURCES)}")
    return make_config(DATA_SOURCES[name].config_cls, owner=f"data source {name!r}", **overrides)


def build_data(name: str, seed: int = 0, **overrides: Any) -> DataBundle:
    """Build data source `name` with its config keys overridden; synthetic sets are seeded by `seed`."""
    config = data_config(name, **overrides)
    return DATA_SOURCES[name].build(config, seed)


__all__ = ["DATA_SOURCES", "DataBundle", "build_data", "data_config"]
