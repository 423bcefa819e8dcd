"""Data pipeline: byte tokenizer, embedded corpus and its natural units, JSONL and Megatron sources
with their errors, long-sequence policies, the validation split and deterministic global batches."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from runtime.config import ConfigError, DataConfig
from runtime.corpus import split_units
from runtime.data import DOMAIN_BUDGET_BYTES, DOMAINS, DataError, build_dataset, decode, encode

VOCAB = 256


def _write_jsonl(path, records) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def _jsonl_dataset(tmp_path, records, **cfg):
    cfg.setdefault("validation_fraction", 0.0)
    path = _write_jsonl(tmp_path / "data.jsonl", records)
    return build_dataset(DataConfig(source="jsonl", path=path, **cfg), vocab_size=VOCAB)


def _epoch(dataset, seed=0, split="train"):
    """All documents of ``split`` as one batch: exactly one epoch of its permutation."""
    size = dataset.num_train_documents if split == "train" else dataset.num_validation_documents
    fetch = dataset.train_batch if split == "train" else dataset.validation_batch
    return fetch(0, seed, size)


def test_tokenizer_round_trip():
    text = "def f(x):\n    return x  # héllo ✓ 🚀"
    tokens = encode(text)
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert tokens.numel() == len(text.encode("utf-8")) > len(text)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256
    assert decode(tokens) == text
    assert decode(tokens.tolist()) == text
    assert encode("").numel() == 0 and decode([]) == ""
    # a split multi-byte character decodes to the replacement character instead of raising
    assert decode(encode("é")[:1]) == "\ufffd"


@pytest.fixture(scope="module")
def embedded_full():
    """The embedded corpus with every document whole and none held out."""
    cfg = DataConfig(max_seq_len=10**7, long_sequence_policy="error", validation_fraction=0.0)
    return build_dataset(cfg, vocab_size=VOCAB)


def test_embedded_corpus_has_three_domains_with_long_tailed_lengths(embedded_full):
    assert embedded_full.domain_names == DOMAINS == ("code", "prose", "tables")
    for label, domain in enumerate(DOMAINS):
        lengths = embedded_full.train.lengths[embedded_full.train.domains == label]
        assert lengths.size >= 500, f"domain {domain} has only {lengths.size} documents"
        assert 100_000 < int(lengths.sum()) <= DOMAIN_BUDGET_BYTES
        # natural units (functions, sections, blocks of rows), not whole files: a median of a few
        # hundred bytes, a p90 several times that and a tail of units longer than 8 KB
        median = float(np.median(lengths))
        assert 200 <= median <= 2000, f"domain {domain}: median {median}"
        assert np.percentile(lengths, 90) > 3 * median and lengths.max() > 8192, domain
    stats = embedded_full.length_stats()
    assert stats["max"] > 10 * stats["median"] and stats["p99"] > 5 * stats["median"]


def test_embedded_domains_hold_what_their_names_say(embedded_full):
    batch = _epoch(embedded_full)
    # the first 2,000 bytes of each document are enough to tell code, prose and tables apart
    pairs = list(zip(batch.sequences, batch.domains))
    texts = {label: [decode(s[:2000]) for s, d in pairs if d == label] for label in range(3)}

    def share(label, predicate):
        return sum(map(predicate, texts[label])) / len(texts[label])

    def letters(text):
        return sum(c.isalpha() or c.isspace() for c in text) / len(text)

    assert share(0, lambda t: "import " in t or "def " in t or "class " in t) > 0.8
    assert share(1, lambda t: letters(t) > 0.7) > 0.85
    assert letters("".join(texts[1])) > 0.8
    assert share(2, lambda t: sum(c.isdigit() for c in t) > 0.1 * len(t)) > 0.8


def test_default_embedded_batches_are_long_tailed():
    # what the sequence-parallel planner needs: every step mixes short and long sequences
    dataset = build_dataset(DataConfig(), vocab_size=VOCAB)
    cap = DataConfig().max_seq_len
    assert cap == 2048
    batches = [dataset.train_batch(step, seed=0).lengths for step in range(20)]
    spread = [max(lengths) / min(lengths) for lengths in batches]
    assert sum(ratio >= 10 for ratio in spread) >= 15, spread
    # most sequences are whole units below the cap, not pieces of exactly max_seq_len
    at_cap = sum(length == cap for lengths in batches for length in lengths)
    assert at_cap < 0.5 * 16 * 20
    assert min(min(lengths) for lengths in batches) < 100


PYTHON_SOURCE = b'''"""A module.

def text_at_column_0():  the docstring's, not a definition
"""

import os

MARK = "# not a comment"


def first():
    return """
