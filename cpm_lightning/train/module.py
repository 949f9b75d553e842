"""CausalLM: the LightningModule that trains a CPM-Ant model (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import dataclasses
import time

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from cpm_lightning.checkpoint import meta
from cpm_lightning.checkpoint.files import MODEL_KEY
from cpm_lightning.checkpoint.migrate_on_load import migrate_file_checkpoint
from cpm_lightning.checkpoint.modeldir import open_model_dir
from cpm_lightning.core.loss import IGNORE, cross_entropy
from cpm_lightning.core.perf import peak_flops, training_dtype
from cpm_lightning.model import CPMAnt
from cpm_lightning.model.migrate import Step
from cpm_lightning.model.stats import model_stats
from cpm_lightning.train.adapters import AdapterConfig, attach
from cpm_lightning.train.config import ModelConfig
from cpm_lightning.train.sharding import apply_parallel, build_sharded, load_full_weights


class CausalLM(ModelConfig, L.LightningModule):
    """Next-token prediction with a CPM-Ant transformer.

    Its fields are the run config's `model` group (ModelConfig).

    Batches are dicts with `input_ids` and `targets` [B, T] (targets IGNORE where no loss is
    taken: only the outputs of task samples, datamodules/tasks.py) and optionally `segment_ids`,
    `context`, `task` and, in windows of packed task samples, `sample_ids` (see CPMAnt.forward)."""

    def __post_init__(self):
        L.LightningModule.__init__(self)
        super().__post_init__()
        self.save_hyperparameters({"arch": self.arch.to_dict(), **{
            name: dataclasses.asdict(getattr(self, name)) for name in ("optim", "schedule", "loss", "parallel")}})
        self.model: CPMAnt | None = None
        self.init_from: str | None = None  # a model directory whose weights replace the init (checkpoint.init_from)
        self.adapter: AdapterConfig | None = None
        """Set by `tune`: the model is frozen and only this adapter trains (train/adapters.py)."""
        self.tokens_seen = 0
        self.skipped_steps = 0
        """Optimizer steps skipped for a non-finite loss or gradient, over the whole run."""
        self.migrate_on_load: list[Step] = []
        """Set by fit when its checkpoint holds another model.arch: the migrations that take the
        checkpoint's weights and AdamW state to this model as they are loaded (checkpoint/migrate_on_load.py)."""
        self.migrations: list[dict] = []
        """Every migration this run's model went through, with the step it was applied at."""
        self._step_time: float | None = None
        self._last_batch_end: float | None = None

    # -- building -----------------------------------------------------------------------------
    def configure_model(self):
        if self.model is not None:
            return
        if self.arch.vocab_size is None:
            raise ValueError("model.arch.vocab_size is unset: the CLI sets it from the tokenizer")
        weights = open_model_dir(self.init_from).read if self.init_from else None
        if self.device_mesh is not None:  # ModelParallelStrategy (trainer.strategy: fsdp)
            self.model = build_sharded(self.arch, self.device_mesh["data_parallel"],
                                       self.trainer.strategy.root_device, self.parallel, weights)
        else:
            self.model = CPMAnt(self.arch)
            if weights is None:
                self.model.init_weights()
            else:
                load_full_weights(self.model, weights)
            if self.adapter is not None:
                attach(self.model, self.adapter)
            apply_parallel(self.model, self.parallel)
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=IGNORE)
        self.val_acc = MulticlassAccuracy(self.arch.vocab_size, ignore_index=IGNORE, average="micro")

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], batch.get("segment_ids"), batch.get("context"), batch.get("task"),
                          sample_ids=batch.get("sample_ids"))

    # -- training -----------------------------------------------------------------------------
    def _loss(self, logits, targets, z_loss: float | None = None):
        """Mean next-token cross entropy on target tokens, plus the z-loss (training only:
        evaluation passes z_loss=0 so that val/loss is the log of val/ppl)."""
        z_loss = self.loss.z_loss if z_loss is None else z_loss
        return cross_entropy(logits.flatten(0, 1), targets.flatten(), z_loss)

    def training_step(self, batch, batch_idx):
        loss = self._loss(self(batch), batch["targets"])
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        # The mean over all ranks: the loss of the global batch, whatever the world size.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def on_before_optimizer_step(self, optimizer):
        max_norm = self.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor reduced over the mesh
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm)
        if not torch.isfinite(norm):
            # A non-finite loss or gradient: skip this update. AdamW leaves a parameter without a
            # gradient alone (its moments and step count too), and the norm, reduced after
            # clipping, is the same on every rank, so all skip together.
            for p in self.parameters():
                p.grad = None
            self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last_batch_end is not None:
            dt = now - self._last_batch_end
            # An exponential average: single steps are noisy on shared machines.
            self._step_time = dt if self._step_time is None else 0.9 * self._step_time + 0.1 * dt
            tokens_per_sec = batch["input_ids"].numel() * self.trainer.world_size / self._step_time
            self.log("train/tokens_per_sec", tokens_per_sec)
            if self._peak:
                self.log("train/mfu", tokens_per_sec * self._flops_per_token(batch) / (self._peak * self.trainer.world_size))
        self._last_batch_end = now
        self.log("train/tokens_seen", float(self.tokens_seen))

    def on_train_start(self):
        self._peak = peak_flops(self.device, training_dtype(self.trainer.precision))  # MFU against its dtype's peak
        self._last_batch_end = None
        self._train_with_this_config()

    def _train_with_this_config(self):
        """A resumed run restores AdamW's state and the schedule's position from its checkpoint,
        and with them the settings they were saved with. This run's resolved config replaces
        those settings (moments and step counts stay), so a command-line override, or a training
        proposal that takes effect at the resume, is what trains."""
        optimizer, scheduler = self.optimizers(use_pl_optimizer=False), self.lr_schedulers()
        for group, settings in zip(optimizer.param_groups, self._group_settings(), strict=True):
            group.update(settings)
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        scheduler.lr_lambdas = [self._lr_factor() for _ in optimizer.param_groups]  # this schedule's
        for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["lr"] = group["initial_lr"] * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reads

    def use_training_config(self, optim, schedule, loss) -> None:
        """Train on from this step with these `model` groups (a `live` boundary applied inside
        the running segment, live/segment.py): as a run resumed here with them would."""
        self.optim, self.schedule, self.loss = optim, schedule, loss
        self._train_with_this_config()

    def _lr_factor(self):
        total = self.schedule.total_steps or self.trainer.max_steps
        schedule = self.schedule
        return lambda step: schedule.factor(step, total)

    def _flops_per_token(self, batch) -> int:
        seq_len = batch["input_ids"].shape[1]
        if getattr(self, "_flops_for", None) != seq_len:
            self._flops_for, self._flops = seq_len, model_stats(self.arch, seq_len).flops_per_token
        return self._flops

    def _group_settings(self) -> list[dict]:
        """AdamW's settings for its two parameter groups, matrices (decayed) then norms, from
        this run's config."""
        o = self.optim
        return [{"initial_lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": decay} for decay in (o.weight_decay, 0.0)]

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        matrices, vectors = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        groups = [{"params": ps, "lr": s["initial_lr"], **s}
                  for ps, s in zip((matrices, vectors), self._group_settings(), strict=True)]
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
        optimizer = torch.optim.AdamW(groups, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ---------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _evaluate(self, batch, stage):
        logits, targets = self(batch), batch["targets"]
        self.val_loss.update(self._loss(logits, targets, z_loss=0.0), weight=(targets != IGNORE).sum())
        self.val_ppl.update(logits.float(), targets)
        self.val_acc.update(logits.argmax(-1).flatten(), targets.flatten())
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        self.log(f"{stage}/ppl", self.val_ppl)
        self.log(f"{stage}/acc", self.val_acc)

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        meta.write(checkpoint, arch=self.arch.to_dict(), tokens_seen=self.tokens_seen,
                   skipped_steps=self.skipped_steps, migrations=self.migrations)

    def on_load_checkpoint(self, checkpoint):
        cpm = meta.CPMMeta.of(checkpoint, str(self.trainer.ckpt_path))
        self.tokens_seen, self.skipped_steps, self.migrations = cpm.tokens_seen, cpm.skipped_steps, list(cpm.migrations)
        if self.migrate_on_load:
            if MODEL_KEY in checkpoint:  # a single file, which Lightning loads after this hook (FSDP2: loaded)
                migrate_file_checkpoint(checkpoint, str(self.trainer.ckpt_path), self.migrate_on_load)
            step = checkpoint.get("global_step", 0)
            self.migrations += [{**s.as_dict(), "step": step} for s in self.migrate_on_load]
