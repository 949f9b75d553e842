"""Tokenize each source once into memmap token shards, piece by piece, cached under keys made
from what the store reports about the files (docs/ARCHITECTURE.md, "Data").

A source's files, sorted, are grouped into *pieces* of about PIECE_BYTES (a larger file is a
piece of its own). Each piece is a directory `<cache>/shards/<key>/` with
  tokens.bin   every document's tokens followed by EOS, back to back (uint16 or uint32)
  index.npy    the end offset of each document in tokens.bin (of a task source: per sample, its
               task, the end of its input and its end; TaskWriter)
  meta.json    counts, the source it came from, and each file's metadata and sha256 (hashed
               while it was tokenized)
  hashes.json  the sha256 of each chunk of the three (cpm_lightning/core/file_hashes.py): meta.json and
               index.npy are checked when the piece is opened, each chunk of tokens.bin when a
               window is first read from it, so a damaged byte is an error naming the file
A piece is written to a temporary directory and renamed into place, so a killed build keeps the
pieces it finished and never leaves one that looks complete; two builders of the same piece
both finish and the second drops its copy. A piece's key covers its files' paths and metadata
(size plus modification time, ETag or checksum: no contents are read), the source's format and
field, the tokenizer and the shard format, so any change re-tokenizes that piece and nothing
else. A source's stream of tokens is its pieces' streams in order, the same tokens, in the same
order, as one shard of the whole source: the mixture draws the same windows.

`<cache>/manifests/<key>.json` lists the pieces of a source and its counts, written once all
are there. A cache at an fsspec URL is mirrored in a local cache (datamodules/remote.py): the
functions here take the local one and the remote one, if any.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import HASHES_FILE, RecordedHashes, hash_file, write_hashes
from cpm_lightning.core.tokenizer import Tokenizer
from datamodules.remote import RemoteCache, cached_file, host, temporary_piece
from datamodules.sources import (
    ReadStats,
    SourceConfig,
    SourceFile,
    TaskRecord,
    check_stats,
    documents,
    expand,
    lines,
    read_text,
    segments,
    task_records,
    where,
)

SHARD_FORMAT = "pieces v1"  # in every key: shards of an earlier format are rebuilt
FILES = ("tokens.bin", "index.npy", "meta.json")
PIECE_BYTES = 64 << 20
"""Files are grouped into pieces of about this many bytes (64 MiB): the unit of work of
`data prepare --part` and of a resumed build."""
ENCODE_CHARS = 1 << 23
"""Characters per tokenizer call (8 Mi): SentencePiece spreads a call's segments over the cores;
the token lists it returns (~36 bytes a token) are most of the memory a build takes."""
CHANGE_RETRIES = 3


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _content_hash(name: str, src: SourceConfig, f: SourceFile) -> str:
    h = hashlib.sha256()
    for _ in read_text(name, src, f, ReadStats(), h):
        pass
    return h.hexdigest()


def identities(name: str, src: SourceConfig, files: list[SourceFile]) -> list[tuple[str, dict]]:
    """(path, metadata) of each file: what its store reports, or, from a store that reports no
    modification time, ETag or checksum, the sha256 of its contents (with a warning: that
    reads the whole file at every start)."""
    unstable = [f for f in files if f.metadata() is None]
    if unstable:
        print(f"warning: {where(name)}: the store of {src.url!r} reports no modification time, ETag or "
              f"checksum for {len(unstable)} file(s); their {sum(f.size for f in unstable):,} bytes are read "
              "and hashed at every start to tell whether the cache holds them", file=sys.stderr)
    return [(f.path, f.metadata() or {"size": f.size, "sha256": _content_hash(name, src, f)}) for f in files]


def fingerprint(name: str, src: SourceConfig, files: list[SourceFile]) -> str:
    """The key of a source's files as listed, its format and field (no tokenizer)."""
    return _key(SHARD_FORMAT, src.format, src.field, identities(name, src, files))


