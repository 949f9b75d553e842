"""Checkpoints (docs/ARCHITECTURE.md, "Checkpoints"): when they are written, their layout on disk, what they
hold, and consolidation of a sharded checkpoint into one safetensors file (directory.py finds them
on disk: which one a run resumes).

<trainer.default_root_dir>/checkpoints holds
  step-00000500.ckpt/           sharded (trainer.strategy: fsdp): torch.distributed.checkpoint
                                shards of model and optimizer, and meta.pt with everything else
                                (schedule, data position, loops, RNG, the `cpm` section: meta.py), and
                                hashes.json: the sha256 of each file's chunks (files.py)
  step-00000500.ckpt            a single file (unsharded strategies), its integrity record in
                                its zip comment (files.py; older ones have
                                step-00000500.ckpt.hashes.json beside them)
  last.ckpt                     a symlink to the checkpoint written last
  .step-00000600.ckpt.partial   being written; renamed into place once every rank has finished,
                                so a checkpoint killed mid-write is never resumed
The directory must be on a POSIX file system that every rank sees (rename is the commit).
"""

from __future__ import annotations

import os
import random
import signal
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from cpm_lightning.checkpoint.config import CheckpointConfig
from cpm_lightning.checkpoint.directory import SIGNALS, complete_checkpoints, latest, point_last, remove, step_of
from cpm_lightning.checkpoint.files import (
    MODEL_KEY,
    MODEL_PREFIX,
    CheckpointReader,
    PlainDataPlanner,
    check_file,
    file_weights,
    gather_hashes,
    rank_failure,
    user_errors,
    write_checkpoint_hashes,
)
from cpm_lightning.checkpoint.meta import CPMMeta, write
from cpm_lightning.checkpoint.modeldir import StoredModel, check_shapes, write_model_dir
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.model import ArchConfig


# -- reading ----------------------------------------------------------------------------------
def is_sharded(path: Path) -> bool:
    return (Path(path) / _METADATA_FILENAME).is_file()


def read_meta(path: Path) -> dict:
    """Everything in a checkpoint but the sharded tensors; its `cpm` section (checked: CPMMeta)
    says what it is."""
    path = Path(path)
    if path.is_dir() and not is_sharded(path):
        raise UserError(f"{path}: not a checkpoint (a directory without {_METADATA_FILENAME}: a write that "
                        "did not finish, or not written by fit)")
    file = path / _METADATA_FILENAME if is_sharded(path) else path
    if file.is_file():
        check_file(path, _METADATA_FILENAME if is_sharded(path) else None)  # before a byte of it is parsed
    if file.is_file() and not zipfile.is_zipfile(file):  # torch's own error here is about mmap
        raise UserError(f"{path}: not a readable checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a cpm-lightning checkpoint (no 'cpm' section)")
    CPMMeta.of(ckpt, str(path))
    return ckpt


def _sharded_model_metadata(reader: CheckpointReader) -> dict[str, TensorStorageMetadata]:
    """DCP's metadata (size, dtype) of each of CPMAnt's weights in a sharded checkpoint, read
    first by both its readers (a resumed fit, open_checkpoint), so its shard files are checked here."""
    prefix = f"{MODEL_KEY}.{MODEL_PREFIX}"
    metadata = reader.read_metadata()
    _check_shard_sizes(Path(reader.path), metadata.storage_data)
    return {k.removeprefix(prefix): m for k, m in metadata.state_dict_metadata.items() if k.startswith(prefix)}


def _check_shard_sizes(path: Path, storage: dict) -> None:
    """A UserError naming a shard file that is missing or shorter than DCP's metadata says (a
    copy that stopped early, of a checkpoint without recorded hashes or before they are checked);
    DCP's own error is an EOFError inside a CheckpointException."""
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            found = "missing" if size is None else f"{size} bytes"
            raise UserError(f"{file}: {found}; the checkpoint's .metadata expects {end} bytes (a truncated or "
                            "incomplete copy)")