class NotAClass:
"""


# The comment of second.
@decorate(
    flag=True,
)
@other
def second():
    pass

x = 1
y = 2
class Third:
    async def method(self):
        pass
async def fourth():
    pass
'''


def test_code_units_are_the_header_and_each_top_level_definition():
    units = split_units("code", "module.py", PYTHON_SOURCE)
    assert b"".join(units) == PYTHON_SOURCE
    starts = [unit.split(b"\n", 1)[0] for unit in units]
    assert starts == [
        b'"""A module.',
        b"def first():",
        b"# The comment of second.",
        b"x = 1",
        b"class Third:",
        b"async def fourth():",
    ]
    assert units[2].endswith(b"def second():\n    pass\n\n")


PROSE = b"""Title
=====

Intro, first paragraph.

Install it with:


    pip install thing

Usage
-----

How to use it.


A part after two blank lines.

## A Markdown heading
### And its subheading

```
# a comment in a fence, not a heading


Preamble
```

  3. Definitions.

  "This License" means this text.

Preamble

Text.
"""


def test_prose_units_are_sections():
    units = split_units("prose", "README", PROSE)
    assert b"".join(units) == PROSE
    starts = [unit.split(b"\n", 1)[0] for unit in units]
    assert starts == [
        b"Title",  # with its intro, the lead-in and the one-line example it leads into
        b"Usage",
        b"A part after two blank lines.",
        b"## A Markdown heading",  # with its subheading and the whole fenced block
        b"  3. Definitions.",
        b"Preamble",
    ]


def test_table_units_are_blocks_of_rows_of_varying_size():
    rows = [f"{i},{i * i},0x{i:08x}\n" for i in range(3000)]
    table = ("# generated\nindex,square,hex\n" + "".join(rows[:2000]) + "# part two\n" + "".join(rows[2000:])).encode()
    units = split_units("tables", "data/table.csv", table)
    assert b"".join(units) == table
    assert units[0].startswith(b"# generated\nindex,square,hex\n0,0,")
    assert any(unit.startswith(b"# part two\n2000,") for unit in units)
    counts = [sum(not line.startswith(b"#") for line in unit.splitlines()) for unit in units]
    counts[0] -= 1  # the column header
    assert all(1 <= c <= 512 for c in counts) and sum(counts) == 3000
    # sizes from a few rows to hundreds, fixed by the file's name
    assert min(counts) <= 10 and max(counts) >= 200 and len(set(counts)) > len(counts) // 2
    assert split_units("tables", "data/table.csv", table) == units
    assert split_units("tables", "data/other.csv", table) != units


def test_batches_depend_only_on_seed_and_step():
    cfg = DataConfig(max_seq_len=512, global_batch_sequences=8)
    first, second = build_dataset(cfg, vocab_size=VOCAB), build_dataset(cfg, vocab_size=VOCAB)
    later = first.train_batch(7, seed=3)
    torch.manual_seed(12345)  # global RNG state must not matter
    for step in range(3):
        first.train_batch(step, seed=9)
    again = second.train_batch(7, seed=3)
    assert again.document_ids == later.document_ids and again.domains == later.domains
    assert all(torch.equal(a, b) for a, b in zip(again.sequences, later.sequences))
    assert later.lengths == [s.numel() for s in later.sequences] and len(later.lengths) == 8
    assert later.num_tokens == sum(later.lengths)
    assert first.train_batch(8, seed=3).document_ids != later.document_ids
    assert first.train_batch(7, seed=4).document_ids != later.document_ids
    # step i of B sequences is positions [i*B, (i+1)*B) of one stream, whatever B is
    halves = first.train_batch(14, seed=3, num_sequences=4).document_ids
    halves += first.train_batch(15, seed=3, num_sequences=4).document_ids
    assert halves == later.document_ids


def test_each_epoch_visits_every_train_document_once(tmp_path):
    dataset = _jsonl_dataset(tmp_path, [{"text": f"document number {i}"} for i in range(23)])
    assert dataset.num_train_documents == 23
    # batches of 5 do not divide 23: batch 4 straddles the first epoch boundary
    stream = [i for step in range(14) for i in dataset.train_batch(step, seed=1, num_sequences=5).document_ids]
    epochs = [stream[0:23], stream[23:46], stream[46:69]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(23))
    assert epochs[0] != epochs[1] != epochs[2]
    # the texts follow the ids: every document's own tokens come back
    texts = {decode(s) for s in _epoch(dataset, seed=1).sequences}
    assert texts == {f"document number {i}" for i in range(23)}


