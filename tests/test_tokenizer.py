"""Text in: byte-level BPE training and its exact round trip, ``data.tokenizer`` and ``data.text_key``
in the data pipeline, ``seqmoe tokenizer train``, training a few steps with a trained tokenizer,
and the one-line errors (vocab mismatch, missing or corrupt tokenizer file, missing text key)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.cli import main
from runtime.config import ConfigError, DataConfig
from runtime.data import DataError, build_dataset
from runtime.tokenizer import ByteTokenizer, TokenizerError, check_vocab_size, load_tokenizer, train_bpe

REPO = Path(__file__).resolve().parent.parent
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "name,value\nalpha,1\nbeta,2\ngamma,3\n",
    "Ünïcödé: héllo wörld ✓ 🚀 — 日本語のテキスト",
] * 8
UNSEEN = ["tabs\tand  double  spaces\r\n", "🙂 emoji never seen", "\x00\x01 control bytes", "", "a"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return train_bpe(TEXTS, 320, out), out


def test_bpe_round_trips_every_string_exactly(bpe):
    trained, path = bpe
    tok = load_tokenizer(str(path))
    assert 256 < tok.vocab_size <= 320 and tok.vocab_size == trained.tokenizer.vocab_size
    assert trained.documents == len(TEXTS) and trained.bytes == sum(len(t.encode()) for t in TEXTS)
    for text in TEXTS + UNSEEN:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, text
    # merges learned from the data make its text shorter than its bytes
    assert len(tok.encode(TEXTS[1])) < len(TEXTS[1].encode()) / 2
    batch = tok.encode_batch(TEXTS[:3])
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in TEXTS[:3]]


def test_byte_tokenizer_is_the_default():
    assert DataConfig().tokenizer == "bytes" and DataConfig().text_key == "text"
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"


def test_dataset_with_a_tokenizer_and_a_text_key(tmp_path, bpe):
    _, path = bpe
    tok = load_tokenizer(str(path))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"body": t, "text": 3}) + "\n" for t in TEXTS))
    cfg = DataConfig(source="jsonl", path=str(data), text_key="body", tokenizer=str(path), validation_fraction=0.0)
    dataset = build_dataset(cfg, vocab_size=tok.vocab_size)
    assert dataset.num_train_documents == len(TEXTS)
    batch = dataset.train_batch(0, seed=0, num_sequences=len(TEXTS))
    decoded = sorted(tok.decode(s.tolist()) for s in batch.sequences)
    assert decoded == sorted(TEXTS)
    assert batch.num_tokens < sum(len(t.encode()) for t in TEXTS)
    assert max(int(s.max()) for s in batch.sequences) >= 256  # merged tokens are used
    # the byte vocabulary on the same records: one token per byte
    byte_cfg = DataConfig(source="jsonl", path=str(data), text_key="body", validation_fraction=0.0)
    byte_batch = build_dataset(byte_cfg, vocab_size=256).train_batch(0, seed=0, num_sequences=len(TEXTS))
    assert byte_batch.num_tokens == sum(len(t.encode()) for t in TEXTS)


def test_missing_text_key_names_the_field_and_the_option(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(source="jsonl", path=str(data)), vocab_size=256)
    message = str(info.value)
    assert "line 1" in message and '"text"' in message and "data.text_key" in message and "body" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="data.text_key"):
        DataConfig(text_key="").validate()


def test_tokenizer_errors_are_one_line(tmp_path, bpe):
    _, path = bpe
    vocab = load_tokenizer(str(path)).vocab_size
    with pytest.raises(ConfigError) as info:
        check_vocab_size(str(path), 256)
    message = str(info.value)
    assert "model.vocab_size" in message and "data.tokenizer" in message and f"--model.vocab_size={vocab}" in message
    check_vocab_size(str(path), vocab)  # equal: fine
    check_vocab_size("bytes", 1000)  # byte ids are checked with the data instead
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "nope.json"))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"model": ')
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json") as info:
        load_tokenizer(str(corrupt))
    assert "\n" not in str(info.value)
    with pytest.raises(TokenizerError, match="> 256"):
        train_bpe(TEXTS, 256, tmp_path / "small.json")
    with pytest.raises(TokenizerError, match="no text"):
        train_bpe([], 300, tmp_path / "empty.json")
    cfg = DataConfig(tokenizer=str(path))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_dataset(cfg, vocab_size=256)


def test_seqmoe_config_checks_the_tokenizer(bpe, capsys):
    _, path = bpe
    vocab = load_tokenizer(str(path)).vocab_size
    assert main(["config", f"--data.tokenizer={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.vocab_size" in err and "data.tokenizer" in err
    assert main(["config", f"--data.tokenizer={path}", f"--model.vocab_size={vocab}"]) == 0
    assert f'tokenizer = "{path}"' in capsys.readouterr().out


def test_tokenizer_train_command_on_jsonl(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    out = tmp_path / "tok.json"
    argv = ["tokenizer", "train", "--data.source=jsonl", f"--data.path={data}", "--data.text_key=body"]
    assert main([*argv, "--vocab-size", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(str(out))
    assert f"--model.vocab_size={tok.vocab_size}" in printed and f"{len(TEXTS)} documents" in printed
    assert tok.decode(tok.encode(TEXTS[3])) == TEXTS[3]
    # errors: one line on stderr, exit 2 for a bad option, 1 for unusable data
    assert main([*argv, "--vocab-size", "100", "--out", str(out)]) == 2
    assert "> 256" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data.source=megatron", "--data.path=x", "--vocab-size=300", "--out=t"]) == 2
    assert "megatron" in capsys.readouterr().err
    missing = ["tokenizer", "train", "--data.source=jsonl", f"--data.path={tmp_path / 'no.jsonl'}"]
    assert main([*missing, "--vocab-size=300", "--out=t"]) == 1
    err = capsys.readouterr().err
    assert "no.jsonl" in err and len(err.strip().splitlines()) == 1


def test_tokenizer_train_on_the_embedded_corpus(tmp_path, capsys):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "512", "--out", str(out)]) == 0
    assert "the embedded corpus" in capsys.readouterr().out
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 512
    sample = "def main(argv):\n    return 0\n"
    assert tok.decode(tok.encode(sample)) == sample and len(tok.encode(sample)) < len(sample)


def _seqmoe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "seqmoe"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_training_with_a_trained_tokenizer(tmp_path):
    """Two steps on the embedded corpus with a 1024-token BPE: the first loss is ~ln(1024) (the
    model predicts over the tokenizer's vocabulary, not the 256 bytes), and a mismatched
    model.vocab_size stops before any work with one line naming both fields."""
    tok = tmp_path / "tok.json"
    fit = _seqmoe("tokenizer", "train", "--vocab-size", "1024", "--out", str(tok), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    common = [
        "train",
        str(REPO / "configs/tiny-cpu.toml"),
        "--launch.nproc_per_node=1",
        "--data.max_seq_len=256",
        "--data.global_batch_sequences=4",
        "--model.d_model=32",
        "--train.steps=2",
        "--train.eval_every=0",
        f"--data.tokenizer={tok}",
    ]
    run = _seqmoe(*common, "--model.vocab_size=1024", f"--train.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert abs(rows[0]["loss"] - math.log(1024)) < 0.5, rows[0]["loss"]
    assert np.isfinite([r["loss"] for r in rows]).all()
    # start-up lines and plain progress lines (stdout is a pipe here, not a terminal)
    assert f"tokenizer {tok} (vocab 1024)" in run.stdout and "active per token" in run.stdout
    assert "step 1/2 | loss" in run.stdout and "step 2/2 | loss" in run.stdout and "\r" not in run.stdout
    # model out keeps the tokenizer: the export carries a copy, and generation decodes with it
    exported = _seqmoe("export", str(tmp_path / "run"), "--out", str(tmp_path / "export"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["tokenizer"] == "tokenizer.json"
    gen = _seqmoe("generate", "--export", str(tmp_path / "export"), "--prompt", "def ", "--max-new-tokens", "5",
                  cwd=tmp_path)  # fmt: skip
    assert gen.returncode == 0 and gen.stdout.startswith("def "), gen.stderr[-2000:]
    bad = _seqmoe(*common, f"--train.run_dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    line = [x for x in bad.stderr.splitlines() if "seqmoe train" in x]
    assert len(line) == 1 and "model.vocab_size" in line[0] and "data.tokenizer" in line[0]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