def open_checkpoint(path: str | Path) -> tuple[dict, StoredModel]:
    """(read_meta's dict, the model) of a sharded or single-file checkpoint, whatever world size
    saved it; each weight is read when asked for (a single file is memory-mapped)."""
    path = Path(path)
    meta = read_meta(path)
    if is_sharded(path):
        reader = CheckpointReader(path)  # one reader: each chunk's recorded hash is checked once
        metadata = _sharded_model_metadata(reader)
        shapes = {name: list(m.size) for name, m in metadata.items()}
        dtypes = {name: m.properties.dtype for name, m in metadata.items()}

        def read(name: str) -> torch.Tensor:
            t = torch.empty(shapes[name], dtype=dtypes[name])
            # DCP fills the tensor in place and reads only the key asked for.
            with warnings.catch_warnings(), user_errors():
                # "...assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load({MODEL_KEY: {MODEL_PREFIX + name: t}}, storage_reader=reader, planner=PlainDataPlanner(path),
                         no_dist=True)
            return t
    else:
        weights = file_weights(meta)
        shapes, dtypes = {k: list(v.shape) for k, v in weights.items()}, {k: v.dtype for k, v in weights.items()}
        read = weights.__getitem__
    cpm = CPMMeta.of(meta, str(path))
    tokenizer = Tokenizer.from_bytes(cpm.tokenizer, f"{path} (its tokenizer)") if cpm.tokenizer else None
    return meta, StoredModel(arch=cpm.arch, shapes=shapes, dtypes=dtypes, read=read, tokenizer=tokenizer,
                             where=str(path), missing_tokenizer="the checkpoint carries no tokenizer; expected one saved by "
                             "`fit` (checkpoint['cpm']['tokenizer'])", migrations=cpm.migrations)


@dataclass(frozen=True, kw_only=True)
class SavedCheckpoint:
    """What a checkpoint says about itself and its weights' shapes, read once (read_checkpoint):
    what `fit` resumes from, `proposals trial --from` and `proposals check --against` start from."""

    path: Path
    step: int
    """Optimizer steps trained."""
    meta: CPMMeta
    """Its `cpm` section."""
    shapes: dict[str, list[int]]
    """Each of CPMAnt's weights' shape, by name."""


def read_checkpoint(path: str | Path) -> SavedCheckpoint:
    """The step, `cpm` section and weight shapes of a sharded or single-file checkpoint; opens
    its metadata once (a single file is memory-mapped: no tensor is read)."""
    path = Path(path)
    ckpt = read_meta(path)
    if is_sharded(path):
        shapes = {name: list(m.size) for name, m in _sharded_model_metadata(CheckpointReader(path)).items()}
    else:
        shapes = {name: list(t.shape) for name, t in file_weights(ckpt).items()}
    return SavedCheckpoint(path=path, step=ckpt.get("global_step", 0), meta=CPMMeta.of(ckpt, str(path)), shapes=shapes)


@dataclass(kw_only=True)
class TrainedModel:
    """What inference, consolidation and a release take from a checkpoint."""

    path: Path
    """The checkpoint."""
    model: StoredModel
    """Architecture, weights (read when asked for) and tokenizer."""
    step: int
    """Optimizer steps trained."""
    tokens_seen: int
    """Training tokens seen, all ranks together."""
    run_id: str | None
    """The MLflow run that trained it, when the checkpoint recorded one."""
    proposals: str | None = None
    """The ids of the proposals in effect when it was saved, comma-separated (None: not
    recorded, a run without a registry or a checkpoint older than the record)."""

    @property
    def arch(self) -> dict:
        return self.model.arch


def trained_model(path: str | Path) -> TrainedModel:
    """The model in a checkpoint written by `fit`, sharded or a single file."""
    meta, model = open_checkpoint(path)
    cpm = CPMMeta.of(meta, str(path))
    return TrainedModel(path=Path(path), model=model, step=meta.get("global_step", 0),
                        tokens_seen=cpm.tokens_seen, run_id=cpm.mlflow_run_id, proposals=cpm.proposals)


def check_architecture(saved: SavedCheckpoint, arch: ArchConfig) -> None:
    """A UserError naming the first parameter whose shape in the checkpoint differs from the
    model `arch` builds (DCP's own error is a multi-rank traceback)."""
    check_shapes(saved.shapes, arch, f"checkpoint {saved.path}", "this run's model.arch")


def consolidate(path: Path, out_dir: Path) -> list[Path]:
    """Write the weights of checkpoint `path` (sharded or not) as a model directory: one
    safetensors file, config.json and the tokenizer, if it carries one."""
    trained = trained_model(path)
    return write_model_dir(Path(out_dir), trained.model, trained.arch, trained.model.tokenizer)


