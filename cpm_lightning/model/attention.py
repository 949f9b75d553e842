"""Attention kernels: SDPA over a dense additive mask (the reference, and decoding with the KV
cache); FlexAttention, which computes CPM-Ant's bucket bias, the segment-pair bias, the
context/causal rule, sample separation and padding inside the kernel; or query-chunked SDPA,
which builds that dense mask a chunk of query rows at a time and recomputes it in the backward
(docs/ARCHITECTURE.md, "The model").

The dense mask is [B, H, T, S] floats per attention call (2 GiB for cpm-ant-10b at T = 1024 and
16 samples) and rules out the flash kernels; FlexAttention keeps the learned [buckets, heads]
table and [B, T] ids, and skips the key blocks a BlockMask says no query sees. The BlockMask
depends on the batch's segments, context and padding, so the model builds it once per forward
and every layer shares it.

This torch has no FlexAttention backward on CPU, so CPU training chunks instead: per chunk of
c queries (model.parallel.attention_chunk) only its [B, H, c, S] mask exists, inside a checkpoint, so the backward keeps
neither the mask nor the chunk's scores and attention memory grows like T rather than T^2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cpm_lightning.core.errors import UserError


def choose_kernel(choice: str, device: torch.device, backward: bool) -> str:
    """sdpa, flex or chunked: the kernel of a forward without a KV cache, for
    `model.parallel.attention` (model/config.py, ATTENTION_KERNELS). This torch has no
    FlexAttention backward on CPU, and its CPU forward is only memory-lean compiled (seconds of
    inductor per shape), so `auto` runs flex on CUDA only. Nor does it chunk: `chunked` pays one
    more attention forward per step (the recompute) and measured 1.05-1.5x the dense mask's step
    time on CPU at T = 512-2048 (benchmarks/attention_memory.py), so it is chosen for memory."""
    if choice == "flex" and device.type == "cpu" and backward:
        raise UserError("model.parallel.attention: flex cannot train on CPU (this torch has no "
                        "FlexAttention backward there); use chunked, sdpa or auto")
    if choice != "auto":
        return choice
    return "flex" if device.type == "cuda" else "sdpa"


@functools.cache
def _kernels() -> tuple[Callable, Callable, Callable]:
    """flex_attention as (traced into a compiled block on CUDA, compiled on its own, compiled on
    its own behind a graph break). Called eagerly flex_attention is PyTorch's reference, which
    materialises the scores it exists to avoid; on CPU inductor's C++ template fails to lower it
    inside a larger graph (torch 2.13), so a compiled block there breaks its graph around it.
    Built on first use: torch.compile imports dynamo (and sympy), which `--help` must not."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    return flex_attention, compiled, torch.compiler.disable(compiled)


@dataclass
class FlexMask:
    """What every layer's FlexAttention call of one forward shares: the BlockMask, the
    score_mod (None: no additive bias, as with rotary) and the kernels (`_kernels`)."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    score_mod: Callable | None
    kernels: tuple[Callable, Callable, Callable]


def flex_mask(T: int, device: torch.device, score_mod: Callable | None, context=None, sample_ids=None,
              attention_mask=None) -> FlexMask:
    """The FlexMask of a forward of T positions without a cache: CPMAnt._mask's rule as a
    mask_mod that reads [B, T] tensors (each None when absent) instead of a [B, T, S] one."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        visible = k <= q
        if context is not None:
            # CPM-Ant: every query sees the context; a target token also sees earlier tokens.
            visible = context[b, k] | (~context[b, q] & visible)
        if sample_ids is not None:
            visible = visible & (sample_ids[b, q] == sample_ids[b, k])
        if attention_mask is not None:
            # Nothing sees padding; a padding query sees itself, so that no row is empty.
            visible = (visible & attention_mask[b, k]) | (q == k)
        return visible

    per_sample = [t for t in (context, sample_ids, attention_mask) if t is not None]
    B = per_sample[0].shape[0] if per_sample else None  # None: one mask broadcast over the batch
    # Outside the blocks, so eager even when they are compiled: _kernels is built here.
    return FlexMask(create_block_mask(mask_mod, B, None, T, T, device=device), score_mod, _kernels())


@dataclass
class ChunkedMask:
    """The dense mask's rule as rows(start, end) -> the additive mask of query rows start:end,
    [B or 1, H or 1, end - start, S]: the same builder the SDPA path calls for all rows."""

    rows: Callable[[int, int], torch.Tensor]
    size: int
    """Query rows per chunk: the mask and scores alive at once are [B, H, size, S]."""


def _attend_rows(q, k, v, start: int, mask: ChunkedMask, scale: float | None, gqa: bool):
    bias = mask.rows(start, start + q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


def attend(q, k, v, mask, scale: float | None, gqa: bool):
    """softmax(q k^T * scale + bias) v over q [B, H, T, D], k and v [B, K, S, D]: SDPA when `mask`
    is the dense additive mask or None (is_causal, or one new token that sees every cached one),
    FlexAttention when it is a FlexMask, SDPA a chunk of queries at a time when a ChunkedMask."""
    if isinstance(mask, ChunkedMask):
        chunks = []
        for start in range(0, q.shape[2], mask.size):
            rows = q[:, :, start:start + mask.size]
            if torch.is_grad_enabled():
                # The backward recomputes the chunk's mask (and SDPA's scores) from q, k, v and the
                # bias table instead of keeping them; nothing random runs, so no RNG state is kept.
                chunks.append(checkpoint(_attend_rows, rows, k, v, start, mask, scale, gqa,
                                         use_reentrant=False, preserve_rng_state=False))
            else:
                chunks.append(_attend_rows(rows, k, v, start, mask, scale, gqa))
        return torch.cat(chunks, dim=2)
    if isinstance(mask, FlexMask):
        traced, compiled, apart = mask.kernels
        kernel = (traced if q.is_cuda else apart) if torch.compiler.is_compiling() else compiled
        return kernel(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa,
                                          is_causal=mask is None and q.shape[2] > 1)
