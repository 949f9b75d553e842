"""The CPM-Ant transformer: a decoder stack that works as a prefix LM (docs/ARCHITECTURE.md, "The model")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpm_lightning.model.config import ArchConfig
from cpm_lightning.model.layers import COMPONENTS, Block


class KVCache:
    """Keys and values of earlier positions, one preallocated buffer per attention layer."""

    def __init__(self, model: "CPMAnt", batch: int, max_len: int):
        cfg, p = model.cfg, model.embedding
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in model.blocks]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in model.blocks]
        self.length = 0
        self.max_len = max_len

    def slot(self, i: int) -> "_Slot":
        return _Slot(self, i)


class _Slot:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k, v):
        c, start, end = self.cache, self.cache.length, self.cache.length + k.shape[2]
        c.k[self.i][:, :, start:end] = k
        c.v[self.i][:, :, start:end] = v
        return c.k[self.i][:, :, :end], c.v[self.i][:, :, :end]


class CPMAnt(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size is None:
            raise ValueError("ArchConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        # Tied: the input embedding is also the output projection (said to matter for stability).
        self.embedding = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        self.segment_embedding = nn.Parameter(torch.empty(cfg.num_segments, cfg.dim))
        self.prompt_embedding = (
            nn.Parameter(torch.empty(cfg.num_tasks * cfg.prompt_len, cfg.dim)) if cfg.num_tasks else None
        )
        self.position = COMPONENTS["position"][cfg.position](cfg)
        self.blocks = nn.ModuleList(
            Block(cfg, i < cfg.num_attn_layers, i < cfg.num_ffn_layers) for i in range(cfg.num_blocks)
        )
        self.norm = COMPONENTS["norm"][cfg.norm](cfg.dim, cfg.norm_eps)

    @torch.no_grad()
    def init_weights(self):
        """CPM-Ant init: every weight N(0, 1) (linears rescale their output by 1/sqrt(d_in),
        the output projection by 1/sqrt(dim)). Works on materialized meta/sharded parameters."""
        for p in (self.embedding, self.segment_embedding, self.prompt_embedding):
            if p is not None:
                nn.init.normal_(p)
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, input_ids, segment_ids=None, context=None, task=None, cache: KVCache | None = None):
        """input_ids [B, T] -> logits [B, T, V].

        segment_ids [B, T]: segment of each token (default: one segment). context [B, T] bool:
        tokens every position may see (the prefix of a prefix LM); others attend causally.
        task [B]: prepend that task's prompt embeddings as context. cache: continue after the
        positions it holds (generation)."""
        B, T = input_ids.shape
        x = F.embedding(input_ids, self.embedding)
        x = x + (self.segment_embedding[0] if segment_ids is None else F.embedding(segment_ids, self.segment_embedding))
        if task is not None:
            x, segment_ids, context = self._prepend_prompt(x, task, segment_ids, context)
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        mask = self._mask(pos, segment_ids, context, cache)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, self.position, pos, cache.slot(i) if cache is not None else None)
        if cache is not None:
            cache.length += x.shape[1]
        x = self.norm(x[:, -T:])
        return F.linear(x, self.embedding * self.cfg.dim**-0.5)

    def _prepend_prompt(self, x, task, segment_ids, context):
        B, L = x.shape[0], self.cfg.prompt_len
        idx = task[:, None] * L + torch.arange(L, device=x.device)  # [B, L]
        x = torch.cat([F.embedding(idx, self.prompt_embedding), x], dim=1)
        seg = torch.zeros(B, x.shape[1] - L, dtype=torch.long, device=x.device) if segment_ids is None else segment_ids
        ctx = torch.zeros_like(seg, dtype=torch.bool) if context is None else context
        seg = torch.cat([seg[:, :1].expand(B, L), seg], dim=1)
        ctx = torch.cat([torch.ones(B, L, dtype=torch.bool, device=x.device), ctx], dim=1)
        return x, seg, ctx

    def _mask(self, pos, segment_ids, context, cache):
        """Additive attention mask [B or 1, H or 1, T, S], or None for plain causal attention
        without a bias (SDPA's is_causal fast path)."""
        k_pos = torch.arange(0, pos[-1] + 1, device=pos.device)
        bias = self.position.bias(pos, k_pos, segment_ids, segment_ids)
        if bias is None and segment_ids is None and context is None and (cache is None or cache.length == 0):
            return None
        visible = k_pos[None, None, :] <= pos[None, :, None]  # [1, T, S]
        if context is not None:
            # CPM-Ant: every query sees the context; a target token also sees earlier tokens.
            visible = context[:, None, :] | (~context[:, :, None] & visible)
        bias = torch.zeros((), device=pos.device) if bias is None else bias
        return bias.masked_fill(~visible[:, None], float("-inf")).to(self.embedding.dtype)
