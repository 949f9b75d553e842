"""The CPM-Ant model: config and presets, components, the transformer, parameter and FLOP counts
(stats), and the migrations between architectures (migrate), which carry AdamW's moments with
the weights they change. Plain torch: no Lightning, no MLflow."""

from cpm_lightning.model.config import PRESETS, ArchConfig
from cpm_lightning.model.layers import COMPONENTS
from cpm_lightning.model.transformer import CPMAnt, KVCache

__all__ = ["ArchConfig", "COMPONENTS", "CPMAnt", "KVCache", "PRESETS"]
