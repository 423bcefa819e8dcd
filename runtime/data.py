"""Data pipeline: byte-level documents, a stable validation split, deterministic global batches.

The vocabulary is the 256 byte values (``encode``/``decode``). ``build_dataset`` loads
``data.source``, checks every token id against the model's vocab, drops documents of fewer
than 2 tokens (a language model needs a next token), splits off validation documents and
applies ``data.long_sequence_policy`` to documents over ``data.max_seq_len``. Tokens are
stored once, in one flat array (Megatron's memory map for ``megatron``); a batch copies only
its own sequences, so no step re-tokenises anything.

Sources:

- ``embedded`` (default): real text present on any Debian machine with Python 3.11 and this
  project's venv, no download, in the domains ``DOMAINS`` (code, prose, tables), at most
  ``DOMAIN_BUDGET_BYTES`` of files each (``runtime/corpus.py`` says which). A document is a
  natural unit of a file, not the whole file: a top-level ``def``/``class`` block or module
  header of Python code, a section of prose, a block of table rows. Lengths run from tens of
  bytes to tens of KB (medians ~0.4-0.9 KB, p90 3-10x the median), so the sequences of a batch
  differ in length by one to two orders of magnitude, as in real corpora.
- ``jsonl``: one JSON object per line, a string under ``data.text_key`` (default ``"text"``) and
  an optional string ``"domain"`` (default ``"text"``); domains are numbered in order of first
  appearance.
- ``megatron``: a Megatron-LM indexed dataset (``<prefix>.bin``/``.idx``) read with
  megatron-core's ``IndexedDataset``; a document is the concatenation of its sequences.

Text sources are bytes unless ``data.tokenizer`` names a ``tokenizer.json`` (runtime/tokenizer.py):
then each document is decoded as UTF-8 and encoded with it once, at load time. Megatron data is
already token ids and is read as it is.

A source document (a unit, for ``embedded``) is for validation when the CRC-32 of its index (never Python's salted
``hash``) is below ``validation_fraction`` of 2**32: the split ignores the seed, the batch size
and the length policy, and the pieces of a split document stay together. Global batch i is
the slice ``[i*B, (i+1)*B)`` of the concatenated per-epoch permutations of the train
documents, each from a ``torch.Generator`` seeded by (seed, epoch): it depends only on the
seed, i, B and the data, never on the plan or the number of ranks, and each epoch visits
every document once.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from runtime.config import DataConfig
from runtime.corpus import DOMAIN_BUDGET_BYTES, DOMAINS, embedded_documents
from runtime.tokenizer import BYTES, Tokenizer, check_vocab_size, load_tokenizer

__all__ = [
    "BYTE_VOCAB_SIZE",
    "DOMAINS",
    "DOMAIN_BUDGET_BYTES",
    "DataError",
    "Dataset",
    "GlobalBatch",
    "Split",
    "build_dataset",
    "decode",
    "embedded_texts",
    "encode",
    "jsonl_texts",
]

BYTE_VOCAB_SIZE = 256


class DataError(ValueError):
    """Unusable data: a missing or malformed file, a too-long document, a token past the vocab."""


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D int64 tensor of token ids in [0, 256)."""
    return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    """Text of byte-level token ids; invalid UTF-8 becomes U+FFFD rather than an error."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class GlobalBatch:
    """The sequences of one step (or one evaluation batch), in their fixed order."""

    step: int
    sequences: list[torch.Tensor]
    """1-D int64 token tensors."""
    domains: list[int]
    """Domain label of each sequence (an index into ``Dataset.domain_names``)."""
    document_ids: list[int]
    """Index of each sequence among its split's documents (after the long-sequence policy)."""

    @property
    def lengths(self) -> list[int]:
        return [int(s.numel()) for s in self.sequences]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class _Corpus:
    """Source documents as (start, length) ranges of one flat token stream."""

    read: Callable[[int, int], np.ndarray]
    """(start, count) -> that many tokens of the stream, in the storage dtype (maybe a view)."""
    starts: np.ndarray
    lengths: np.ndarray
    domains: np.ndarray
    domain_names: tuple[str, ...]
    describe: Callable[[int], str]
    """Source index -> a name for error messages (a file, a line, a document number)."""


