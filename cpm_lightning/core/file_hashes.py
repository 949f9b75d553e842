"""Hashes recorded when a checkpoint or a token shard is written, and checked before its bytes
are trusted: a flipped byte on disk becomes one error line naming the file, not a model that
trains or samples on it.

A directory's `hashes.json` lists, for each file, its size and the sha256 of each `chunk_bytes`
chunk, and carries a sha256 of that listing so that damage to the listing itself is named as
such. A reader checks a file whole before parsing it (meta.pt, DCP's .metadata, a shard's
meta.json) or only the chunks it reads, each once per open (DCP shard files, tokens.bin): a load
hashes what it reads and nothing else. sha256 because it is the fastest hashlib hash where CPUs
have SHA instructions (~1 GB/s per core, 3x blake2b; benchmarks/integrity_overhead.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cpm_lightning.core.errors import UserError

HASHES_FILE = "hashes.json"
CHUNK_BYTES = 1 << 20
"""1 MiB: a training window that first touches a chunk of tokens.bin waits for its hash (~1 ms),
and hashes.json holds 64 hex digits per MiB (7 KB for 100 MB)."""
HASH_THREADS = min(8, os.cpu_count() or 1)
"""Chunks hashed at once: reads and sha256 release the GIL, so a checkpoint's rank hashes its
file in a fraction of the time the write took (spare cores of a GPU node are idle then)."""


def _chunk_digests(path: Path, indices: Sequence[int], chunk_bytes: int) -> list[tuple[int, str]]:
    """(length, sha256 hex) of the chunks `indices` of the file at `path`."""
    with open(path, "rb", buffering=0) as f:
        def digest(i: int) -> tuple[int, str]:
            data = os.pread(f.fileno(), chunk_bytes, i * chunk_bytes)
            return len(data), hashlib.sha256(data).hexdigest()

        if len(indices) == 1:  # a training window's chunk: no thread pool
            return [digest(indices[0])]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            return list(pool.map(digest, indices))


def hash_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """{"size": bytes, "chunks": [sha256 hex of each chunk]} of the file at `path`."""
    size = os.stat(path).st_size
    return {"size": size, "chunks": [h for _, h in _chunk_digests(path, range(-(-size // chunk_bytes)), chunk_bytes)]}


def _listing_digest(chunk_bytes: int, files: dict) -> str:
    return hashlib.sha256(json.dumps([chunk_bytes, files], sort_keys=True).encode()).hexdigest()


def write_hashes(path: Path, files: dict[str, dict], chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write the hashes file `path` for `files` ({name: hash_file(...)}, names relative to the
    directory of the files)."""
    Path(path).write_text(json.dumps({"chunk_bytes": chunk_bytes, "files": files,
                                      "sha256": _listing_digest(chunk_bytes, files)}, indent=1))


class RecordedHashes:
    """The recorded hashes of the files in `root`, checked on demand: each chunk once."""

    def __init__(self, path: Path, root: Path, remedy: str):
        """`path`: the hashes file; `remedy`: what the user should do about a damaged file (ends
        every error message)."""
        self.path, self.root, self.remedy = Path(path), Path(root), remedy
        try:
            data = json.loads(self.path.read_bytes())
            self.chunk_bytes, self.files = int(data["chunk_bytes"]), data["files"]
            intact = data["sha256"] == _listing_digest(self.chunk_bytes, self.files)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            raise UserError(f"{self.path} is damaged: it does not match the sha256 of its own listing; {remedy}")
        self._checked: set[tuple[str, int]] = set()

    @classmethod
    def find(cls, path: Path, root: Path, remedy: str) -> "RecordedHashes | None":
        """The hashes recorded at `path`, or None if there is no such file."""
        try:
            return cls(path, root, remedy)
        except FileNotFoundError:
            return None

    def check(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """A UserError unless the chunks of file `name` that hold bytes [start, stop) (the whole
        file by default) have the recorded hashes. Chunks already checked are not read again."""
        file = self.root / name
        if name not in self.files:
            raise UserError(f"{file} is not listed in {self.path}; {self.remedy}")
        recorded = self.files[name]
        stop = recorded["size"] if stop is None else min(stop, recorded["size"])
        todo = [i for i in range(start // self.chunk_bytes, -(-stop // self.chunk_bytes))
                if (name, i) not in self._checked]
        if not todo:
            return
        try:
            size = file.stat().st_size
            if size != recorded["size"]:
                raise UserError(f"{file} is damaged: {size} bytes, {recorded['size']} when it was written "
                                f"(recorded in {self.path}); {self.remedy}")
            for i, (length, digest) in zip(todo, _chunk_digests(file, todo, self.chunk_bytes), strict=True):
                if digest != recorded["chunks"][i]:
                    first = i * self.chunk_bytes
                    raise UserError(f"{file} is damaged: bytes {first}-{first + length - 1} do not match the "
                                    f"sha256 recorded in {self.path} when it was written; {self.remedy}")
                self._checked.add((name, i))
        except FileNotFoundError:
            raise UserError(f"{file} is missing (listed in {self.path}); {self.remedy}") from None


def sha256(path: Path) -> str:
    """The sha256 of a whole file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
