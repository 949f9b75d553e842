"""Tokenize each source once into a memmap token shard, cached under a content fingerprint.

A shard is a directory `<cache>/shards/<fingerprint>/` with
  tokens.bin   every document's tokens followed by EOS, back to back (uint16 or uint32)
  index.npy    the end offset of each document in tokens.bin
  meta.json    counts and the source it came from
  hashes.json  the sha256 of each chunk of the three (cpm_lightning/file_hashes.py): meta.json and
               index.npy are checked when the shard is opened, each chunk of tokens.bin when a
               window is first read from it, so a damaged byte is an error naming the file
It is written to a temporary directory and renamed into place, so a crash never leaves a
shard that looks complete. The fingerprint covers the bytes of every file, the source's format
and field, the tokenizer's model and the shard format, so any change re-tokenizes and nothing
else does.
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

from cpm_lightning.errors import UserError
from cpm_lightning.file_hashes import HASHES_FILE, RecordedHashes, hash_file, write_hashes
from cpm_lightning.tokenizer import Tokenizer
from datamodules.sources import ReadStats, SourceConfig, check_stats, documents, expand, read_bytes

ENCODE_BATCH = 256  # documents per tokenizer call (SentencePiece parallelizes across a batch)
SHARD_FORMAT = b"shards with hashes"  # in the cache key: earlier shards had no hashes.json and are rebuilt
FILES = ("tokens.bin", "index.npy", "meta.json")


def default_cache_dir() -> Path:
    return Path(os.environ.get("CPM_LIGHTNING_CACHE", Path.home() / ".cache" / "cpm-lightning"))


def fingerprint(name: str, src: SourceConfig, extra: bytes = b"") -> str:
    """sha256 over the source's format/field, each file's path and bytes, and `extra`."""
    h = hashlib.sha256(json.dumps([src.format, src.field]).encode() + extra)
    for f in expand(name, src):
        h.update(f.path.encode())
        h.update(hashlib.sha256(read_bytes(name, f)).digest())
    return h.hexdigest()[:32]


def iter_documents(name: str, src: SourceConfig, stats: ReadStats, progress: bool = True):
    files = expand(name, src)
    for f in tqdm(files, desc=f"reading {name}", unit="file", disable=not progress or len(files) < 2, file=sys.stderr):
        yield from documents(name, src, f.path, read_bytes(name, f), stats)


def checked_documents(name: str, src: SourceConfig):
    """The documents of a source, then a UserError naming it if it held none (warnings about
    skipped lines are left to build_shard, which reads the source again)."""
    stats = ReadStats()
    yield from iter_documents(name, src, stats)
    check_stats(name, src, stats)


@dataclass
class Shard:
    """A tokenized source, memory-mapped, checked against the hashes recorded when it was built."""

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
        return cls(path, np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r"), hashes)

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop], once the chunks of tokens.bin that hold them are checked (each
        chunk once: a run hashes only the chunks its windows touch, in step with training)."""
        itemsize = self.tokens.itemsize
        self.hashes.check("tokens.bin", start * itemsize, stop * itemsize)
        return self.tokens[start:stop]


def build_shard(name: str, src: SourceConfig, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """The shard directory of `src`, tokenizing it first unless a matching one is cached."""
    key = fingerprint(name, src, SHARD_FORMAT + tokenizer.model_bytes)
    final = cache_dir / "shards" / key
    if (final / "meta.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        stats, ends, total = ReadStats(), [], 0
        bar = tqdm(desc=f"tokenizing {name}", unit="tok", unit_scale=True, file=sys.stderr)
        with open(tmp / "tokens.bin", "wb") as out:
            batch = []
            for doc in [*iter_documents(name, src, stats), None]:
                if doc is not None:
                    batch.append(doc)
                if batch and (doc is None or len(batch) == ENCODE_BATCH):
                    for ids in tokenizer.encode_batch(batch):
                        ids.append(tokenizer.eos_id)
                        out.write(np.asarray(ids, dtype=dtype).tobytes())
                        total += len(ids)
                        ends.append(total)
                    bar.update(total - bar.n)
                    batch = []
        bar.close()
        for warning in check_stats(name, src, stats):
            print(f"warning: {warning}", file=sys.stderr)
        np.save(tmp / "index.npy", np.asarray(ends, dtype=np.int64))
        meta = {"source": name, "url": src.url, "format": src.format, "dtype": np.dtype(dtype).name,
                "tokens": total, "documents": len(ends), "bad_lines": stats.bad_lines,
                "replaced_bytes": stats.replaced_bytes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        write_hashes(tmp / HASHES_FILE, {f: hash_file(tmp / f) for f in FILES})
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same shard first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
