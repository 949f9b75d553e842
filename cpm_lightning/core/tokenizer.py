"""Tokenizers: one interface, two implementations. Data shards, `generate`, checkpoints and
releases use only the interface (`Tokenizer`).

- SentencePiece (the default): trained by the project on its sources, with settings chosen so
  that any text round-trips exactly: no normalization, whitespace kept as it is, newlines and
  tabs as pieces of their own, and byte fallback for characters outside the vocabulary (rare CJK
  characters, emoji).
- CPM-Ant's own (`vocab.txt`): jieba word segmentation, then greedy longest-match word pieces,
  as `transformers`' CpmAntTokenizer; it comes with an imported CPM-Ant model. Characters
  outside its vocabulary become <unk>.

A tokenizer is stored as the bytes of its file (checkpoints carry them); `Tokenizer.from_bytes`
tells the two apart.
"""

from __future__ import annotations

import collections
import io
import os
import sys
from collections.abc import Iterable

import fsspec
import sentencepiece as spm

from cpm_lightning.core.errors import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
BYTE_PIECES = 256
MIN_VOCAB = BYTE_PIECES + 8  # 256 byte pieces + specials
MAX_VOCAB = 1 << 20
"""The most pieces a tokenizer is trained with (data.tokenizer_vocab_size, --vocab-size): 8 times
the largest vocabularies in use, and an embedding table of 1 Mi rows."""
SHORTFALL = 0.9
"""SentencePiece's unigram pruning (hard_vocab_limit off) ends a few pieces short of the size
asked; fewer than this share of it means the text cannot give more, which is worth a warning."""
# A sentence longer than this is cut for training only (SentencePiece's own limit is 4192 bytes).
MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer:
    """Text <-> token ids. `model_bytes` is the tokenizer's file, kept for checkpoints and
    releases, where it is written as `file_name`."""

    file_name: str

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        self.model_bytes = model_bytes
        self.source = source

    @staticmethod
    def from_bytes(data: bytes, source: str = "<bytes>") -> "Tokenizer":
        """The tokenizer whose file is `data`: a SentencePiece model or a CPM-Ant vocab.txt."""
        if _is_cpm_ant_vocab(data):
            return CpmAntTokenizer(data, source)
        return SentencePieceTokenizer(data, source)

    @staticmethod
    def load(url: str) -> "Tokenizer":
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise UserError(f"tokenizer {url!r} does not exist; train one with "
                            "`cpm-lightning tokenizer train` or fix data.tokenizer") from None
        except (OSError, ValueError) as e:  # a directory, no permission, an unknown URL protocol
            raise UserError(f"tokenizer {url!r}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                            "expected a tokenizer file") from None
        return Tokenizer.from_bytes(data, url)

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], continued: bool = False) -> list[list[int]]:
        """The tokens of each text; `continued`: each text goes on a document just after a
        place where words start (datamodules/sources.py SAFE_CUT), so that the tokens of a
        document's segments, joined, equal those of the whole document."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    file_name = "tokenizer.model"

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        super().__init__(model_bytes, source)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError:
            raise UserError(f"{source}: not a SentencePiece model or a CPM-Ant vocab.txt") from None
        self.vocab_size, self.eos_id, self.pad_id = self.sp.vocab_size(), self.sp.eos_id(), self.sp.pad_id()
        self._continuing: spm.SentencePieceProcessor | None = None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], continued: bool = False) -> list[list[int]]:
        sp = self.continuing() if continued else self.sp
        return sp.encode(texts, num_threads=os.cpu_count())  # it parallelizes across a batch

    def continuing(self) -> spm.SentencePieceProcessor:
        """The model without its dummy prefix: SentencePiece puts a word boundary ("▁")
        before the first word of every text it encodes, which the middle of a document has not."""
        if self._continuing is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.model_bytes)
            proto.normalizer_spec.add_dummy_prefix = False
            self._continuing = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._continuing

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# CPM-Ant's vocab.txt spells these two as tokens of their own.
CPM_ANT_SPACE, CPM_ANT_NEWLINE = "</_>", "</n>"
CPM_ANT_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def _is_cpm_ant_vocab(data: bytes) -> bool:
    try:
        lines = set(data.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        return False
    return {CPM_ANT_SPACE, CPM_ANT_NEWLINE, *CPM_ANT_SPECIALS} <= lines


class CpmAntTokenizer(Tokenizer):
    """CPM-Ant's vocab.txt tokenizer, id for id as `transformers`' CpmAntTokenizer (whose
    jieba is rjieba): one token per line, the line number is its id."""

    file_name = "vocab.txt"
    MAX_WORD_CHARS = 200  # a longer jieba word is one <unk>, as in CPM-Ant

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        super().__init__(model_bytes, source)
        tokens = model_bytes.decode("utf-8").split("\n")
        if tokens[-1] == "":
            tokens.pop()  # the newline that ends the last line
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ids[" "], self.ids["\n"] = self.ids.pop(CPM_ANT_SPACE), self.ids.pop(CPM_ANT_NEWLINE)
        self.tokens = {i: t for t, i in self.ids.items()}
        self.vocab_size, self.eos_id, self.pad_id = len(tokens), self.ids["</s>"], self.ids["<pad>"]
        self.unk_id, self.bos_id = self.ids["<unk>"], self.ids["<s>"]
        self.longest = max(map(len, self.ids))

    def encode(self, text: str) -> list[int]:
        try:
            import rjieba
        except ImportError:
            raise UserError(f"{self.source}: CPM-Ant's tokenizer needs rjieba; install cpm-lightning[hf]") from None
        out = []
        for word in rjieba.cut(text, False):
            out.extend(self._word_pieces(word))
        return out

    def _word_pieces(self, word: str) -> list[int]:
        """Greedy longest match from the left; a character no token starts with is <unk>."""
        if len(word) > self.MAX_WORD_CHARS:
            return [self.unk_id]
        out, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self.longest), start, -1):
                if (i := self.ids.get(word[start:end])) is not None:
                    out.append(i)
                    start = end
                    break
            else:
                out.append(self.unk_id)
                start += 1
        return out

    def decode(self, ids: list[int]) -> str:
        skip = {self.pad_id, self.eos_id, self.bos_id}
        return "".join(self.tokens.get(i, "<unk>") for i in ids if i not in skip and i >= 0)


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


def check_vocab_size(vocab_size: int) -> None:
    """A UserError when `vocab_size` is outside [MIN_VOCAB, MAX_VOCAB]: before any text is read."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size must be at least {MIN_VOCAB} (256 byte pieces + specials), got {vocab_size}")
    if vocab_size > MAX_VOCAB:
        raise UserError(f"--vocab-size must be at most {MAX_VOCAB} (as data.tokenizer_vocab_size), got {vocab_size}")


