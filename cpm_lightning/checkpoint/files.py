"""Opening a checkpoint without trusting its bytes: the hashes recorded when it was written are
checked before they are used, and its pickled parts may hold only data.

- Hashes (file_hashes.py): `hashes.json` inside a sharded checkpoint (it names the files
  relative to the directory), a record inside a single file (its zip comment, `seal_zip`): a
  copy or rename of either verifies. Each rank hashes the files it wrote, so the cost is spread
  like the write; rank 0 writes the record before the commit rename. Single files written before
  the record have `step-N.ckpt.hashes.json` beside them, still read (whatever name it lists). A
  checkpoint with no record at all is read only under --trust-unverified.
- DCP's `.metadata` is a pickle that FileSystemReader loads with plain `pickle.load`: a crafted
  one runs code wherever the checkpoint is opened. CheckpointReader unpickles it allowing only
  the globals real DCP metadata holds. A checkpoint's non-tensor values (the optimizer's
  hyperparameters) are pickles too, which DCP's planner loads with `weights_only=False`;
  PlainDataPlanner refuses any that `weights_only=True` would not load.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from cpm_lightning.checkpoint.directory import hashes_path
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import (
    DIGEST_LEN,
    HASHES_FILE,
    RecordedHashes,
    check_links_inside,
    check_sealed,
    hash_file,
    record_text,
    seal,
    unverified,
    write_hashes,
)

REMEDY = "restore it from a copy, or resume from an earlier checkpoint"
MODEL_KEY = "state_dict"  # where Lightning puts the LightningModule's weights
MODEL_PREFIX = "model."  # CausalLM's CPMAnt: its weights' names under MODEL_KEY start with it
DCP_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # DCP names each rank's data files __RANK_N.distcp

# The globals in DCP metadata, found by listing those of real checkpoints (pickletools.genops),
# plus every torch dtype (a tensor's dtype is pickled as the global torch.<name>).
_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS = {
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
}


ZIP_START, ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # a zip's first local header; its end of central directory
ZIP_END_LEN, MAX_COMMENT = 22, 0xFFFF


def recorded_hashes(ckpt: Path) -> RecordedHashes | None:
    """The hashes.json of sharded checkpoint `ckpt` (a directory or a link to one); None for one
    without, when --trust-unverified allows it. A link inside it to a file outside is refused."""
    ckpt = Path(ckpt).resolve()
    check_links_inside(ckpt, "the checkpoint")
    found = RecordedHashes.find(ckpt / HASHES_FILE, ckpt, REMEDY)
    if found is None and (ckpt / ".metadata").is_file():  # without it, not a checkpoint (the reader says so)
        unverified(ckpt, f"the sharded checkpoint (no {HASHES_FILE})")
    return found


def check_file(ckpt: Path, name: str | None = None) -> None:
    """Check file `name` of a sharded checkpoint, or a single-file checkpoint (name None), whole:
    against the record inside it, or the sidecar an older one has beside it."""
    if name is not None:
        hashes = recorded_hashes(ckpt)
        if hashes is not None:
            hashes.check(name)
        return
    ckpt = Path(ckpt).resolve()
    record = _zip_comment(ckpt)
    if record is not None:
        check_sealed(ckpt, *record, REMEDY)
    elif hashes_path(ckpt).is_file():
        RecordedHashes.beside(hashes_path(ckpt), ckpt, REMEDY).check(ckpt.name)
    elif zipfile.is_zipfile(ckpt):  # anything else is not a checkpoint at all (read_meta says so)
        unverified(ckpt, "the checkpoint")


def _zip_comment(path: Path) -> tuple[str, int] | None:
    """(the zip comment, its offset) of a file torch.save wrote; None for a file without one
    (another format, or written before checkpoints carried a record). A zip without its end is
    a truncated copy."""
    size = path.stat().st_size
    start = max(0, size - ZIP_END_LEN - MAX_COMMENT)
    with path.open("rb") as f:
        head = f.read(len(ZIP_START))
        f.seek(start)
        tail = f.read()
    at = len(tail)
    while (at := tail.rfind(ZIP_END, 0, at)) >= 0:
        length = struct.unpack("<H", tail[at + 20:at + ZIP_END_LEN])[0] if at + ZIP_END_LEN <= len(tail) else -1
        if at + ZIP_END_LEN + length == len(tail):
            comment = tail[at + ZIP_END_LEN:]
            return (comment.decode("ascii", "replace"), start + at + ZIP_END_LEN) if comment else None
    if head == ZIP_START:
        raise UserError(f"{path} is damaged: its zip archive has no end (a truncated copy); {REMEDY}")
    return None


def seal_zip(path: Path) -> None:
    """Record the integrity of the file torch.save wrote at `path` in its zip comment (which
    torch leaves empty and its reader skips)."""
    size = path.stat().st_size
    text = record_text(size + len(record_text(0))).encode()
    with path.open("r+b") as f:
        f.seek(size - ZIP_END_LEN)
        end = f.read(ZIP_END_LEN)
        if end[:4] != ZIP_END or end[20:] != b"\0\0":
            raise ValueError(f"{path}: not a zip archive without a comment, as torch.save writes")
        f.seek(size - 2)
        f.write(struct.pack("<H", len(text)) + text)
    seal(path, size + len(text) - DIGEST_LEN)


def gather_hashes(trainer, partial: Path) -> dict[str, dict] | None:
    """On rank 0, the hashes of every file of the sharded checkpoint just written at `partial`;
    None on the other ranks and for a single file (seal_zip hashes it). Each rank hashes the DCP
    files it wrote (still in its page cache), rank 0 also the rest (.metadata, meta.pt)."""
    if not partial.is_dir():
        return None
    hashes = {p.name: hash_file(p) for p in partial.iterdir() if _writer(p.name) == trainer.global_rank}
    if not (dist.is_available() and dist.is_initialized()):
        return hashes
    gathered = [None] * dist.get_world_size() if trainer.is_global_zero else None
    dist.gather_object(hashes, gathered, dst=0)
    return {name: h for rank_hashes in gathered for name, h in rank_hashes.items()} if trainer.is_global_zero else None


def _writer(name: str) -> int:
    match = DCP_FILE.fullmatch(name)
    return int(match[1]) if match else 0


def write_checkpoint_hashes(partial: Path, hashes: dict[str, dict] | None) -> None:
    """Record `hashes` (gather_hashes) in the sharded checkpoint at `partial`, or seal the
    single file at `partial` (which hashes it again: it is one file, read from the page cache)."""
    if partial.is_dir():
        write_hashes(partial / HASHES_FILE, hashes)
    else:
        seal_zip(partial)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        raise UserError(f"{self.path}: refused to unpickle {module}.{name}: DCP metadata holds only DCP's own classes, "
                        "sizes and dtypes (a crafted file runs code this way); not opening this checkpoint")


class CheckpointReader(FileSystemReader):
    """DCP's FileSystemReader for a checkpoint that may be damaged or crafted: checks the
    recorded hashes of the bytes it reads, each chunk once, and unpickles .metadata allowing
    only DCP's own classes. Reuse one reader for several loads of a checkpoint."""

    def __init__(self, path: Path):
        super().__init__(Path(path).resolve())  # errors name the real files, not a link to them
        self.hashes = recorded_hashes(self.path)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        if self.hashes is not None:
            self.hashes.check(path.name)
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except FileNotFoundError:
            raise UserError(f"{path.parent}: not a sharded checkpoint (no {path.name})") from None
        except UserError:
            raise
        except Exception as e:  # a damaged file without recorded hashes: pickle fails in many ways
            raise UserError(f"{path}: not readable DCP metadata ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
        if metadata.storage_meta is None:  # as FileSystemReader.read_metadata
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if Path(info.relative_path).name != info.relative_path:
                raise UserError(f"{self.path}: its metadata names a file outside the checkpoint: {info.relative_path!r}")
            if self.hashes is not None:
                self.hashes.check(info.relative_path, info.offset, info.offset + info.length)
        return super().read_data(plan, planner)


class PlainDataPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but a non-tensor value must be plain data (numbers, strings, tuples:
    what torch.load(weights_only=True) reads); DCP's own loads it with weights_only=False."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path).resolve()

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f"it unpickles {found[1]}" if found else f"{type(e).__name__}"
            file = self.metadata.storage_data[read_item.storage_index].relative_path
            raise UserError(f"{self.path / file}: refused to load {read_item.dest_index.fqn}: {what}, not plain data "
                            "(a crafted file runs code this way); not opening this checkpoint") from None
        value.seek(0)
        super().load_bytes(read_item, value)  # known to be plain data now


def rank_failure(e: CheckpointException, kind: type[BaseException]) -> BaseException | None:
    """The first rank's exception of type `kind` inside DCP's CheckpointException (which holds
    every failed rank's, with its traceback), or None."""
    return next((exc for exc, _ in e.failures.values() if isinstance(exc, kind)), None)


@contextlib.contextmanager
def user_errors():
    """DCP wraps each rank's exception in a CheckpointException that prints every rank's
    traceback: let a UserError inside it through as itself."""
    try:
        yield
    except CheckpointException as e:
        if (exc := rank_failure(e, UserError)) is not None:
            raise exc from None
        raise


def file_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """CPMAnt's weights, by its own names, in a single-file checkpoint as torch.load reads it."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in checkpoint[MODEL_KEY].items() if k.startswith(MODEL_PREFIX)}
