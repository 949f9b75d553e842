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