# -- writing ----------------------------------------------------------------------------------
class Checkpoints(Checkpoint):
    """Writes checkpoints atomically every `every_n_steps` optimizer steps, at the end of
    training, and after a preemption signal or a `request_stop` (then stops training); keeps the
    newest `keep_last`, and those at `keep_steps`. Also saves and restores each rank's RNG states."""

    def __init__(self, dirpath: Path, config: CheckpointConfig, keep_steps: Iterable[int] = (),
                 on_saved: Callable[[Path], None] | None = None):
        self.dirpath, self.config = Path(dirpath), config
        self.keep_steps = set(keep_steps)
        """Steps whose checkpoints outlive keep_last (live: where a rollback may return to)."""
        self.on_saved = on_saved
        """Called on rank 0 with each checkpoint once it is in place, before older ones are
        pruned (live: pins those a nightly release will read)."""
        self._signal: int | None = None
        self._stop_reason: str | None = None
        self._discard = False
        self._previous_handlers: dict = {}
        self._seen_step = self._saved_step = -1

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        try:  # every rank: on a cluster, each node may see the directory differently
            self.dirpath.mkdir(parents=True, exist_ok=True)
            probe = self.dirpath / f".write-probe-{trainer.global_rank}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"checkpoint directory {self.dirpath} is not writable: {e.strerror or e}") from None
        if trainer.is_global_zero:
            for stale in self.dirpath.glob(".*.partial"):  # left by a run killed while saving
                remove(stale)

    def on_train_start(self, trainer, pl_module):
        self._seen_step = self._saved_step = trainer.global_step
        self._signal, self._stop_reason, self._discard = None, None, False
        # Installed after Lightning's own SIGTERM handler (which would stop without a checkpoint).
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self._signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without a checkpoint
        self._signal = signum

    def request_stop(self, reason: str) -> None:
        """Save at the end of this step and stop, as after a signal; `reason` starts the message.
        One rank asking is enough: the ranks agree at the step boundary."""
        self._stop_reason = reason

    def discard(self) -> None:
        """Stop at the end of this step without saving: the model is not to be kept (live: a
        divergence). Every rank must call it at the same step."""
        self._discard = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._seen_step:  # inside gradient accumulation
            return
        self._seen_step = step
        if self._discard:
            trainer.should_stop = True
            return
        # One rank signalled is enough (a local launch signals only rank 0's process).
        asked = self._signal is not None or self._stop_reason is not None
        stop = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if stop or step % self.config.every_n_steps == 0 or step == trainer.max_steps:
            # Saved at this step already by a `live` boundary (live/segment.py), before its change.
            path = self.save(trainer) if step != self._saved_step else self.dirpath / f"step-{step:08d}.ckpt"
            if stop:
                if self._stop_reason is not None:
                    rank_zero_info(f"{self._stop_reason}: saved {path} at step {step} and stopped")
                else:
                    name = signal.Signals(self._signal).name if self._signal else "a signal on another rank"
                    rank_zero_info(f"{name}: saved {path} at step {step} and stopped; resume with "
                                   "`fit --ckpt_path last` or checkpoint.resume: auto")
                trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        # Stopped by max_time, early stopping, ...: save, unless the model is to be discarded.
        if trainer.global_step != self._saved_step and not self._discard:
            self.save(trainer)

    def teardown(self, trainer, pl_module, stage):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def save(self, trainer) -> Path:
        """Write the checkpoint of the current step under a temporary name, then rename it."""
        final = self.dirpath / f"step-{trainer.global_step:08d}.ckpt"
        partial = self.dirpath / f".{final.name}.partial"
        if trainer.is_global_zero:
            remove(partial)
        trainer.strategy.barrier("cpm-checkpoint-start")
        try:
            trainer.save_checkpoint(partial)  # returns on every rank after all have written
            hashes = gather_hashes(trainer, partial)  # each rank hashes what it wrote; rank 0 gets all
            if trainer.is_global_zero:
                write_checkpoint_hashes(partial, hashes)
        except (OSError, CheckpointException) as e:  # a full disk, a quota: the half-written checkpoint goes
            if (disk := write_error(e)) is None:
                raise
            if trainer.is_global_zero:
                remove(partial)
            last = latest(self.dirpath)
            raise UserError(f"checkpoint {final} could not be written ({disk.strerror or disk}); nothing of it is "
                            f"kept, and the run can resume from {last or 'its start'} once there is room") from None
        if trainer.is_global_zero:
            remove(final)  # the same step saved again after resuming from an earlier checkpoint
            os.replace(partial, final)
            point_last(self.dirpath, final)
            if self.on_saved is not None:
                self.on_saved(final)
            for old in complete_checkpoints(self.dirpath)[:-self.config.keep_last]:
                if old != final and step_of(old) not in self.keep_steps:
                    remove(old)
        trainer.strategy.barrier("cpm-checkpoint-end")
        self._saved_step = trainer.global_step
        return final

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        states = [_rng_state()]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, _rng_state())
        write(checkpoint, rng=states)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        states = CPMMeta.of(checkpoint, str(trainer.ckpt_path)).rng
        # On a larger world size the new ranks keep their seeded state.
        if trainer.global_rank < len(states):
            _set_rng_state(states[trainer.global_rank])


def write_error(e: BaseException) -> OSError | None:
    """The OSError a save failed with: itself, or, from a sharded save, the first rank's inside
    DCP's CheckpointException (every rank gets it, so all of them stop with the same line)."""
    if isinstance(e, OSError):
        return e
    return rank_failure(e, OSError) if isinstance(e, CheckpointException) else None


def _rng_state() -> dict:
    """This process's RNG states in types that torch.load(weights_only=True) reads back (Lightning
    resumes that way), hence numpy's key array as a list."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, keys.tolist(), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
