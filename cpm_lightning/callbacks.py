"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import lightning as L

from cpm_lightning.config import EvalConfig
from cpm_lightning.evaluation import evaluate, flat


class CarryTokenizer(L.Callback):
    """Store the tokenizer model in every checkpoint, so a checkpoint alone can generate text
    and be released."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        tokenizer = getattr(trainer.datamodule, "text_tokenizer", None)
        if tokenizer is not None:
            checkpoint.setdefault("cpm", {})["tokenizer"] = tokenizer.model_bytes


class LogSamplesPerSource(L.Callback):
    """Log `data/samples/<source>`, the samples drawn from each source so far, at every logging
    step: a change of the mixture shows at its step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        drawn = getattr(trainer.datamodule, "samples_drawn", None)
        for name, count in (drawn() if drawn else {}).items():
            pl_module.log(f"data/samples/{name}", float(count))


class Evaluate(L.Callback):
    """The `eval` group's tasks every `eval.every_n_steps` optimizer steps, logged as
    eval/<task>/<metric> at that step. Every rank runs it, on its share of the examples: under
    FSDP2 a forward pass is collective (evaluation.loglikelihoods); the logger sends from rank 0."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self._done = -1  # the step last evaluated: a step ends once, after its last micro-batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, c = trainer.global_step, self.config
        if step == self._done or step == 0 or step % c.every_n_steps:
            return
        self._done = step
        dm = trainer.datamodule
        heldout = dm.held_out_windows() if "heldout" in c.tasks else None
        with trainer.precision_plugin.forward_context():  # the precision training computes in (bf16-mixed: autocast)
            scores = evaluate(pl_module.model, dm.text_tokenizer, c.tasks, c.limit, heldout, c.batch_size,
                              distributed=trainer.world_size > 1)
        for logger in trainer.loggers:
            logger.log_metrics(flat(scores, "eval"), step=step)
