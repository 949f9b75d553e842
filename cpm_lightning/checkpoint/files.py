"""Opening a checkpoint without trusting its bytes: the hashes recorded when it was written are
checked before they are used, and its pickled parts may hold only data.

- Hashes (file_hashes.py): `hashes.json` inside a sharded checkpoint, `step-N.ckpt.hashes.json`
  beside a single file. Each rank hashes the files it wrote, so the cost is spread like the
  write; rank 0 writes hashes.json before the commit rename.
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
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from cpm_lightning.checkpoint.directory import hashes_path
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import HASHES_FILE, RecordedHashes, hash_file, write_hashes

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


_unverified_warned: set[Path] = set()


def recorded_hashes(ckpt: Path) -> RecordedHashes | None:
    """The recorded hashes of checkpoint `ckpt` (a directory, a file or a link to either); None,
    with a warning, for a checkpoint written before hashes were recorded."""
    ckpt = Path(ckpt).resolve()
    found = RecordedHashes.find(hashes_path(ckpt), ckpt if ckpt.is_dir() else ckpt.parent, REMEDY)
    if found is None and ckpt not in _unverified_warned:
        _unverified_warned.add(ckpt)
        print(f"warning: {ckpt} has no {hashes_path(ckpt).name} (written before checkpoints recorded hashes): "
              "its bytes are not verified", file=sys.stderr)
    return found


def check_file(ckpt: Path, name: str | None = None) -> None:
    """Check file `name` of a sharded checkpoint, or a single-file checkpoint (name None), whole."""
    hashes = recorded_hashes(ckpt)
    if hashes is not None:
        hashes.check(name or Path(ckpt).resolve().name)


def gather_hashes(trainer, partial: Path) -> dict[str, dict] | None:
    """On rank 0, the hashes of every file of the checkpoint just written at `partial`; None on
    the other ranks. Each rank hashes the DCP files it wrote (still in its page cache), rank 0
    also the rest (.metadata, meta.pt, or the single file)."""
    if partial.is_dir():
        mine = [p for p in partial.iterdir() if _writer(p.name) == trainer.global_rank]
    else:
        mine = [partial] if trainer.is_global_zero else []
    hashes = {p.name: hash_file(p) for p in mine}
    if not (dist.is_available() and dist.is_initialized()):
        return hashes
    gathered = [None] * dist.get_world_size() if trainer.is_global_zero else None
    dist.gather_object(hashes, gathered, dst=0)
    return {name: h for rank_hashes in gathered for name, h in rank_hashes.items()} if trainer.is_global_zero else None


def _writer(name: str) -> int:
    match = DCP_FILE.fullmatch(name)
    return int(match[1]) if match else 0


def write_checkpoint_hashes(partial: Path, final: Path, hashes: dict[str, dict]) -> None:
    """Record `hashes` (gather_hashes) for the checkpoint at `partial` that becomes `final`."""
    if partial.is_dir():
        write_hashes(partial / HASHES_FILE, hashes)
    else:  # beside the file, under the name it is about to get
        write_hashes(hashes_path(final), {final.name: hashes[partial.name]})


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


@contextlib.contextmanager
def user_errors():
    """DCP wraps each rank's exception in a CheckpointException that prints every rank's
    traceback: let a UserError inside it through as itself."""
    try:
        yield
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, UserError):
                raise exc from None
        raise


def file_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """CPMAnt's weights, by its own names, in a single-file checkpoint as torch.load reads it."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in checkpoint[MODEL_KEY].items() if k.startswith(MODEL_PREFIX)}