@dataclass
class Piece:
    """Consecutive files of a source, tokenized together into one shard directory."""

    key: str
    files: list[SourceFile]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def plan(name: str, src: SourceConfig, files: list[SourceFile], tokenizer: Tokenizer) -> list[Piece]:
    """The pieces of a source, in file order, with their keys; reads no contents (but see
    `identities`)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, f in enumerate(files):
        if groups[-1] and size + f.size > PIECE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += f.size
    ids = identities(name, src, files)
    tok = hashlib.sha256(tokenizer.model_bytes).hexdigest()
    return [Piece(_key(SHARD_FORMAT, src.format, src.field, tok, [ids[i] for i in g]), [files[i] for i in g])
            for g in groups]


def iter_documents(name: str, src: SourceConfig, stats: ReadStats, progress: bool = True, files=None):
    files = expand(name, src) if files is None else files
    for f in tqdm(files, desc=f"reading {name}", unit="file", disable=not progress or len(files) < 2, file=sys.stderr):
        yield from documents(name, src, f, stats)


def checked_documents(name: str, src: SourceConfig, files=None):
    """The documents of a source, then a UserError naming it if it held none (warnings about
    skipped lines are left to the build, which reads the source again)."""
    stats = ReadStats()
    yield from iter_documents(name, src, stats, files=files)
    check_stats(name, src, stats)


@dataclass
class Shard:
    """A tokenized piece, memory-mapped, checked against the hashes recorded when it was built."""

    path: Path
    tokens: np.ndarray
    """All of tokens.bin, unchecked: read windows with read()."""
    hashes: RecordedHashes

    @classmethod
    def open(cls, path: Path) -> "Shard":
        remedy = f"delete {path} (a cache entry): it is rebuilt on the next run"
        try:
            hashes = RecordedHashes(path / HASHES_FILE, path, remedy)
        except FileNotFoundError:
            raise UserError(f"{path / HASHES_FILE} is missing; {remedy}") from None
        hashes.check("meta.json")
        hashes.check("index.npy")  # read by no training code, but small: 8 bytes per document
        meta = json.loads((path / "meta.json").read_text())
        tokens = (np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r") if meta["tokens"]
                  else np.empty(0, meta["dtype"]))  # numpy cannot map an empty file
        return cls(path, tokens, hashes)

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop], once the chunks of tokens.bin that hold them are checked (each
        chunk once: a run hashes only the chunks its windows touch, in step with training)."""
        itemsize = self.tokens.itemsize
        self.hashes.check("tokens.bin", start * itemsize, stop * itemsize)
        return self.tokens[start:stop]


