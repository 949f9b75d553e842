"""What `fit` and `data prepare` share, without Lightning: a data config's files, its tokenizer
and the pieces of its sources, and the split of that work over N machines (docs/ARCHITECTURE.md,
"Data")."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import Tokenizer, save_tokenizer, train_tokenizer
from datamodules.config import DataConfig
from datamodules.remote import cached_file, locations
from datamodules.shards import Piece, checked_documents, fingerprint, plan, prepare_source, writable
from datamodules.sources import SourceFile, expand


class PreparedData:
    """A data config's sources as their store lists them (once: for a remote store, one
    request per file), its tokenizer, and its sources' shards in the cache."""

    def __init__(self, data: DataConfig):
        self.data = data
        self.cache_path, self.remote = locations(data.cache_dir, data.local_cache)
        """The local cache (with a remote cache_dir: its local mirror), and the remote cache or None."""
        self._files: dict[str, list[SourceFile]] = {}
        self._tokenizer: Tokenizer | None = None
        self._manifests: dict[str, Path] = {}

    def files(self, name: str) -> list[SourceFile]:
        if name not in self._files:
            self._files[name] = expand(name, self.data.sources[name])
        return self._files[name]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.data.tokenizer) if self.data.tokenizer else self._trained_tokenizer()
        return self._tokenizer

    def _trained_tokenizer(self) -> Tokenizer:
        sources = sorted(self.data.sources.items())
        key = hashlib.sha256(json.dumps(
            [self.data.tokenizer_vocab_size, *(fingerprint(n, s, self.files(n)) for n, s in sources)]
        ).encode()).hexdigest()[:32]

        def train(path: Path) -> None:
            writable(self.cache_path, probe=True)  # before the minutes of training, not after them
            print(f"training a {self.data.tokenizer_vocab_size}-piece tokenizer on the sources -> {path}", file=sys.stderr)
            texts = (d for n, s in sources for d in checked_documents(n, s, self.files(n)))
            save_tokenizer(train_tokenizer(texts, self.data.tokenizer_vocab_size), str(path))

        return Tokenizer.load(str(cached_file(self.cache_path, f"tokenizers/{key}.model", self.remote, train)))

    def pieces(self, name: str) -> list[Piece]:
        return plan(name, self.data.sources[name], self.files(name), self.tokenizer)

    def manifest(self, name: str, only: set[str] | None = None) -> Path | None:
        """The manifest of source `name`, its missing pieces built first (those in `only`, when
        given; then None until every piece is there). Remembered once complete."""
        if name not in self._manifests:
            found = prepare_source(name, self.data.sources[name], self.tokenizer, self.cache_path,
                                   self.files(name), only, self.remote)
            if found is None:
                return None
            self._manifests[name] = found
        return self._manifests[name]


def parse_part(text: str) -> tuple[int, int]:
    """--part I/N: (I, N) with 0 <= I < N."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise UserError(f"--part: expected I/N (this machine's index from 0 and the number of machines, "
                        f"e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--part {text}: the index must be at least 0 and below the number of parts ({n})")
    return i, n


def assign(pieces: list[Piece], parts: int) -> list[set[str]]:
    """The piece keys of each part: largest pieces first, each to the part with the fewest bytes
    so far. Every machine lists the same files, so all compute the same split."""
    loads, out = [0] * parts, [set() for _ in range(parts)]
    for piece in sorted({p.key: p for p in pieces}.values(), key=lambda p: (-p.size, p.key)):
        i = loads.index(min(loads))
        loads[i] += piece.size
        out[i].add(piece.key)
    return out


def prepare(configs: list[DataConfig], part: int = 0, parts: int = 1) -> list[str]:
    """Build this part's pieces of every source of `configs`; returns a line per source saying
    what is done."""
    prepared = [PreparedData(data) for data in configs]
    everything = [p for d in prepared for name in sorted(d.data.sources) for p in d.pieces(name)]
    mine = assign(everything, parts)[part]
    lines = []
    for d in prepared:
        for name in sorted(d.data.sources):
            pieces = d.pieces(name)
            done = d.manifest(name, mine)
            todo = [p for p in pieces if p.key in mine]
            state = f"complete ({done})" if done else "waiting for the pieces of other parts"
            lines.append(f"data.sources.{name}: {len(todo)} of {len(pieces)} piece(s) in this part; {state}")
    return lines