def _corpus_from_bytes(
    chunks: list[bytes], domains: list[int], names: tuple[str, ...], describe: Callable[[int], str]
) -> _Corpus:
    stream = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    lengths = np.array([len(c) for c in chunks], dtype=np.int64)
    return _Corpus(
        lambda start, count: stream[start : start + count],
        np.cumsum(lengths) - lengths,
        lengths,
        np.array(domains, dtype=np.int64),
        names,
        describe,
    )


# Sources.


@cache
def _embedded_corpus() -> _Corpus:
    chunks, domains, names = [], [], []
    for label, domain in enumerate(DOMAINS):
        documents = embedded_documents(domain)
        if not documents:
            raise DataError(
                f"the embedded corpus found no {domain!r} text on this machine (see runtime/corpus.py for the places "
                "it looks); use data.source='jsonl' or 'megatron' with your own data"
            )
        for name, data in documents:
            chunks.append(data)
            domains.append(label)
            names.append(f"{domain}:{name}")
    return _corpus_from_bytes(chunks, domains, DOMAINS, lambda i: f"embedded document {names[i]!r}")


def _tokenized(corpus: _Corpus, tokenizer: Tokenizer) -> _Corpus:
    """``corpus`` (a byte stream) encoded document by document with ``tokenizer``."""
    texts = [
        bytes(corpus.read(int(start), int(count))).decode("utf-8", errors="replace")
        for start, count in zip(corpus.starts, corpus.lengths)
    ]
    ids = tokenizer.encode_batch(texts)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    stream = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype=dtype)
    lengths = np.array([a.size for a in ids], dtype=np.int64)
    return _Corpus(
        lambda start, count: stream[start : start + count],
        np.cumsum(lengths) - lengths,
        lengths,
        corpus.domains,
        corpus.domain_names,
        corpus.describe,
    )


def jsonl_texts(path: str, text_key: str = "text") -> list[str]:
    """The texts of a JSONL file (as ``data.source='jsonl'`` reads them), for tokenizer training."""
    corpus = _jsonl_corpus(path, text_key)
    return [bytes(corpus.read(int(s), int(n))).decode("utf-8") for s, n in zip(corpus.starts, corpus.lengths)]


def embedded_texts() -> list[str]:
    """The embedded corpus's documents as text (invalid UTF-8 as U+FFFD), for tokenizer training."""
    corpus = _embedded_corpus()
    return [
        bytes(corpus.read(int(s), int(n))).decode("utf-8", errors="replace")
        for s, n in zip(corpus.starts, corpus.lengths)
    ]


