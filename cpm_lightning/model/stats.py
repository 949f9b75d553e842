"""Parameter, FLOP and memory accounting (docs/ARCHITECTURE.md, "MLflow"), computed on the meta device so that
the 10B preset costs no memory."""

from __future__ import annotations

import dataclasses

import torch

from cpm_lightning.model.config import ArchConfig
from cpm_lightning.model.layers import Linear
from cpm_lightning.model.transformer import CPMAnt

# fp32 master weights, fp32 gradients, AdamW's two fp32 moments.
BYTES_PER_PARAM = {"params": 4, "gradients": 4, "optimizer": 8}


@dataclasses.dataclass(frozen=True)
class ModelStats:
    params: int
    """Every trainable parameter."""
    non_embedding_params: int
    """Parameters other than the token, segment and prompt embeddings."""
    matmul_params: int
    """Weights of every matrix multiply: all linears plus the (tied) output projection."""
    flops_per_token: int
    """Training FLOPs per token at `seq_len`: 6 x matmul_params + 12 x layers x width x seq_len."""
    seq_len: int


def model_stats(cfg: ArchConfig, seq_len: int | None = None) -> ModelStats:
    cfg = dataclasses.replace(cfg.resolved(), vocab_size=cfg.preset_vocab_size)
    seq_len = seq_len or cfg.max_len
    with torch.device("meta"):
        model = CPMAnt(cfg)
    params = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for p in (model.embedding, model.segment_embedding, model.prompt_embedding) if p is not None)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear))
    matmul = linear + model.embedding.numel()
    attention = 12 * cfg.num_attn_layers * cfg.num_heads * cfg.head_dim * seq_len
    return ModelStats(params, params - embeddings, matmul, 6 * matmul + attention, seq_len)


def param_count(cfg: ArchConfig) -> int:
    """model_stats(cfg).params by arithmetic, for a model of any size: building 1e8 blocks
    takes hours even on the meta device, and the registry sizes proposals before anything is
    built (registry.max_params). tests/model/test_model_info.py holds it to model_stats."""
    cfg = cfg.resolved()
    d = cfg.dim
    embeddings = (cfg.preset_vocab_size + cfg.num_segments + cfg.num_tasks * cfg.prompt_len) * d
    position = (cfg.num_buckets + cfg.num_segments**2) * cfg.num_heads if cfg.position == "relative_buckets" else 0
    attention = d + d * cfg.head_dim * 2 * (cfg.num_heads + cfg.num_kv_heads)  # norm, q, k, v, out
    ffn = d + 3 * d * cfg.ff_dim  # norm and the three matrices of a gated FFN
    return embeddings + position + cfg.num_attn_layers * attention + cfg.num_ffn_layers * ffn + d


def bytes_per_device(params: int, devices: int) -> dict[str, int]:
    """Bytes each device holds for parameters, gradients and AdamW state when fully sharded."""
    out = {k: -(-params * b // devices) for k, b in BYTES_PER_PARAM.items()}
    out["total"] = sum(out.values())
    return out
