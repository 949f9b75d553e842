"""The run config's groups: the one place where the trainer core (`cpm_lightning`) meets the
data package (`datamodules`) (docs/ARCHITECTURE.md, "Layers").

`GROUPS` are plain dataclasses: the proposal registry checks `model.*` and `data.*` keys against
them without importing Lightning. The classes LightningCLI builds are those dataclasses made
into a LightningModule and a LightningDataModule.
"""

from __future__ import annotations

import dataclasses
import hashlib

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import Tokenizer, save_tokenizer
from cpm_lightning.inference.evaluation import evaluate
from cpm_lightning.model import CPMAnt
from cpm_lightning.train.config import ModelConfig
from datamodules.config import DataConfig
from datamodules.remote import cached_file, locations

GROUPS: dict[str, type] = {"model": ModelConfig, "data": DataConfig}
VERBS = ("fit", "validate", "test")  # the verbs that train or evaluate from a run config


def training_classes() -> tuple[type, type]:
    """(CausalLM, PretrainDataModule): the `model` and `data` groups as Lightning builds them.
    Imported here, on demand: they bring Lightning."""
    from cpm_lightning.train.module import CausalLM
    from datamodules.pretrain import PretrainDataModule

    return CausalLM, PretrainDataModule


def kept_tokenizer(data: DataConfig, model_bytes: bytes) -> str:
    """The path of a checkpoint's tokenizer, written into the data cache: a resumed run without
    data.tokenizer keeps the tokenizer it was trained with, although one trained on today's
    sources (a data proposal added one) would differ."""
    tokenizer = Tokenizer.from_bytes(model_bytes, "the checkpoint's tokenizer")
    local, remote = locations(data.cache_dir, data.local_cache)
    return str(cached_file(local, f"tokenizers/{hashlib.sha256(model_bytes).hexdigest()[:32]}-{tokenizer.file_name}",
                           remote, lambda path: save_tokenizer(tokenizer, str(path))))


def held_out_windows(data: DataConfig, tokenizer: Tokenizer, max_len: int) -> dict[str, list[list[int]]]:
    """The validation windows of each source of `data`, tokenized by `tokenizer` (a model's own,
    whatever data.tokenizer says: bits per byte then compare models with different tokenizers),
    the shards built into the data cache if need be. Imports Lightning (PretrainDataModule)."""
    from datamodules.pretrain import PretrainDataModule

    if data.seq_len > max_len:
        raise UserError(f"data.seq_len={data.seq_len} of the run config is above the model's maximum length {max_len}; "
                        "its validation windows would not fit")
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataConfig)}
    dm = PretrainDataModule(**{**fields, "tokenizer": kept_tokenizer(data, tokenizer.model_bytes)})
    dm.prepare_data()
    dm.setup("validate")
    return dm.held_out_windows()


def evaluate_model(model: CPMAnt, tokenizer: Tokenizer, tasks: list[str], limit: int | None = None,
                   data: DataConfig | None = None, batch_size: int = 16,
                   notes: list[str] | None = None) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` of a model on `tasks` (checked first by evaluation.check_tasks),
    heldout on the sources of `data`: what `evaluate` prints and `release` records. `notes`: as
    evaluation.evaluate's."""
    heldout = held_out_windows(data, tokenizer, model.cfg.max_len) if "heldout" in tasks else None
    return evaluate(model, tokenizer, tasks, limit, heldout, batch_size, notes=notes)