def _jsonl_corpus(path: str, text_key: str = "text") -> _Corpus:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.path={path!r}: no such file (data.source='jsonl' reads one JSON object per line)")
    chunks, domains, line_numbers, domain_ids = [], [], [], {}
    with file.open("rb") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where}: invalid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: expected a JSON object with a {json.dumps(text_key)} field, got {type(record).__name__}"
                )
            text, domain = record.get(text_key), record.get("domain", "text")
            if not isinstance(text, str):
                found = "missing" if text_key not in record else f"a {type(text).__name__}, not a string"
                hint = f" (keys: {', '.join(sorted(record)[:8])}; set data.text_key)" if text_key not in record else ""
                raise DataError(f"{where}: field {json.dumps(text_key)} is {found}{hint}")
            if not isinstance(domain, str):
                raise DataError(f'{where}: field "domain" must be a string, got {type(domain).__name__}')
            try:
                chunks.append(text.encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise DataError(
                    f'{where}: field "text" holds a lone surrogate {text[exc.start]!r} (an unpaired \\ud800-\\udfff '
                    "escape), which is not Unicode text; fix or drop that line"
                ) from None
            domains.append(domain_ids.setdefault(domain, len(domain_ids)))
            line_numbers.append(line_number)
    if not chunks:
        raise DataError(f"{path}: no documents (the file is empty or has only blank lines)")
    return _corpus_from_bytes(chunks, domains, tuple(domain_ids), lambda i: f"{path}, line {line_numbers[i]}")


def _megatron_corpus(prefix: str) -> _Corpus:
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        raise DataError(
            f"data.path={prefix!r} is a Megatron dataset prefix: it needs {bin_path} and {idx_path}; "
            f"missing: {', '.join(missing)}"
        )
    # checked here because megatron asserts on a bad header, then fails again in __del__
    with idx_path.open("rb") as stream:
        header = stream.read(17)
    if header[:9] != b"MMIDIDX\x00\x00" or int.from_bytes(header[9:], "little") != 1:
        raise DataError(f"{idx_path} is not a Megatron index file (no version-1 MMIDIDX header)")
    _check_index_size(idx_path)
    # megatron.core takes ~5 s to import (so only Megatron runs pay for it) and warns about
    # optional GPU packages and deprecations of modules that reading data does not use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    error = None
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        sequence_lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        document_indices = np.asarray(dataset.document_indices, dtype=np.int64)
        pointers = np.asarray(dataset.index.sequence_pointers, dtype=np.int64)
        dtype = np.dtype(dataset.index.dtype)
    except Exception as exc:  # megatron reports corruption with asserts and numpy/struct errors
        error = f"cannot read Megatron dataset {idx_path} + {bin_path}: {type(exc).__name__}: {exc}"
    if error is not None:
        raise DataError(error)
    if dtype.kind not in "iu":
        raise DataError(f"Megatron dataset {idx_path} stores {dtype} values; token ids must be integers")
    itemsize = dtype.itemsize
    # the layout the builder writes: sequences back to back from byte 0, documents as runs of them
    ends = np.cumsum(sequence_lengths)
    if (
        (pointers != (ends - sequence_lengths) * itemsize).any()
        or bin_path.stat().st_size != (int(ends[-1]) if ends.size else 0) * itemsize
        or document_indices.size == 0
        or document_indices[0] != 0
        or (np.diff(document_indices) < 0).any()
        or document_indices[-1] != sequence_lengths.size
    ):
        raise DataError(f"Megatron dataset {idx_path} does not match {bin_path} (truncated or corrupt files?)")
    starts_of_sequence = np.concatenate([[0], ends])
    starts = starts_of_sequence[document_indices[:-1]]
    lengths = starts_of_sequence[document_indices[1:]] - starts
    return _Corpus(
        # a view into the memory-mapped .bin; the dataset object (kept alive here) owns the map
        lambda start, count: dataset.get(0, offset=start, length=count),
        starts,
        lengths,
        np.zeros(lengths.size, dtype=np.int64),
        ("text",),
        lambda i: f"document {i} of Megatron dataset {prefix!r}",
    )


def _check_index_size(idx_path: Path) -> None:
    """A version-1 index is a 34-byte header (magic, version, dtype code, sequence and document
    counts), int32 lengths and int64 pointers per sequence, int64 document starts. Checked before
    megatron reads it: on a short file its IndexedDataset fails, then fails again in ``__del__``."""
    size = idx_path.stat().st_size
    with idx_path.open("rb") as stream:
        header = stream.read(34)
    if len(header) < 34:
        raise DataError(f"{idx_path} is truncated ({size} bytes, shorter than its header); rebuild the dataset")
    sequences, documents = int.from_bytes(header[18:26], "little"), int.from_bytes(header[26:34], "little")
    need = 34 + 12 * sequences + 8 * documents
    if size < need:
        raise DataError(
            f"{idx_path} is truncated: {size} bytes, its header says {sequences} sequences and {documents} document "
            f"starts ({need} bytes); rebuild the dataset (megatron's preprocess_data.py)"
        )


# Length policy, validation split, batches.


@dataclass(frozen=True)
class Split:
    """The train or validation documents after the long-sequence policy (read-only arrays)."""

    starts: np.ndarray
    """Offset of each document in the token stream."""
    lengths: np.ndarray
    domains: np.ndarray
    sources: np.ndarray
    """Source document (file, JSONL record, Megatron document) each one comes from."""

    def __post_init__(self) -> None:
        for array in (self.starts, self.lengths, self.domains, self.sources):
            array.flags.writeable = False

    @property
    def size(self) -> int:
        return int(self.lengths.size)


def _apply_policy(corpus: _Corpus, sources: np.ndarray, data_cfg: DataConfig) -> Split:
    """Documents ``sources`` of ``corpus`` with ``data.long_sequence_policy`` applied, in order."""
    cap, lengths = data_cfg.max_seq_len, corpus.lengths[sources]
    if data_cfg.long_sequence_policy == "truncate":
        return Split(corpus.starts[sources], np.minimum(lengths, cap), corpus.domains[sources], sources)
    if data_cfg.long_sequence_policy == "error":
        if (lengths > cap).any():
            source = int(sources[np.argmax(lengths > cap)])
            raise DataError(
                f"{corpus.describe(source)} has {int(corpus.lengths[source])} tokens > data.max_seq_len={cap}; raise "
                "data.max_seq_len or set data.long_sequence_policy to 'truncate' or 'split'"
            )
        return Split(corpus.starts[sources], lengths, corpus.domains[sources], sources)
    pieces = -(-lengths // cap)
    owner = np.repeat(np.arange(sources.size), pieces)
    piece_index = np.arange(owner.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    piece_lengths = np.minimum(cap, lengths[owner] - piece_index * cap)
    # a 1-token tail piece has no next token to predict
    keep = piece_lengths >= 2
    owner = sources[owner][keep]
    return Split(corpus.starts[owner] + piece_index[keep] * cap, piece_lengths[keep], corpus.domains[owner], owner)


def _validation_mask(sources: np.ndarray, fraction: float) -> np.ndarray:
    """True for validation documents: CRC-32 of the source index, as a fraction of 2**32, < fraction."""
    hashes = np.array([zlib.crc32(int(i).to_bytes(8, "little")) for i in sources], dtype=np.int64)
    mask = hashes < fraction * 2**32
    if fraction > 0 and sources.size >= 2:
        # tiny corpora still get one validation and one train document
        if not mask.any():
            mask[np.argmin(hashes)] = True
        if mask.all():
            mask[np.argmax(hashes)] = False
    return mask


def _epoch_seed(stream: str, seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"seqmoe.data/{stream}/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed wants a value below 2**63


class Dataset:
    """Train and validation documents with deterministic global batches; see the module docstring."""

    def __init__(self, corpus: _Corpus, train: Split, validation: Split, *, batch_sequences: int) -> None:
        self._corpus = corpus
        self.train = train
        self.validation = validation
        self._batch_sequences = batch_sequences
        self._permutations: dict[tuple[str, int, int], np.ndarray] = {}

    @property
    def domain_names(self) -> tuple[str, ...]:
        return self._corpus.domain_names

    @property
    def num_train_documents(self) -> int:
        return self.train.size

    @property
    def num_validation_documents(self) -> int:
        return self.validation.size

    def length_stats(self, split: str = "train") -> dict:
        """Count, tokens, mean, median, p90, p99, p99.9, max, and documents per domain."""
        # imported here: the planner package pulls in the LP solvers (~0.2 s) that data loading never needs
        from planner.distributions import length_stats

        data = self._split(split)
        stats = length_stats(data.lengths) if data.size else {"count": 0, "tokens": 0}
        counts = np.bincount(data.domains, minlength=len(self.domain_names))
        stats["documents_per_domain"] = dict(zip(self.domain_names, counts.tolist()))
        return stats

    def train_batch(self, step: int, seed: int, num_sequences: int | None = None) -> GlobalBatch:
        """Global batch ``step``: ``num_sequences`` (default data.global_batch_sequences) train documents."""
        return self._batch("train", step, seed, num_sequences)

    def validation_batch(self, index: int, seed: int, num_sequences: int | None = None) -> GlobalBatch:
        """Evaluation batch ``index``, drawn like train batches from the validation documents."""
        return self._batch("validation", index, seed, num_sequences)

    def _split(self, name: str) -> Split:
        if name not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {name!r}")
        return self.train if name == "train" else self.validation

    def _permutation(self, split: str, seed: int, epoch: int) -> np.ndarray:
        key = (split, seed, epoch)
        if key not in self._permutations:
            # a batch touches at most a few epochs; keep the cache small
            if len(self._permutations) >= 8:
                del self._permutations[next(iter(self._permutations))]
            generator = torch.Generator().manual_seed(_epoch_seed(split, seed, epoch))
            self._permutations[key] = torch.randperm(self._split(split).size, generator=generator).numpy()
        return self._permutations[key]

    def _batch(self, split: str, step: int, seed: int, num_sequences: int | None) -> GlobalBatch:
        size = self._batch_sequences if num_sequences is None else num_sequences
        if step < 0 or size < 1:
            raise ValueError(f"need step >= 0 and num_sequences >= 1, got step={step}, num_sequences={size}")
        data = self._split(split)
        if data.size == 0:
            raise DataError(f"there are no {split} documents (set data.validation_fraction > 0 for validation)")
        ids = [
            int(self._permutation(split, seed, epoch)[offset])
            for epoch, offset in (divmod(p, data.size) for p in range(step * size, (step + 1) * size))
        ]
        sequences = [
            torch.from_numpy(np.array(self._corpus.read(int(data.starts[i]), int(data.lengths[i])), dtype=np.int64))
            for i in ids
        ]
        return GlobalBatch(step, sequences, [int(data.domains[i]) for i in ids], ids)


def _check_vocab(corpus: _Corpus, vocab_size: int) -> None:
    """Every token id in [0, vocab_size), or an error naming the first bad one's document."""
    total = int(corpus.lengths.sum())
    if total == 0:
        return
    stream = corpus.read(0, total)
    largest, smallest = int(stream.max()), int(stream.min())
    if largest < vocab_size and smallest >= 0:
        return
    token = largest if largest >= vocab_size else smallest
    # the last document starting at or before the token holds it (empty ones start earlier or tie)
    source = int(np.searchsorted(corpus.starts, int(np.argmax(stream == token)), side="right")) - 1
    fix = f"set model.vocab_size to at least {token + 1}" if token >= 0 else "the data is corrupt"
    where = corpus.describe(source)
    raise DataError(f"token id {token} in {where} is outside [0, model.vocab_size={vocab_size}); {fix}")


def build_dataset(data_cfg: DataConfig, *, vocab_size: int) -> Dataset:
    """Load ``data_cfg.source``, check tokens against ``vocab_size``, apply the length policy, split."""
    data_cfg.validate()
    tokenizer = None if data_cfg.tokenizer == BYTES else load_tokenizer(data_cfg.tokenizer)
    if tokenizer is not None:
        check_vocab_size(data_cfg.tokenizer, vocab_size, tokenizer)  # before reading any data
    if data_cfg.source == "embedded":
        corpus = _embedded_corpus()
    elif data_cfg.source == "jsonl":
        corpus = _jsonl_corpus(data_cfg.path, data_cfg.text_key)
    else:
        corpus = _megatron_corpus(data_cfg.path)
    if tokenizer is not None and data_cfg.source != "megatron":
        corpus = _tokenized(corpus, tokenizer)
    _check_vocab(corpus, vocab_size)
    usable = np.flatnonzero(corpus.lengths >= 2)
    in_validation = _validation_mask(usable, data_cfg.validation_fraction)
    train = _apply_policy(corpus, usable[~in_validation], data_cfg)
    validation = _apply_policy(corpus, usable[in_validation], data_cfg)
    if train.size == 0:
        raise DataError(f"data.source={data_cfg.source!r} has no train documents of at least 2 tokens")
    return Dataset(corpus, train, validation, batch_sequences=data_cfg.global_batch_sequences)
