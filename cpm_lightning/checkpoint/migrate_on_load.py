"""A checkpoint migrated as it is loaded into a run of another architecture (docs/ARCHITECTURE.md,
"Migrations"); the migrations themselves are model/migrate.py.

`fit` plans the migration from the checkpoint's model.arch to the run's before the checkpoint is
loaded (cli/fit.py, migration_plan), and the tensors are migrated as they are read: a single file by
CausalLM.on_load_checkpoint, in the dict Lightning loaded, and, under FSDP2, by
FSDP2Strategy.load_checkpoint, every rank reading the full tensors of either format and keeping
its shards of the migrated ones. Either way the first checkpoint written after it is of the new
architecture, and a resume from it is an ordinary resume.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from cpm_lightning.checkpoint.files import (
    MODEL_KEY,
    MODEL_PREFIX,
    CheckpointReader,
    PlainDataPlanner,
    file_weights,
    user_errors,
)
from cpm_lightning.checkpoint.meta import CPMMeta
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.model.migrate import Step, TrainState, migrate, plan

OPTIM_KEY = "optimizer_0"  # the sharded checkpoint's AdamW state: optimizer_0.state.model.<name>.<moment>


def resolved(arch: dict) -> dict:
    """A saved model.arch with the preset's values filled in."""
    return ArchConfig(**arch).resolved().to_dict()


def plan_from(saved_arch: dict, arch: ArchConfig) -> list[Step]:
    """The migrations from a checkpoint's model.arch to a run's (none when they agree)."""
    return plan(resolved(saved_arch), arch.resolved().to_dict())


def optimizer_order(arch: dict) -> list[list[str]]:
    """CPMAnt's parameter names in CausalLM's two AdamW groups, matrices then vectors: the
    order by which a single-file checkpoint numbers AdamW's state."""
    with torch.device("meta"):
        named = list(CPMAnt(ArchConfig(**arch)).named_parameters())
    return [[n for n, p in named if p.ndim >= 2], [n for n, p in named if p.ndim < 2]]


def file_state(checkpoint: dict, where: str) -> TrainState:
    """The weights and AdamW state of single-file checkpoint `where` as Lightning loads it."""
    arch = resolved(CPMMeta.of(checkpoint, where).arch)
    weights = file_weights(checkpoint)
    optim = (checkpoint.get("optimizer_states") or [None])[0]
    names = [n for group in optimizer_order(arch) for n in group]
    moments = {names[i]: m for i, m in optim["state"].items()} if optim else {}
    return TrainState(arch=arch, weights=weights, moments=moments, step=checkpoint.get("global_step", 0))


def migrate_file_checkpoint(checkpoint: dict, where: str, steps: list[Step]) -> None:
    """Migrate single-file checkpoint `where` as Lightning loaded it, in place, before its weights
    and AdamW state are loaded into the run's model."""
    state = file_state(checkpoint, where)
    migrate(state, steps)
    others = {k: v for k, v in checkpoint[MODEL_KEY].items() if not k.startswith(MODEL_PREFIX)}
    checkpoint[MODEL_KEY] = {**others, **{MODEL_PREFIX + n: w for n, w in state.weights.items()}}
    optim = (checkpoint.get("optimizer_states") or [None])[0]
    if optim:
        groups = optimizer_order(state.arch)
        index = {n: i for i, n in enumerate(n for group in groups for n in group)}
        optim["state"] = {index[n]: m for n, m in state.moments.items()}
        start = 0
        for group, names in zip(optim["param_groups"], groups, strict=True):
            group["params"] = list(range(start, start + len(names)))
            start += len(names)


def sharded_state(path: Path, meta: dict) -> TrainState:
    """The full weights and AdamW state of a sharded checkpoint, whatever world size wrote it."""
    reader = CheckpointReader(path)
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in reader.read_metadata().state_dict_metadata.items()
               if isinstance(m, TensorStorageMetadata) and k.startswith((f"{MODEL_KEY}.{MODEL_PREFIX}", f"{OPTIM_KEY}.state."))}
    nested: dict = {}
    for key, t in tensors.items():
        if key.startswith(MODEL_KEY):
            nested.setdefault(MODEL_KEY, {})[key.removeprefix(f"{MODEL_KEY}.")] = t
        else:  # DCP flattens {optimizer_0: {state: {fqn: {moment: t}}}} by joining the keys with "."
            fqn, moment = key.removeprefix(f"{OPTIM_KEY}.state.").rsplit(".", 1)
            nested.setdefault(OPTIM_KEY, {}).setdefault("state", {}).setdefault(fqn, {})[moment] = t
    with warnings.catch_warnings(), user_errors():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(nested, storage_reader=reader, planner=PlainDataPlanner(path), no_dist=True)
    weights = {k.removeprefix(MODEL_PREFIX): v for k, v in nested[MODEL_KEY].items()}
    moments = {k.removeprefix(MODEL_PREFIX): v for k, v in nested.get(OPTIM_KEY, {}).get("state", {}).items()}
    return TrainState(arch=resolved(CPMMeta.of(meta, str(path)).arch), weights=weights, moments=moments,
                      step=meta.get("global_step", 0))