class SourceTokens:
    """A source's token stream: its pieces' tokens, back to back."""

    def __init__(self, pieces: list[Shard]):
        self.pieces = pieces
        self.starts = np.cumsum([0, *(len(p.tokens) for p in pieces)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """The stream's tokens [start, stop), checked (Shard.read), across pieces if need be."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, i = [], first
        while i < len(self.pieces) and self.starts[i] < stop:
            base = int(self.starts[i])
            parts.append(self.pieces[i].read(max(start - base, 0), min(stop, int(self.starts[i + 1])) - base))
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TextWriter:
    """Writes documents' tokens, each followed by EOS, to tokens.bin, and their end offsets."""

    def __init__(self, out, tokenizer: Tokenizer, dtype):
        self.out, self.tokenizer, self.dtype = out, tokenizer, dtype
        self.batch: list = []
        self.chars = self.total = 0
        self.ends: list[int] = []

    @staticmethod
    def items(name: str, src: SourceConfig, f: SourceFile, stats: ReadStats, hasher):
        return segments(name, src, f, stats, hasher)

    def add(self, item) -> None:
        self.batch.append(item)
        self.chars += self.size(item)
        if self.chars >= ENCODE_CHARS:
            self.flush()

    @staticmethod
    def size(item) -> int:
        return len(item[0])

    def write(self, ids: list[int]) -> None:
        self.out.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.total += len(ids)

    def flush(self) -> None:
        firsts = iter(self.tokenizer.encode_batch([s for s, first, _ in self.batch if first]))
        rest = iter(self.tokenizer.encode_batch([s for s, first, _ in self.batch if not first], continued=True))
        for _, first, last in self.batch:
            ids = next(firsts) if first else next(rest)
            if last:
                ids.append(self.tokenizer.eos_id)
            self.write(ids)
            if last:
                self.ends.append(self.total)
        self.batch, self.chars = [], 0

    def index(self) -> np.ndarray:
        return np.asarray(self.ends, dtype=np.int64)

    def meta(self) -> dict:
        return {}


class TaskWriter(TextWriter):
    """Writes task samples (datamodules/tasks.py): each one's input tokens, then its output's
    tokens and EOS; its index rows are (task, end of the input, end of the sample), the task an
    index into meta.json's `tasks`, so that the cache does not depend on which prompt row a
    run gives a task."""

    def __init__(self, out, tokenizer: Tokenizer, dtype):
        super().__init__(out, tokenizer, dtype)
        self.tasks: dict[str, int] = {}
        self.rows: list[tuple[int, int, int]] = []

    @staticmethod
    def items(name: str, src: SourceConfig, f: SourceFile, stats: ReadStats, hasher):
        return task_records(name, f, lines(read_text(name, src, f, stats, hasher)), stats)

    @staticmethod
    def size(item: TaskRecord) -> int:
        return len(item.input) + len(item.output)

    def flush(self) -> None:
        inputs = self.tokenizer.encode_batch([r.input for r in self.batch])
        outputs = self.tokenizer.encode_batch([r.output for r in self.batch])
        for record, input_ids, output_ids in zip(self.batch, inputs, outputs, strict=True):
            self.write(input_ids)
            input_end = self.total
            self.write([*output_ids, self.tokenizer.eos_id])
            self.rows.append((self.tasks.setdefault(record.task, len(self.tasks)), input_end, self.total))
        self.batch, self.chars = [], 0

    def index(self) -> np.ndarray:
        return np.asarray(self.rows, dtype=np.int64).reshape(-1, 3)

    def meta(self) -> dict:
        return {"tasks": list(self.tasks)}


class _Changed(Exception):
    """A file's metadata changed while it was being tokenized."""


def writable(cache_dir: Path, probe: bool = False) -> Path:
    """`cache_dir/shards`, made (with `manifests`) if need be. `probe`: a file is also written
    there and removed, to know before long work (training a tokenizer) that the cache takes
    files: mkdir of a directory that exists succeeds even where nothing can be written, and a
    complete cache that is read-only is still read."""
    shards = cache_dir / "shards"
    try:
        shards.mkdir(parents=True, exist_ok=True)
        (cache_dir / "manifests").mkdir(exist_ok=True)
        if probe:
            tempfile.TemporaryFile(dir=cache_dir).close()
    except OSError as e:
        raise UserError(f"data.cache_dir: cannot write the data cache {cache_dir} ({e.strerror or e}); "
                        "expected a writable directory (or set $CPM_LIGHTNING_CACHE)") from None
    return shards


def _cannot_write(path: Path, e: OSError) -> UserError:
    """A write into the cache that failed (a full disk, a quota), once what it wrote is removed."""
    return UserError(f"data.cache_dir: cannot write {path} ({e.strerror or e}); nothing of it was kept")


def _drop_dead_builds(parent: Path, key: str) -> None:
    """Remove the temporary directories of builds of `key` that were killed on this machine:
    their names carry the host and process id (a live build, here or elsewhere, is left alone)."""
    for tmp in parent.glob(f".{key}-{host()}-*-*"):
        pid = int(tmp.name.split("-")[-2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def build_piece(name: str, src: SourceConfig, piece: Piece, tokenizer: Tokenizer, cache_dir: Path,
                alone: bool = False, remote: RemoteCache | None = None) -> Path:
    """The shard directory of `piece` in the local cache: found there, else downloaded from the
    remote cache, else tokenized (and uploaded). Raises _Changed if a file's metadata changed
    while it was read. `alone`: the piece is the whole source, so a source without text is an
    error before anything is written."""
    parent = writable(cache_dir)
    final = parent / piece.key
    if (final / "meta.json").exists():
        if remote is not None:  # built before this cache was shared
            remote.publish_piece(final, piece.key)
        return final
    _drop_dead_builds(parent, piece.key)
    if remote is not None and remote.fetch_piece(piece.key, final):
        return final
    try:
        tmp = temporary_piece(parent, piece.key)
    except OSError as e:
        raise _cannot_write(final, e) from None
    try:
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        stats, files = ReadStats(), []
        bar = tqdm(desc=f"tokenizing {name}", unit="B", unit_scale=True, total=piece.size, file=sys.stderr,
                   disable=piece.size < PIECE_BYTES // 4)
        with open(tmp / "tokens.bin", "wb") as out:
            writer = (TaskWriter if src.format == "task" else TextWriter)(out, tokenizer, dtype)
            for f in piece.files:
                h = hashlib.sha256()
                for item in writer.items(name, src, f, stats, h):
                    writer.add(item)
                if not f.still_the_same():
                    raise _Changed(f.path)
                files.append({"path": f.path, "metadata": f.metadata(), "sha256": h.hexdigest()})
                bar.update(f.size)
            writer.flush()
        bar.close()
        if alone:
            check_stats(name, src, stats)
        np.save(tmp / "index.npy", writer.index())
        meta = {"source": name, "url": src.url, "format": src.format, "dtype": np.dtype(dtype).name,
                "tokens": writer.total, "documents": stats.documents, "bad_lines": stats.bad_lines,
                "replaced_bytes": stats.replaced_bytes, "files": files, **writer.meta()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        write_hashes(tmp / HASHES_FILE, {f: hash_file(tmp / f) for f in FILES})
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same piece first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # not a read: read_text raises those as UserErrors naming the source
            raise _cannot_write(final, e) from None
        raise
    if remote is not None:
        remote.publish_piece(final, piece.key)
    return final


def prepare_source(name: str, src: SourceConfig, tokenizer: Tokenizer, cache_dir: Path,
                   files: list[SourceFile] | None = None, only: set[str] | None = None,
                   remote: RemoteCache | None = None) -> Path | None:
    """Build the pieces of a source that the cache lacks (of them, those whose keys are in
    `only`, when given), and return its manifest once every piece is there (None before).
    `cache_dir` is the local cache, or the local mirror of `remote`.
    A file that changes while it is read is listed again and its piece redone."""
    for attempt in range(CHANGE_RETRIES):
        pieces = plan(name, src, expand(name, src) if files is None or attempt else files, tokenizer)
        try:
            for piece in pieces:
                if only is None or piece.key in only:
                    build_piece(name, src, piece, tokenizer, cache_dir, len(pieces) == 1, remote)
            break
        except _Changed as changed:
            print(f"warning: {where(name)}: {changed} changed while it was tokenized; preparing it again",
                  file=sys.stderr)
    else:
        raise UserError(f"{where(name)}: files of {src.url!r} kept changing while they were tokenized "
                        f"({CHANGE_RETRIES} tries); prepare the data once they are written")
    writable(cache_dir)
    path = cached_file(cache_dir, f"manifests/{_key(SHARD_FORMAT, [p.key for p in pieces])}.json", remote,
                       lambda path: write_manifest(name, src, pieces, path, remote))
    return path if path.exists() else None


def _piece_meta(parent: Path, key: str, remote: RemoteCache | None) -> dict | None:
    """meta.json of piece `key`, from the local cache or the remote one; None if neither has it."""
    local = parent / key / "meta.json"
    if local.exists():
        return json.loads(local.read_text())
    return None if remote is None else remote.piece_meta(key)


def write_manifest(name: str, src: SourceConfig, pieces: list[Piece], path: Path,
                   remote: RemoteCache | None = None) -> None:
    """Write the manifest `path` of a source whose pieces are all in the cache (local, or remote
    too), with the warnings about what was skipped; nothing while some are missing."""
    metas = []
    for p in pieces:
        metas.append(_piece_meta(path.parent.parent / "shards", p.key, remote))
        if metas[-1] is None:
            return
    stats = ReadStats(*(sum(m[k] for m in metas) for k in ("bad_lines", "replaced_bytes", "documents")))
    for warning in check_stats(name, src, stats):
        print(f"warning: {warning}", file=sys.stderr)
    manifest = {"source": name, "url": src.url, "format": src.format, "field": src.field,
                "tokens": sum(m["tokens"] for m in metas), "documents": stats.documents,
                "bad_lines": stats.bad_lines, "replaced_bytes": stats.replaced_bytes,
                "pieces": [{"key": p.key, "tokens": m["tokens"], "files": [f["path"] for f in m["files"]]}
                           for p, m in zip(pieces, metas, strict=True)]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, e) from None


def open_source(manifest: Path, cache_dir: Path) -> SourceTokens:
    pieces = json.loads(manifest.read_text())["pieces"]
    return SourceTokens([Shard.open(cache_dir / "shards" / p["key"]) for p in pieces])