def test_validation_split_is_disjoint_stable_and_near_the_fraction():
    base = build_dataset(DataConfig(max_seq_len=512, validation_fraction=0.1), vocab_size=VOCAB)
    train, validation = set(base.train.sources.tolist()), set(base.validation.sources.tolist())
    assert train and validation and not train & validation
    num_sources = len(train | validation)
    assert 0.05 < len(validation) / num_sources < 0.15
    # neither the length policy, the length cap nor the batch size moves a document across
    other = DataConfig(
        max_seq_len=10**7, long_sequence_policy="truncate", validation_fraction=0.1, global_batch_sequences=3
    )
    assert set(build_dataset(other, vocab_size=VOCAB).validation.sources.tolist()) == validation
    # validation batches draw only validation documents
    batch = base.validation_batch(2, seed=5, num_sequences=20)
    assert {int(base.validation.sources[i]) for i in batch.document_ids} <= validation


def test_validation_split_holds_out_whole_documents(tmp_path):
    records = [{"text": f"{i:03d}" * 40} for i in range(40)]
    # pieces of 15 tokens start on a multiple of 3, so each begins with its document's number
    dataset = _jsonl_dataset(tmp_path, records, validation_fraction=0.25, max_seq_len=15)
    train_texts = {decode(s)[:3] for s in _epoch(dataset).sequences}
    validation_texts = {decode(s)[:3] for s in _epoch(dataset, split="validation").sequences}
    assert train_texts and validation_texts and not train_texts & validation_texts
    assert len(train_texts | validation_texts) == 40
    # pinned: CRC-32 of each index below 0.25 * 2**32; a different hash would move documents
    # between train and validation from one release to the next
    assert sorted(set(dataset.validation.sources.tolist())) == [2, 5, 11, 12, 16, 23, 25, 30, 35, 36]


def test_tiny_corpora_get_one_validation_document(tmp_path):
    dataset = _jsonl_dataset(tmp_path, [{"text": "first"}, {"text": "second"}], validation_fraction=0.001)
    assert (dataset.num_train_documents, dataset.num_validation_documents) == (1, 1)
    none = _jsonl_dataset(tmp_path, [{"text": "first"}, {"text": "second"}], validation_fraction=0.0)
    assert none.num_validation_documents == 0
    with pytest.raises(DataError, match="no validation documents"):
        none.validation_batch(0, seed=0)


# Lengths 1, 2, 5, 10 and 11 tokens against max_seq_len = 5.
POLICY_TEXTS = ["a", "bc", "defgh", "0123456789", "ABCDEFGHIJK"]


def _all_texts(dataset):
    return sorted(decode(s) for s in _epoch(dataset).sequences)


def test_error_policy_names_the_document_and_the_fix(tmp_path):
    with pytest.raises(DataError) as info:
        _jsonl_dataset(tmp_path, [{"text": t} for t in POLICY_TEXTS], max_seq_len=5, long_sequence_policy="error")
    message = str(info.value)
    for part in ("line 4", "10 tokens", "data.max_seq_len=5", "'truncate'", "'split'"):
        assert part in message


def test_truncate_policy_keeps_the_head(tmp_path):
    records = [{"text": t} for t in POLICY_TEXTS]
    dataset = _jsonl_dataset(tmp_path, records, max_seq_len=5, long_sequence_policy="truncate")
    # the 1-token document is dropped: a language model needs at least 2 tokens
    assert _all_texts(dataset) == sorted(["bc", "defgh", "01234", "ABCDE"])


def test_split_policy_keeps_consecutive_pieces_and_the_tail(tmp_path):
    records = [{"text": t} for t in POLICY_TEXTS]
    dataset = _jsonl_dataset(tmp_path, records, max_seq_len=5, long_sequence_policy="split")
    # "K", an 11th token alone, is a 1-token tail and dropped with "a"
    assert _all_texts(dataset) == sorted(["bc", "defgh", "01234", "56789", "ABCDE", "FGHIJ"])
    assert sorted(dataset.train.sources.tolist()) == [1, 2, 3, 3, 4, 4]


def test_jsonl_domains_in_order_of_first_appearance(tmp_path):
    records = [
        {"text": "plain text, no domain"},
        {"text": "x = 1", "domain": "code"},
        "",
        {"text": "héllo wörld", "domain": "prose"},
        {"text": "y = 2", "domain": "code"},
    ]
    dataset = _jsonl_dataset(tmp_path, records)
    assert dataset.domain_names == ("text", "code", "prose")
    batch = _epoch(dataset)
    by_text = {decode(s): d for s, d in zip(batch.sequences, batch.domains)}
    assert by_text == {"plain text, no domain": 0, "x = 1": 1, "héllo wörld": 2, "y = 2": 1}


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"text": "ok"}', '{"text": "broken"'], ["line 2", "invalid JSON"]),
        (['{"text": "ok"}', "", '{"body": "no text"}'], ["line 3", '"text"', "missing"]),
        (['{"text": 17}'], ["line 1", '"text"', "int, not a string"]),
        (['{"text": "ok", "domain": 3}'], ["line 1", '"domain"', "string"]),
        (['["text", "in a list"]'], ["line 1", "JSON object"]),
        (["", "  "], ["no documents"]),
    ],
    ids=["invalid-json", "missing-text", "text-not-string", "domain-not-string", "not-an-object", "blank"],
)
def test_jsonl_errors_name_the_line_and_field(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(source="jsonl", path=str(path)), vocab_size=VOCAB)
    for part in [str(path), *expected]:
        assert part in str(info.value)


