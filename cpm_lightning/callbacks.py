"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import lightning as L


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
