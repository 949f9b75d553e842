"""A data cache at an fsspec URL (s3://, gs://, file://, ...) shared by machines, and the local
mirror each machine memory-maps it from (docs/ARCHITECTURE.md, "Data").

The remote cache has the local cache's layout, but a piece is uploaded so that no reader ever
takes a half-uploaded one: its files go to `shards/<key>/<upload>/`, a directory of its own
per uploader, and the marker `shards/<key>/complete` naming that directory is written last; a
piece counts only once its marker is there. Two uploaders of the same piece: an uploader that
finds the marker already written deletes its own copy; if both write it, the last marker wins
and both name a complete copy. Single files (manifests, tokenizers, markers) are uploaded under
a temporary name and moved into place, which object stores do atomically.

A piece, manifest or tokenizer the local mirror lacks is downloaded (a piece is checked whole
against its hashes.json before it is moved into the mirror), or built locally and uploaded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import fsspec

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import HASHES_FILE, RecordedHashes

HOME_CACHE = Path.home() / ".cache" / "cpm-lightning"
MARKER = "complete"
PIECE_FILES = ("tokens.bin", "index.npy", "meta.json", HASHES_FILE)


def host() -> str:
    return socket.gethostname().replace("-", "_")  # "-" separates the parts of a temporary name


def temporary_piece(parent: Path, key: str) -> Path:
    """A new temporary directory for piece `key` in `parent`, named so that
    shards._drop_dead_builds removes it once its process is dead."""
    return Path(tempfile.mkdtemp(prefix=f".{key}-{host()}-{os.getpid()}-", dir=parent))


def is_url(location: str) -> bool:
    return "://" in location


class RemoteCache:
    """The data cache at `url`, checked readable and writable when opened."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
            self.root = root.rstrip("/")
            self.fs.makedirs(self.root, exist_ok=True)
            probe = self._path(f".probe-{self._upload_name()}")
            self.fs.pipe_file(probe, b"")
            self.fs.cat_file(probe)
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - each store raises its own kinds (botocore, gcsfs, ...); all mean "cannot use it"
            raise UserError(f"data.cache_dir: cannot read and write the data cache {url} ({type(e).__name__}: {e}); "
                            "expected a local directory or an fsspec URL of a store this machine can read and "
                            "write (or set $CPM_LIGHTNING_CACHE)") from None

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @staticmethod
    def _upload_name() -> str:
        return f"{host()}-{os.getpid()}-{secrets.token_hex(4)}"

    def _put(self, local: Path, rel: str) -> None:
        path = self._path(rel)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
        self.fs.put_file(str(local), path)

    def publish(self, local: Path, rel: str) -> None:
        """Upload `local` to `rel`: under a temporary name, then moved into place."""
        tmp = f"{rel}.tmp-{self._upload_name()}"
        self._put(local, tmp)
        self.fs.mv(self._path(tmp), self._path(rel))

    def fetch_file(self, rel: str, local: Path) -> bool:
        """Download `rel` to `local` (atomically); False if the remote cache lacks it."""
        if not self.fs.exists(self._path(rel)):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}")
        self.fs.get_file(self._path(rel), str(tmp))
        os.replace(tmp, local)
        return True

    def _upload_of(self, key: str) -> str | None:
        """The directory of the complete upload of piece `key`, or None."""
        try:
            return self.fs.cat_file(self._path(f"shards/{key}/{MARKER}")).decode()
        except FileNotFoundError:
            return None

    def piece_meta(self, key: str) -> dict | None:
        """meta.json of piece `key` if it is complete in the remote cache."""
        upload = self._upload_of(key)
        return None if upload is None else json.loads(self.fs.cat_file(self._path(f"shards/{key}/{upload}/meta.json")))

    def fetch_piece(self, key: str, final: Path) -> bool:
        """Download piece `key` into the local directory `final`, checked against its hashes.json;
        False if the remote cache has no complete copy."""
        upload = self._upload_of(key)
        if upload is None:
            return False
        tmp = temporary_piece(final.parent, key)  # named as a build's: a killed download is cleaned up alike
        try:
            for name in PIECE_FILES:
                self.fs.get_file(self._path(f"shards/{key}/{upload}/{name}"), str(tmp / name))
            hashes = RecordedHashes(tmp / HASHES_FILE, tmp, f"delete {self._path(f'shards/{key}')} (a cache entry "
                                    f"in {self.url}): it is rebuilt on the next run")
            for name in PIECE_FILES[:-1]:
                hashes.check(name)
            try:
                tmp.rename(final)
            except OSError:  # another process of this machine fetched it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def publish_piece(self, local: Path, key: str) -> None:
        """Upload the local piece directory `local` as piece `key`, unless a copy is complete."""
        if self._upload_of(key) is not None:
            return
        upload = self._upload_name()
        for name in PIECE_FILES:
            self._put(local / name, f"shards/{key}/{upload}/{name}")
        if self._upload_of(key) is not None:  # another machine finished first: drop this copy
            self.fs.rm(self._path(f"shards/{key}/{upload}"), recursive=True)
            return
        marker = local.parent / f".{key}.{MARKER}.{os.getpid()}"
        marker.write_text(upload)
        try:
            self.publish(marker, f"shards/{key}/{MARKER}")
        finally:
            marker.unlink()


def cached_file(local_root: Path, rel: str, remote: RemoteCache | None, make: Callable[[Path], None]) -> Path:
    """`local_root/rel`: from the local cache, else downloaded from the remote cache, else written
    by `make(path)` (which may leave it unwritten) and uploaded."""
    path = local_root / rel
    if path.exists() or (remote is not None and remote.fetch_file(rel, path)):
        return path
    make(path)
    if remote is not None and path.exists():
        remote.publish(path, rel)
    return path


def locations(cache_dir: str | None, local_cache: str | None) -> tuple[Path, RemoteCache | None]:
    """(the local cache, the remote cache or None) of data.cache_dir and data.local_cache."""
    where = cache_dir or os.environ.get("CPM_LIGHTNING_CACHE") or str(HOME_CACHE)
    if not is_url(where):
        return Path(where), None
    return (Path(local_cache) if local_cache else HOME_CACHE), RemoteCache(where)
