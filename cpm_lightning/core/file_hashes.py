"""Hashes recorded when a checkpoint, a model directory or a token shard is written, and checked
before its bytes are trusted: a flipped byte on disk becomes one error line naming the file, not
a model that trains or samples on it.

A single file carries its own record (`seal`): a line `cpm-lightning-integrity v1 size=N
chunk=C sha256=D` inside the file (a zip comment of a .ckpt, the safetensors header's metadata),
where D is the sha256 of the chunk hashes of the whole file read with D's own 64 bytes as ASCII
zeros. Every byte is covered, the record's included, and nothing names the file: a copy, a
rename or a sync of the file alone verifies.

A directory's `hashes.json` lists, for each file, its size and the sha256 of each `chunk_bytes`
chunk, and carries a sha256 of that listing so that damage to the listing itself is named as
such. A reader checks a file whole before parsing it (meta.pt, DCP's .metadata, a shard's
meta.json) or only the chunks it reads, each once per open (DCP shard files, tokens.bin): a load
hashes what it reads and nothing else. sha256 because it is the fastest hashlib hash where CPUs
have SHA instructions (~1 GB/s per core, 3x blake2b; benchmarks/integrity_overhead.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
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


def _chunk_digests(path: Path, indices: Sequence[int], chunk_bytes: int,
                   blank: int | None = None) -> list[tuple[int, str]]:
    """(length, sha256 hex) of the chunks `indices` of the file at `path`; with `blank`, the 64
    bytes from that offset read as ASCII zeros (where a sealed file keeps its own digest)."""
    with open(path, "rb", buffering=0) as f:
        def digest(i: int) -> tuple[int, str]:
            data = os.pread(f.fileno(), chunk_bytes, i * chunk_bytes)
            at = None if blank is None else blank - i * chunk_bytes
            if at is not None and -DIGEST_LEN < at < len(data):
                data = bytearray(data)
                lo, hi = max(at, 0), min(at + DIGEST_LEN, len(data))
                data[lo:hi] = PLACEHOLDER[lo - at:hi - at]
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

    @classmethod
    def beside(cls, path: Path, file: Path, remedy: str) -> "RecordedHashes":
        """The hashes file `path` that an older single-file checkpoint has beside it, as hashes of
        `file`: it lists one file, under the name it was written with (a copy may be renamed)."""
        hashes = cls(path, file.parent, remedy)
        if len(hashes.files) == 1:
            hashes.files = {file.name: next(iter(hashes.files.values()))}
        return hashes

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


# -- a record inside the file ------------------------------------------------------------------
DIGEST_LEN = 64
PLACEHOLDER = b"0" * DIGEST_LEN
RECORD_TAG = "cpm-lightning-integrity v1"
RECORD = re.compile(rf"{RECORD_TAG} size=(\d{{20}}) chunk=(\d{{1,12}}) sha256=([0-9a-f]{{{DIGEST_LEN}}})")
TRUST_FLAG = "--trust-unverified"
TRUST_KEY = "checkpoint.trust_unverified"  # fit's (and live's) spelling of TRUST_FLAG: a run-config key
TRUST_HELP = ("read a checkpoint or model directory that has no integrity record (written by other software or "
              "an older version) without verifying its bytes; one with a record is always verified")


def record_text(size: int) -> str:
    """The record of a file of `size` bytes (the record's own included), its digest a
    placeholder that `seal` fills in. Fixed width, so the size is known before it is written."""
    return f"{RECORD_TAG} size={size:020d} chunk={CHUNK_BYTES} sha256={PLACEHOLDER.decode()}"


def _sealed_digest(path: Path, size: int, chunk_bytes: int, blank: int) -> str:
    chunks = _chunk_digests(path, range(-(-size // chunk_bytes)), chunk_bytes, blank)
    return hashlib.sha256("".join(h for _, h in chunks).encode()).hexdigest()


def seal(path: Path, at: int) -> None:
    """Fill in the digest of the record (record_text) whose placeholder starts at byte `at` of
    the file at `path`, once every other byte is written."""
    digest = _sealed_digest(path, os.stat(path).st_size, CHUNK_BYTES, at)
    with open(path, "r+b", buffering=0) as f:
        os.pwrite(f.fileno(), digest.encode(), at)


def check_sealed(path: Path, text: str, offset: int, remedy: str) -> None:
    """A UserError unless the file at `path` matches the record that `text` (read from byte
    `offset` of the file) holds; a `text` without a readable record is a damaged record."""
    found = RECORD.search(text)
    if found is None:
        raise UserError(f"{path} is damaged: its integrity record is not readable; {remedy}")
    size, chunk_bytes, digest = int(found[1]), int(found[2]), found[3]
    actual = os.stat(path).st_size
    if actual != size:
        raise UserError(f"{path} is damaged: {actual} bytes, {size} when it was written (its integrity record "
                        f"says); {remedy}")
    if chunk_bytes < 1 or _sealed_digest(path, size, chunk_bytes, offset + found.start(3)) != digest:
        raise UserError(f"{path} is damaged: its bytes do not match the sha256 recorded in it when it was "
                        f"written; {remedy}")


_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_unverified", default=False)
_unverified_warned: set[str] = set()


def trust_unverified(trust: bool) -> None:
    """From now on in this context (a `fit`: its whole run), read a file without an integrity
    record with a warning (`trust`) or refuse it (checkpoint.trust_unverified)."""
    _trusted.set(trust)


@contextlib.contextmanager
def trusting_unverified(trust: bool = True) -> Iterator[None]:
    """While it lasts, a file without any integrity record is read with a warning instead of
    refused (the verbs' --trust-unverified)."""
    token = _trusted.set(trust)
    try:
        yield
    finally:
        _trusted.reset(token)


def unverified(path: Path, what: str) -> None:
    """A file without an integrity record (`what` says which kind): refused naming the flag,
    or, under trusting_unverified, read with one warning."""
    if not _trusted.get():
        raise UserError(f"{path}: {what} has no integrity record (written by other software or by an older "
                        f"cpm-lightning); pass {TRUST_FLAG} to read it unverified (fit and live: {TRUST_KEY}: true)")
    if str(path) not in _unverified_warned:
        _unverified_warned.add(str(path))
        print(f"warning: {path}: {what} has no integrity record; its bytes are not verified ({TRUST_FLAG})",
              file=sys.stderr)


def check_links_inside(directory: Path, what: str) -> None:
    """A UserError naming the first symbolic link in `directory` whose target is outside it:
    its recorded hashes would vouch for a file they were never about."""
    root = Path(directory).resolve()
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise UserError(f"{entry}: a symbolic link to {entry.resolve()}, outside {what}; refused (copy the file "
                            "in instead)")


def sha256(path: Path) -> str:
    """The sha256 of a whole file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
