"""FSDP2 sharding of CPMAnt through Lightning's ModelParallelStrategy (docs/ARCHITECTURE.md, "Distributed training").

`trainer.strategy: fsdp` in a run config means `FSDP2Strategy` below (cli/fit.py maps it). Lightning's
own `FSDPStrategy` is FSDP1 and refuses CPU; ModelParallelStrategy runs `fully_shard` on CPU with
gloo and on CUDA with NCCL, so the tests exercise the code path the GPUs run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from cpm_lightning.checkpoint.files import (
    MODEL_KEY,
    MODEL_PREFIX,
    CheckpointReader,
    PlainDataPlanner,
    check_file,
    user_errors,
)
from cpm_lightning.checkpoint.migrate_on_load import file_state, sharded_state
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.model.migrate import Step, migrate
from cpm_lightning.train.config import ParallelConfig


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy as pure sharded data parallelism: every process of every node is in
    the one `data_parallel` mesh dimension, none in tensor parallelism."""

    def __init__(self, **kwargs):
        super().__init__(tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        # "auto" would make the data-parallel size the number of nodes (one TP group per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Lightning's sharded resume (model, each optimizer, then meta.pt), through a reader
        that checks the recorded hashes of what it reads and refuses pickled code
        (checkpoint/files.py); Lightning's own reads with DCP's default reader."""
        path = Path(self.broadcast(checkpoint_path))
        if self.lightning_module.migrate_on_load:
            return self._load_migrated(path, self.lightning_module.migrate_on_load)
        if not (path / _METADATA_FILENAME).is_file():  # a single file: torch.load(weights_only=True)
            return super().load_checkpoint(path, weights_only)
        reader = CheckpointReader(path)  # one reader: each chunk is checked once
        model_state = {"state_dict": get_model_state_dict(self.model)}
        with user_errors():
            dcp.load(model_state, storage_reader=reader, planner=PlainDataPlanner(path))
        self.model.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            optim_state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            with user_errors():
                dcp.load(optim_state, storage_reader=reader, planner=PlainDataPlanner(path))
            set_optimizer_state_dict(self.model, optimizer, optim_state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        check_file(path, _METADATA_FILENAME)
        return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)

    def _load_migrated(self, path: Path, steps: list[Step]) -> dict:
        """A checkpoint of another architecture (checkpoint/migrate_on_load.py): every rank reads its full tensors,
        migrates them and keeps its shards of the result. Holds the whole model and its AdamW
        state in each rank's CPU memory for the while."""
        sharded = (path / _METADATA_FILENAME).is_file()
        check_file(path, _METADATA_FILENAME if sharded else None)
        meta = torch.load(path / _METADATA_FILENAME if sharded else path, map_location="cpu", weights_only=True)
        state = sharded_state(path, meta) if sharded else file_state(meta, str(path))
        migrate(state, steps)
        load_full_weights(self.lightning_module.model, state.weights.__getitem__)
        for optimizer in self.optimizers:
            groups = get_optimizer_state_dict(self.model, optimizer)["param_groups"]  # the run's settings
            full = {"state": {MODEL_PREFIX + n: m for n, m in state.moments.items()}, "param_groups": groups}
            set_optimizer_state_dict(self.model, optimizer, full, options=StateDictOptions(full_state_dict=True))
        meta.pop(MODEL_KEY, None)
        meta.pop("optimizer_states", None)
        return meta


def apply_parallel(model: CPMAnt, parallel: ParallelConfig) -> None:
    """The attention kernel, and activation checkpointing and compilation block by block, in place."""
    model.attention_kernel, model.attention_chunk = parallel.attention, parallel.attention_chunk
    for block in model.blocks:
        if parallel.activation_checkpointing:
            # Wrapping the bound forward (not the module, as checkpoint_wrapper does) keeps the
            # parameter names, so checkpoints do not depend on the switch.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if parallel.compile:
            block.compile()


def build_sharded(arch: ArchConfig, mesh: DeviceMesh, device: torch.device, parallel: ParallelConfig,
                  weights: Callable[[str], torch.Tensor] | None = None) -> CPMAnt:
    """A CPMAnt whose parameters are DTensors sharded over `mesh`, initialized exactly as an
    unsharded model would be, or loaded from `weights` (name -> full tensor, read one at a
    time). Built on the meta device: no rank ever holds the whole model."""
    with torch.device("meta"):
        model = CPMAnt(arch)
    apply_parallel(model, parallel)
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # fp32 throughout
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    if weights is not None:
        load_full_weights(model, weights)
        return model
    with _FullTensorInit():
        model.init_weights()
    return model


@torch.no_grad()
def load_full_weights(model: CPMAnt, weights: Callable[[str], torch.Tensor]) -> None:
    """Copy each full tensor `weights(name)` into the parameter of that name, sharded (this rank
    keeps its shard) or not."""
    for name, param in model.named_parameters():
        full = weights(name).to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
        else:
            param.copy_(full)


class _FullTensorInit(TorchDispatchMode):
    """Runs in-place initializers (normal_, fill_, ...) of a sharded tensor on the full tensor
    and keeps this rank's shard. Every rank draws the same full tensors from the same seed in
    the same order as an unsharded model, so the weights do not depend on the world size (on
    CPU, DTensor's own random ops draw each shard independently)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        is_init = func._schema.name.endswith("_") and not any(isinstance(a, torch.Tensor) for a in args[1:])
        if not (isinstance(target, DTensor) and is_init):
            return func(*args, **kwargs)
        full = torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
        func(full, *args[1:], **kwargs)
        shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
        return target
