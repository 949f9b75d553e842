"""The run config's groups: the one place where the trainer core (`cpm_lightning`) meets the
data package (`datamodules`) (docs/ARCHITECTURE.md, "Layers").

`GROUPS` are plain dataclasses: the proposal registry checks `model.*` and `data.*` keys against
them without importing Lightning. The classes LightningCLI builds are those dataclasses made
into a LightningModule and a LightningDataModule.
"""

from __future__ import annotations

import hashlib

from cpm_lightning.config import ModelConfig
from cpm_lightning.tokenizer import Tokenizer, save_tokenizer
from datamodules.config import DataConfig
from datamodules.remote import cached_file, locations

GROUPS: dict[str, type] = {"model": ModelConfig, "data": DataConfig}
VERBS = ("fit", "validate", "test")  # the verbs that train or evaluate from a run config


def training_classes() -> tuple[type, type]:
    """(CausalLM, PretrainDataModule): the `model` and `data` groups as Lightning builds them.
    Imported here, on demand: they bring Lightning."""
    from cpm_lightning.module import CausalLM
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
