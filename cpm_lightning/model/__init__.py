"""The CPM-Ant model: config and presets, components, the transformer. No training code here."""

from cpm_lightning.model.config import PRESETS, ArchConfig
from cpm_lightning.model.layers import COMPONENTS
from cpm_lightning.model.transformer import CPMAnt, KVCache

__all__ = ["ArchConfig", "COMPONENTS", "CPMAnt", "KVCache", "PRESETS"]
