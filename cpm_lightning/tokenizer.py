"""SentencePiece tokenizers: training on text, loading from a path or fsspec URL.

Settings chosen so that any text round-trips exactly: no normalization, whitespace kept as it
is, newlines and tabs as pieces of their own, and byte fallback for characters outside the
vocabulary (rare CJK characters, emoji).
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterable

import fsspec
import sentencepiece as spm

from cpm_lightning.errors import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
BYTE_PIECES = 256
MIN_VOCAB = BYTE_PIECES + 8  # 256 byte pieces + specials
# A sentence longer than this is cut for training only (SentencePiece's own limit is 4192 bytes).
MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer:
    """A loaded SentencePiece model and its serialized bytes (kept for checkpoints/releases)."""

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        self.model_bytes = model_bytes
        self.source = source
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError:
            raise UserError(f"{source}: not a SentencePiece model") from None

    @classmethod
    def load(cls, url: str) -> "Tokenizer":
        try:
            with fsspec.open(url, "rb") as f:
                return cls(f.read(), url)
        except FileNotFoundError:
            raise UserError(f"tokenizer {url!r} does not exist; train one with "
                            "`cpm-lightning tokenizer train` or fix data.tokenizer") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def _keep_common_chars(texts: list[str], max_chars: int) -> list[str]:
    """Drop all but the `max_chars` most frequent characters from the training sample, so that
    a small vocabulary still trains on text with thousands of distinct (CJK) characters. The
    dropped ones are encoded through byte fallback, so nothing is lost at encode time."""
    counts = collections.Counter("".join(texts))
    if len(counts) <= max_chars:
        return texts
    rare = "".join(c for c, _ in counts.most_common()[max_chars:])
    drop = str.maketrans("", "", rare)
    return [t.translate(drop) for t in texts]


def train_tokenizer(texts: Iterable[str], vocab_size: int, sample_chars: int = 20_000_000) -> Tokenizer:
    """Train a unigram SentencePiece model on (up to `sample_chars` characters of) `texts`."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size must be at least {MIN_VOCAB} (256 byte pieces + specials), got {vocab_size}")
    sample, n = [], 0
    for text in texts:
        for piece in text.split("\n\n"):  # paragraphs: SentencePiece trains on "sentences"
            if piece.strip():
                sample.append(piece[:MAX_SENTENCE_BYTES // 4])
                n += len(sample[-1])
        if n >= sample_chars:
            break
    if not sample:
        raise UserError("no text to train a tokenizer on: the sources are empty")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_keep_common_chars(sample, max(1, (vocab_size - MIN_VOCAB) // 2))),
            model_writer=model, vocab_size=vocab_size,
            model_type="unigram", byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", "\t"], character_coverage=0.9995,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, max_sentence_length=MAX_SENTENCE_BYTES,
            hard_vocab_limit=False, num_threads=2, minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"tokenizer training failed: {str(e).splitlines()[-1]}") from None
    return Tokenizer(model.getvalue())


def save_tokenizer(tokenizer: Tokenizer, url: str) -> None:
    """Write the model to a path or fsspec URL, atomically where the filesystem allows."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(tokenizer.model_bytes)
    fs.mv(tmp, path)
