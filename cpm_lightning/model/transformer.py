"""The CPM-Ant transformer: a decoder stack that works as a prefix LM (docs/ARCHITECTURE.md, "The model")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpm_lightning.model.attention import ChunkedMask, choose_kernel, flex_mask
from cpm_lightning.model.config import ArchConfig
from cpm_lightning.model.layers import COMPONENTS, Block, scaled_linear


class KVCache:
    """Keys and values of earlier positions, one preallocated buffer per attention layer, and
    the segment and padding of each position (later queries need them for bias and mask)."""

    def __init__(self, model: "CPMAnt", batch: int, max_len: int):
        cfg, p = model.cfg, model.embedding
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in model.blocks]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in model.blocks]
        self.segment_ids = torch.zeros(batch, max_len, dtype=torch.long, device=p.device)
        self.attention_mask = torch.ones(batch, max_len, dtype=torch.bool, device=p.device)
        self.has_segments = self.has_padding = False
        self.length = 0
        self.max_len = max_len

    def slot(self, i: int) -> "_Slot":
        return _Slot(self, i)

    def extend(self, segment_ids, attention_mask, T: int):
        """Record the segments and padding of the T new positions; (segments, mask) of all
        positions so far, each None while every position had the default (0, not padding)."""
        start, end = self.length, self.length + T
        if segment_ids is not None:
            self.segment_ids[:, start:end] = segment_ids
            self.has_segments = True
        if attention_mask is not None:
            self.attention_mask[:, start:end] = attention_mask
            self.has_padding = True
        return (self.segment_ids[:, :end] if self.has_segments else None,
                self.attention_mask[:, :end] if self.has_padding else None)


class _Slot:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k, v):
        c, start, end = self.cache, self.cache.length, self.cache.length + k.shape[2]
        c.k[self.i][:, :, start:end] = k
        c.v[self.i][:, :, start:end] = v
        return c.k[self.i][:, :, :end], c.v[self.i][:, :, :end]


class CPMAnt(nn.Module):
    attention_kernel = "sdpa"
    """sdpa, flex, chunked or auto (model/config.py, ATTENTION_KERNELS): how a forward without a KV cache
    attends; training sets it from model.parallel.attention. Not a parameter: checkpoints and
    the architecture do not depend on it."""
    attention_chunk = 256
    """Query rows per chunk of the chunked kernel (model.parallel.attention_chunk)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size is None:
            raise ValueError("ArchConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        # Tied: one table E is the input embedding and the output projection (said to matter for
        # stability), used as E[ids] / sqrt(dim) and h / sqrt(dim) @ E^T (CPM-Ant's Embedding).
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
        """CPM-Ant's init: token, segment and prompt embeddings N(0, 0.02^2); every other weight
        N(0, 1) (linears rescale their output by 1/sqrt(d_in)); norms 1. Works on materialized
        meta/sharded parameters."""
        for p in (self.embedding, self.segment_embedding, self.prompt_embedding):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, input_ids, segment_ids=None, context=None, task=None, attention_mask=None,
                cache: KVCache | None = None, sample_ids=None):
        """input_ids [B, T] -> logits [B, T, V].

        segment_ids [B, T]: segment of each token (default: all 0). context [B, T] bool: tokens
        every position may see (the prefix of a prefix LM); others attend causally. task [B]:
        prepend that task's prompt embeddings as context, in segment 0. attention_mask [B, T]
        bool: False at padding, which no other position sees (its own logits are meaningless).
        cache: continue after the positions it holds (generation).

        A packed window of several samples (training, no cache): sample_ids [B, T] numbers the
        samples, each a run of consecutive positions that no position of another sample sees;
        ids from vocab_size on are prompt positions, rows of the prompt embeddings (CPM-Ant's
        scheme, and the HF export's one table), so each sample carries its own task prompt."""
        B, T = input_ids.shape
        x = self._embed(input_ids)
        if task is not None:
            x, segment_ids, context, attention_mask = self._prepend_prompt(x, task, segment_ids, context, attention_mask)
        segment = self.segment_embedding[0] if segment_ids is None else F.embedding(segment_ids, self.segment_embedding)
        x = (x + segment) * self.cfg.dim**-0.5  # CPM-Ant scales every embedding by 1/sqrt(dim)
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        mask = self._mask(pos, segment_ids, context, attention_mask, cache, sample_ids)
        # Rotary turns q and k by each sample's own positions, as the sample alone would be. The
        # relative-bucket bias needs no such thing: it depends on key - query position only,
        # the same counted from the window's start, and across samples nothing is seen.
        rot_pos = pos if sample_ids is None else _positions_in_sample(sample_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, self.position, rot_pos, cache.slot(i) if cache is not None else None)
        if cache is not None:
            cache.length += x.shape[1]
        x = self.norm(x[:, -T:])
        return scaled_linear(x, self.embedding, self.cfg.dim**-0.5)

    def _embed(self, ids):
        if self.prompt_embedding is None:
            return F.embedding(ids, self.embedding)
        V = self.cfg.vocab_size
        prompt = ids >= V
        x = F.embedding(ids.masked_fill(prompt, 0), self.embedding)
        return torch.where(prompt[..., None], F.embedding((ids - V).clamp(min=0), self.prompt_embedding), x)

    def _prepend_prompt(self, x, task, segment_ids, context, attention_mask):
        """Prompt positions: the task's prompt embeddings, segment 0, context, never padding."""
        B, L = x.shape[0], self.cfg.prompt_len
        idx = task[:, None] * L + torch.arange(L, device=x.device)  # [B, L]
        x = torch.cat([F.embedding(idx, self.prompt_embedding), x], dim=1)
        T = x.shape[1] - L
        seg = torch.zeros(B, T, dtype=torch.long, device=x.device) if segment_ids is None else segment_ids
        ctx = torch.zeros(B, T, dtype=torch.bool, device=x.device) if context is None else context
        seg = torch.cat([torch.zeros(B, L, dtype=seg.dtype, device=x.device), seg], dim=1)
        ctx = torch.cat([torch.ones(B, L, dtype=torch.bool, device=x.device), ctx], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([torch.ones(B, L, dtype=torch.bool, device=x.device), attention_mask], dim=1)
        return x, seg, ctx, attention_mask

    def _mask(self, pos, segment_ids, context, attention_mask, cache, sample_ids=None):
        """Additive attention mask [B or 1, H or 1, T, S], or None when queries see every key up
        to their own position without a bias (SDPA's is_causal, or one new token), or the
        FlexMask that computes both inside FlexAttention (attention.py) when the kernel is flex,
        or the ChunkedMask that builds the dense mask's query rows a chunk at a time."""
        T, S = len(pos), int(pos[-1]) + 1
        kernel = "sdpa" if cache is not None else choose_kernel(self.attention_kernel, pos.device,
                                                                torch.is_grad_enabled())
        if kernel == "flex":
            score_mod = self.position.score_mod(T, segment_ids)
            if score_mod is None and context is None and attention_mask is None and sample_ids is None:
                return None  # plain causal text: SDPA's flash kernel
            return flex_mask(T, pos.device, score_mod, context, sample_ids, attention_mask)
        k_seg, k_valid = segment_ids, attention_mask
        if cache is not None:
            k_seg, k_valid = cache.extend(segment_ids, attention_mask, T)
            if k_seg is not None and segment_ids is None:
                segment_ids = torch.zeros_like(k_seg[:, -T:])
        if (not self.position.adds_bias and context is None and k_valid is None and sample_ids is None
                and (T == S or T == 1)):
            return None
        k_pos = torch.arange(S, device=pos.device)
        # CPM-Ant: every query sees the context; a target token also sees earlier tokens.
        # Earlier (cached) positions precede every query, so they count as context here.
        k_ctx = None if context is None else torch.cat([context.new_ones(context.shape[0], S - T), context], dim=1)

        def rows(start: int, end: int):
            """The mask of query rows start:end."""
            q_pos = pos[start:end]
            q_seg = None if segment_ids is None else segment_ids[:, start:end]
            bias = self.position.bias(q_pos, k_pos, q_seg, k_seg)
            visible = k_pos[None, None, :] <= q_pos[None, :, None]  # [1, rows, S]
            if context is not None:
                visible = k_ctx[:, None, :] | (~context[:, start:end, None] & visible)
            if sample_ids is not None:
                visible = visible & (sample_ids[:, start:end, None] == sample_ids[:, None, :])
            if k_valid is not None:
                # Nothing sees padding; a padding query sees itself, so that no row is all -inf.
                visible = (visible & k_valid[:, None, :]) | (k_pos[None, None, :] == q_pos[None, :, None])
            bias = torch.zeros((), device=pos.device) if bias is None else bias
            return bias.masked_fill(~visible[:, None], float("-inf")).to(self.embedding.dtype)

        return ChunkedMask(rows, self.attention_chunk) if kernel == "chunked" else rows(0, T)


def _positions_in_sample(sample_ids):
    """[B, T] position of each token counted from the start of its sample (a run of equal ids)."""
    idx = torch.arange(sample_ids.shape[1], device=sample_ids.device).expand_as(sample_ids)
    starts = torch.ones_like(sample_ids, dtype=torch.bool)
    starts[:, 1:] = sample_ids[:, 1:] != sample_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values