def test_jsonl_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no documents"):
        build_dataset(DataConfig(source="jsonl", path=str(empty)), vocab_size=VOCAB)
    with pytest.raises(DataError, match="nope.jsonl.*no such file"):
        build_dataset(DataConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="data.path"):
        build_dataset(DataConfig(source="jsonl"), vocab_size=VOCAB)


def test_vocab_smaller_than_the_bytes_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "abc"}, {"text": "ünï"}])
    with pytest.raises(DataError, match=r"token id 195 in .*line 2.*model.vocab_size=128.*at least 196"):
        build_dataset(DataConfig(source="jsonl", path=path), vocab_size=128)


MEGATRON_DOCUMENTS = [[1, 2, 3, 4], [5, 6], [7], [8, 9, 10, 11, 12, 13], [14, 15, 16]]


def _write_megatron(prefix, documents, dtype=np.int32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time notices of unrelated megatron modules
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, doc in enumerate(documents):
        if i == 3:
            # one document as two sentences, as Megatron's --split-sentences writes them
            builder.add_document(doc, lengths=[2, len(doc) - 2])
        else:
            builder.add_item(torch.tensor(doc))
            builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _megatron_cfg(prefix, **kw):
    return DataConfig(source="megatron", path=prefix, validation_fraction=0.0, max_seq_len=64, **kw)


def test_megatron_documents_are_read_whole(tmp_path):
    prefix = _write_megatron(tmp_path / "corpus", MEGATRON_DOCUMENTS)
    dataset = build_dataset(_megatron_cfg(prefix), vocab_size=32)
    assert dataset.domain_names == ("text",)
    batch = _epoch(dataset)
    assert all(s.dtype == torch.int64 for s in batch.sequences)
    # the 1-token document [7] is dropped
    expected = sorted(d for d in MEGATRON_DOCUMENTS if len(d) >= 2)
    assert sorted(s.tolist() for s in batch.sequences) == expected


def test_megatron_split_policy_cuts_across_sentences(tmp_path):
    prefix = _write_megatron(tmp_path / "corpus", MEGATRON_DOCUMENTS, dtype=np.uint16)
    cfg = DataConfig(source="megatron", path=prefix, validation_fraction=0.0, max_seq_len=4)
    batch = _epoch(build_dataset(cfg, vocab_size=32))
    assert sorted(s.tolist() for s in batch.sequences) == [[1, 2, 3, 4], [5, 6], [8, 9, 10, 11], [12, 13], [14, 15, 16]]


def test_megatron_missing_files_name_both_paths(tmp_path):
    with pytest.raises(DataError) as info:
        build_dataset(_megatron_cfg(str(tmp_path / "absent")), vocab_size=32)
    assert f"{tmp_path}/absent.bin" in str(info.value) and f"{tmp_path}/absent.idx" in str(info.value)
    prefix = _write_megatron(tmp_path / "corpus", MEGATRON_DOCUMENTS)
    (tmp_path / "corpus.idx").unlink()
    with pytest.raises(DataError, match=r"missing: .*corpus\.idx$"):
        build_dataset(_megatron_cfg(prefix), vocab_size=32)


def test_megatron_token_past_the_vocab_names_the_document(tmp_path):
    prefix = _write_megatron(tmp_path / "corpus", [[1, 2, 3], [4, 300, 5]])
    with pytest.raises(DataError, match=r"token id 300 in document 1 of .*model.vocab_size=256.*at least 301"):
        build_dataset(_megatron_cfg(prefix), vocab_size=256)
    assert build_dataset(_megatron_cfg(prefix), vocab_size=301).num_train_documents == 2


@pytest.mark.parametrize("damage", ["truncate-bin", "garbage-idx", "empty-idx"])
def test_megatron_corrupt_files_are_reported(tmp_path, damage):
    prefix = _write_megatron(tmp_path / "corpus", MEGATRON_DOCUMENTS)
    bin_path, idx_path = tmp_path / "corpus.bin", tmp_path / "corpus.idx"
    if damage == "truncate-bin":
        bin_path.write_bytes(bin_path.read_bytes()[:-8])
    elif damage == "garbage-idx":
        idx_path.write_bytes(b"not an index file at all, just some bytes" * 3)
    else:
        idx_path.write_bytes(b"")
    with pytest.raises(DataError, match="corpus.idx"):
        build_dataset(_megatron_cfg(prefix), vocab_size=32)