def train_tokenizer(texts: Iterable[str], vocab_size: int, sample_chars: int = 20_000_000) -> SentencePieceTokenizer:
    """Train a unigram SentencePiece model on (up to `sample_chars` characters of) `texts`. A
    text too small for `vocab_size` pieces gives fewer, with a warning (SHORTFALL): how many it
    can give is known only once trained, and a smaller vocabulary works (the model's follows it)."""
    check_vocab_size(vocab_size)
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
    tokenizer = SentencePieceTokenizer(model.getvalue())
    if tokenizer.vocab_size < SHORTFALL * vocab_size:
        print(f"warning: the tokenizer has {tokenizer.vocab_size:,} pieces, fewer than the {vocab_size:,} asked: "
              "its training text gives no more; train on more text for more", file=sys.stderr)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, url: str) -> None:
    """Write the model to a path or fsspec URL, atomically where the filesystem allows; a
    UserError, with nothing left behind, when it cannot be written there."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):  # fs.mv would move the file into it, under the temporary name
        raise UserError(f"cannot write the tokenizer to {url!r}: it is a directory; expected a file path")
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and fs.isfile(parent):
        raise UserError(f"cannot write the tokenizer to {url!r}: {parent} is a file, not a directory")
    tmp = f"{path}.tmp"
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(tokenizer.model_bytes)
        fs.mv(tmp, path)
    except OSError as e:  # a parent that cannot be created, no permission, a full disk
        if fs.exists(tmp):
            fs.rm(tmp)
        raise UserError(f"cannot write the tokenizer to {url!r}: {e.strerror or e}") from None
