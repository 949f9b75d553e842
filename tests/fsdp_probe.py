"""Callbacks that `cpm-lightning fit` subprocesses of the FSDP tests load by class path: they
record what a run did and inject the faults (signals, SIGKILL) at exact points."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import lightning.pytorch.strategies.model_parallel as model_parallel
import torch
from torch.distributed.tensor import DTensor

PROBE_INPUT = torch.arange(64).reshape(2, 32) * 7 % 256  # token ids: every vocabulary has the 256 bytes


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


class Record(L.Callback):
    """Rank 0 appends one JSON line per step to `out`/steps.jsonl: the global batch's loss and
    its samples in global order. After the last step it writes each rank's parameter and
    optimizer bytes (bytes.json); the logits of PROBE_INPUT when training starts (logits-start.pt)
    and ends (logits.pt)."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        ids = trainer.strategy.all_gather(batch["input_ids"])
        ids = ids if ids.ndim == 3 else ids[None]  # [world, micro batch, T]
        samples = ids.transpose(0, 1).reshape(-1, ids.shape[-1])  # rank r holds samples r, r+W, ...
        if trainer.is_global_zero:
            with open(os.path.join(self.out, "steps.jsonl"), "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(loss), "samples": samples.tolist()}) + "\n")
        if trainer.global_step == trainer.max_steps:
            self._write_bytes(trainer, pl_module)

    def _write_bytes(self, trainer, pl_module):
        # Measured between steps: FSDP2 keeps the root's parameters gathered from a forward
        # without backward (validation) until the next step.
        params = sum(_local_bytes(p) for p in pl_module.parameters())
        optim = sum(_local_bytes(v) for state in trainer.optimizers[0].state.values()
                    for v in state.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
        full = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        per_rank = trainer.strategy.all_gather(torch.tensor([params, optim]))
        if trainer.is_global_zero:
            with open(os.path.join(self.out, "bytes.json"), "w") as f:
                json.dump({"full_params": full, "per_rank": per_rank.reshape(-1, 2).tolist()}, f)

    def on_train_start(self, trainer, pl_module):
        self._write_logits(trainer, pl_module, "logits-start.pt")

    def on_train_end(self, trainer, pl_module):
        self._write_logits(trainer, pl_module, "logits.pt")

    def _write_logits(self, trainer, pl_module, name: str):
        with torch.no_grad():  # every rank: a sharded forward gathers the weights
            logits = pl_module.model(PROBE_INPUT.to(pl_module.device))
        if trainer.is_global_zero:
            torch.save(logits.cpu(), os.path.join(self.out, name))


class RecordBook(L.Callback):
    """Every rank writes the greedy completions of the prompt book of `registry` when training
    ends (book-rank{R}.json): under FSDP2 every forward pass of complete_book is collective."""

    def __init__(self, out: str, registry: str):
        self.out, self.registry = out, registry

    def on_train_end(self, trainer, pl_module):
        from cpm_lightning.inference.book import load_prompts
        from cpm_lightning.inference.generate import complete_book

        book = complete_book(pl_module.model, trainer.datamodule.text_tokenizer, load_prompts(self.registry),
                             trainer.global_step)
        with open(os.path.join(self.out, f"book-rank{trainer.global_rank}.json"), "w") as f:
            json.dump(book, f)


class SignalAt(L.Callback):
    """Sends `signum` to rank 0's own process after optimizer step `step`, as a scheduler
    preempting a local launch would (the other ranks learn of it through the trainer)."""

    def __init__(self, step: int, signum: str = "SIGTERM"):
        self.step, self.signum = step, signal.Signals[signum]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class KillWhileSaving(L.Callback):
    """SIGKILLs every rank in the middle of writing the checkpoint of step `step`: after the
    sharded tensors are written, before meta.pt and the rename."""

    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step != self.step:
            return
        write_shards = model_parallel._distributed_checkpoint_save

        def write_shards_then_die(*args, **kwargs):
            write_shards(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        model_parallel._distributed_checkpoint_save = write_shards_then_die


class RecordOptimizer(L.Callback):
    """Rank 0 appends, before every optimizer step, what AdamW is about to use: each group's lr,
    betas, eps and weight decay, and the step count of its state (0 when it has none yet), as
    one JSON line to `out`/optim.jsonl."""

    def __init__(self, out: str):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not trainer.is_global_zero:
            return
        groups = [{"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"], "weight_decay": g["weight_decay"],
                   "adam_step": float(optimizer.state[g["params"][0]].get("step", 0))}
                  for g in optimizer.param_groups]
        with open(os.path.join(self.out, "optim.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "groups": groups}) + "\n")
