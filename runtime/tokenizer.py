"""Tokenizers: the byte vocabulary (the default) or a Hugging Face ``tokenizer.json``.

``data.tokenizer = "bytes"`` keeps the 256 UTF-8 byte values as tokens (``runtime.data.encode``).
Any other value is the path of a local ``tokenizer.json`` (the ``tokenizers`` library's format,
as every Hugging Face model ships it); the model's ``model.vocab_size`` must then equal the
tokenizer's vocabulary size, checked before any training work.

``train_bpe`` fits a byte-level BPE (GPT-2's scheme: the 256 byte symbols are the base
alphabet, so every string encodes and decodes back exactly, with no unknown token) on an
iterable of texts; ``seqmoe tokenizer train`` runs it on the config's data. Documents are
packed with explicit boundaries (``cu_seqlens``), so no special tokens are needed and none are
added.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.config import ConfigError

__all__ = [
    "BYTES",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenizerError",
    "check_vocab_size",
    "load_tokenizer",
    "train_bpe",
]

BYTES = "bytes"
"""``data.tokenizer`` value of the byte vocabulary."""


class TokenizerError(ConfigError):
    """A tokenizer file that is missing or unreadable, or a vocabulary that cannot be trained."""


class ByteTokenizer:
    """The 256 UTF-8 byte values; invalid UTF-8 decodes to U+FFFD."""

    name = BYTES
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from a local ``tokenizer.json``."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.name = str(path)
        file = Path(path)
        if not file.is_file():
            raise TokenizerError(
                f"data.tokenizer={str(path)!r}: no such file; give a tokenizer.json path (make one with "
                "`seqmoe tokenizer train --vocab-size N --out tokenizer.json`) or 'bytes'"
            )
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library reports every parse error as a plain Exception
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TokenizerError(f"data.tokenizer={str(path)!r} is not a readable tokenizer.json ({first})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str, *, base: Path | None = None) -> Tokenizer:
    """``'bytes'`` or a ``tokenizer.json`` path (relative paths against ``base``, default the cwd)."""
    if spec == BYTES:
        return ByteTokenizer()
    path = Path(spec)
    if base is not None and not path.is_absolute():
        path = base / path
    return HFTokenizer(path)


def check_vocab_size(spec: str, vocab_size: int, tokenizer: Tokenizer | None = None) -> None:
    """With a tokenizer file ``spec`` (data.tokenizer), ``vocab_size`` (model.vocab_size) must equal
    its vocabulary; raises a one-line ConfigError naming both fields. Byte ids are checked against
    model.vocab_size with the data instead (a larger vocabulary is allowed there)."""
    if spec == BYTES:
        return
    tokenizer = tokenizer or load_tokenizer(spec)
    if tokenizer.vocab_size != vocab_size:
        raise ConfigError(
            f"config field `model.vocab_size`: got {vocab_size}, but data.tokenizer={spec!r} has "
            f"{tokenizer.vocab_size} tokens; set --model.vocab_size={tokenizer.vocab_size}"
        )


@dataclass(frozen=True)
class TrainedBPE:
    tokenizer: HFTokenizer
    documents: int
    bytes: int
    seconds: float


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path) -> TrainedBPE:
    """Fit a byte-level BPE of at most ``vocab_size`` tokens on ``texts``; write it to ``out``.

    The vocabulary is smaller than asked when the texts have fewer distinct merges; the returned
    tokenizer's ``vocab_size`` is the real one (``model.vocab_size`` must equal it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise TokenizerError(
            f"--vocab-size {vocab_size}: a byte-level BPE starts from the 256 byte symbols; ask for > 256 "
            "(or keep data.tokenizer='bytes' for the plain byte vocabulary)"
        )
    texts = list(texts)
    if not texts:
        raise TokenizerError("no text to train the tokenizer on (the data has no documents)")
    began = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    seconds = time.perf_counter() - began
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)  # a half-written tokenizer.json must never be where training would read it
    return TrainedBPE(HFTokenizer(out), len(texts), sum(len(t.encode("utf-8")) for t in texts), seconds)
