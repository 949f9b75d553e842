"""Architecture config and the named presets (docs/ARCHITECTURE.md, "The model")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cpm_lightning.core.errors import UserError, lookup
from cpm_lightning.core.ranges import check_ranges, ranged
from cpm_lightning.model.layers import COMPONENTS

# Attention layers / FFN layers / dim / heads x head_dim / ff / vocab, as CPM-Ant released them.
# The smaller CPM-Ant models were pruned from the 10B with BMCook, which removed whole attention
# or FFN sublayers; here a block i has attention when i < num_attn_layers and an FFN when
# i < num_ffn_layers. `tiny` is for tests, `demo` is sized for a few minutes on 2 CPU cores.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, num_heads=4, head_dim=16, ff_dim=128, num_attn_layers=2,
                 num_ffn_layers=2, vocab_size=512, max_len=256, num_buckets=32, max_distance=128),
    # Wide and shallow: on a CPU, matmuls this wide run near the fp32 peak (docs/ARCHITECTURE.md, "MLflow": MFU).
    "demo": dict(dim=512, num_heads=8, head_dim=64, ff_dim=1280, num_attn_layers=4,
                 num_ffn_layers=4, vocab_size=4096, max_len=256, num_buckets=32, max_distance=256),
    "cpm-ant-300m": dict(dim=512, num_heads=32, head_dim=64, ff_dim=5120, num_attn_layers=25,
                         num_ffn_layers=21, vocab_size=30720),
    "cpm-ant-1b": dict(dim=2048, num_heads=32, head_dim=64, ff_dim=5120, num_attn_layers=25,
                       num_ffn_layers=21, vocab_size=30720),
    "cpm-ant-3b": dict(dim=2560, num_heads=32, head_dim=80, ff_dim=6400, num_attn_layers=37,
                       num_ffn_layers=32, vocab_size=30720),
    "cpm-ant-7b": dict(dim=4096, num_heads=32, head_dim=128, ff_dim=10240, num_attn_layers=37,
                       num_ffn_layers=32, vocab_size=30720),
    "cpm-ant-10b": dict(dim=4096, num_heads=32, head_dim=128, ff_dim=10240, num_attn_layers=48,
                        num_ffn_layers=48, vocab_size=30720),
}

# model.parallel.attention (train/config.py ParallelConfig), how CPMAnt attends (model/attention.py).
ATTENTION_KERNELS: dict[str, str] = {
    "sdpa": "scaled_dot_product_attention over a dense [B, H, T, S] bias and mask (the reference)",
    "flex": "FlexAttention, bias and mask computed inside the kernel (compiled; on CPU forward only)",
    "chunked": "sdpa a chunk of queries at a time, each chunk's bias and mask rebuilt in the backward "
               "(attention memory grows like T: CPU training)",
    "auto": "flex on CUDA, sdpa elsewhere (chunked measured slower than sdpa on CPU: it is for memory)",
}

MAX_PARAMS = 20_000_000_000
"""The largest model the project builds from what others wrote (registry.max_params' default, a
model directory's config.json): twice the largest preset."""
MAX_TRAINED_PARAMS = 10**12
"""The largest architecture a checkpoint's `cpm` section may record: what an operator's run config
trained may be larger than MAX_PARAMS, but no real run reaches a trillion, and a crafted section
(a billion layers) is refused before torch sees it."""

# What the large presets leave to CPM-Ant's own settings.
CPM_ANT_DEFAULTS = {"num_buckets": 512, "max_distance": 2048, "max_len": 512}


@dataclass(kw_only=True)
class ArchConfig:
    """The transformer's shape and components. Fields left unset take the preset's value."""

    preset: str = "tiny"
    """Named starting point: tiny, demo, cpm-ant-300m, cpm-ant-1b, cpm-ant-3b, cpm-ant-7b,
    cpm-ant-10b. Any other field given beside it overrides the preset's value."""
    vocab_size: int | None = ranged(None, ge=1)
    """Vocabulary size. Unset: the tokenizer's size when training, the preset's otherwise."""
    dim: int | None = ranged(None, ge=1)
    """Model (residual stream) width."""
    num_heads: int | None = ranged(None, ge=1)
    """Query heads per attention layer."""
    num_kv_heads: int | None = ranged(None, ge=1)
    """Key/value heads (grouped-query attention); unset means num_heads (multi-head)."""
    head_dim: int | None = ranged(None, ge=1)
    """Width of each head (CPM-Ant decouples it from dim / num_heads)."""
    ff_dim: int | None = ranged(None, ge=1)
    """Hidden width of the feed-forward network."""
    num_attn_layers: int | None = ranged(None, ge=1)
    """Blocks that have an attention sublayer (the first ones); at least one."""
    num_ffn_layers: int | None = ranged(None, ge=0)
    """Blocks that have a feed-forward sublayer (the first ones); 0 makes an attention-only model."""
    max_len: int | None = ranged(None, ge=1)
    """Longest sequence the model accepts (CPM-Ant: 512, raised to 1024 during the run)."""
    norm: str = "rmsnorm"
    """Normalization: rmsnorm or layernorm (both without bias, pre-norm)."""
    norm_eps: float = ranged(1e-6, gt=0, le=1)
    """Epsilon of the normalization layers."""
    position: str = "relative_buckets"
    """Position encoding: relative_buckets (CPM-Ant's T5-style bias) or rotary."""
    num_buckets: int | None = ranged(None, ge=4)
    """relative_buckets: number of log-spaced distance buckets (CPM-Ant: 512)."""
    max_distance: int | None = ranged(None, ge=1, le=10**9)
    """relative_buckets: distance at which buckets stop growing (CPM-Ant: 2048)."""
    rope_base: float = ranged(10000.0, gt=1)
    """rotary: base of the rotation frequencies."""
    ffn: str = "gated_gelu"
    """Feed-forward network: gated_gelu (CPM-Ant) or swiglu."""
    attention: str = "multi_head"
    """Attention implementation (grouped-query when num_kv_heads < num_heads)."""
    split_qk_scale: bool = False
    """Scale q and k by head_dim^-1/4 each instead of the scores by head_dim^-1/2: the same
    result, but the fp16 fix CPM-Ant made during its live run (no overflow in q.k)."""
    num_segments: int = ranged(32, ge=1)
    """Segment ids a token may carry (segment embedding and segment-pair bias)."""
    num_tasks: int = ranged(0, ge=0)
    """Tasks with their own prompt embeddings (CPM-Ant: 32); 0 turns prompts off."""
    prompt_len: int = ranged(32, ge=1)
    """Prompt tokens per task (CPM-Ant: 32)."""

    def __post_init__(self):
        lookup(PRESETS, self.preset, "model.arch.preset")
        for kind, registry in COMPONENTS.items():
            lookup(registry, getattr(self, kind), f"model.arch.{kind}")
        check_ranges(self, "model.arch")

    def resolved(self) -> "ArchConfig":
        """A copy with every unset field taken from the preset (or CPM-Ant's value), checked.
        Unset fields stay None in the config itself, so a printed config shows what was chosen
        and a default never overrides another preset's value."""
        values = {**CPM_ANT_DEFAULTS, **PRESETS[self.preset]}
        values.pop("vocab_size")  # the tokenizer's, unless given
        cfg = dataclasses.replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})
        if cfg.num_kv_heads is None:
            cfg.num_kv_heads = cfg.num_heads
        if cfg.num_heads % cfg.num_kv_heads:
            raise UserError(f"model.arch.num_kv_heads ({cfg.num_kv_heads}) must divide "
                            f"num_heads ({cfg.num_heads})")
        if cfg.position == "rotary" and cfg.head_dim % 2:
            raise UserError(f"model.arch.head_dim must be even for rotary, got {cfg.head_dim}")
        # Distances below num_buckets // 4 get a bucket each, and the rest are spread
        # logarithmically up to max_distance (layers.relative_bucket).
        if cfg.position == "relative_buckets" and cfg.max_distance <= cfg.num_buckets // 4:
            raise UserError(f"model.arch.max_distance ({cfg.max_distance}) must be above num_buckets // 4 "
                            f"({cfg.num_buckets // 4}) for relative_buckets")
        return cfg

    @property
    def num_blocks(self) -> int:
        return max(self.num_attn_layers, self.num_ffn_layers)

    @property
    def preset_vocab_size(self) -> int:
        return self.vocab_size or PRESETS[self.preset]["vocab_size"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
