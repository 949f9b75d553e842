"""The run config's groups: the one place where the trainer core (`cpm_lightning`) meets the
data package (`datamodules`) (docs/ARCHITECTURE.md, "Layers").

`GROUPS` are plain dataclasses: the proposal registry checks `model.*` and `data.*` keys against
them without importing Lightning. The classes LightningCLI builds are those dataclasses made
into a LightningModule and a LightningDataModule.
"""

from __future__ import annotations

from cpm_lightning.config import ModelConfig
from datamodules.config import DataConfig

GROUPS: dict[str, type] = {"model": ModelConfig, "data": DataConfig}
VERBS = ("fit", "validate", "test")  # the verbs that train or evaluate from a run config


def training_classes() -> tuple[type, type]:
    """(CausalLM, PretrainDataModule): the `model` and `data` groups as Lightning builds them.
    Imported here, on demand: they bring Lightning."""
    from cpm_lightning.module import CausalLM
    from datamodules.pretrain import PretrainDataModule

    return CausalLM, PretrainDataModule
