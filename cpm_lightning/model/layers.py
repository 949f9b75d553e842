"""Transformer components and their registries.

Every component is chosen by name from a plain dict (`COMPONENTS[kind][name]`), so a run config
or a community proposal can pick one without naming Python code. Shapes: B batch, T query
length, S key length, H heads, K key/value heads, D head_dim, C model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cpm_lightning.model.attention import attend


class Linear(nn.Module):
    """Bias-free linear layer with CPM-Ant's scaled init: weights N(0, 1), output scaled by
    gain/sqrt(d_in) in the forward pass."""

    def __init__(self, d_in: int, d_out: int, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.scale = gain * d_in**-0.5

    def reset_parameters(self):
        nn.init.normal_(self.weight)

    def forward(self, x):
        return scaled_linear(x, self.weight, self.scale)


def scaled_linear(x, weight, scale: float):
    """x @ (weight * scale)^T, scaling whichever is cheaper: the weight when more tokens than
    input features pass (training), the output otherwise (decoding one token at a time)."""
    if x.numel() > x.shape[-1] ** 2:  # tokens > d_in
        return F.linear(x, weight * scale)
    return F.linear(x, weight) * scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(RMSNorm):
    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)


class GatedFFN(nn.Module):
    """w_out(act(w_0 x) * w_1 x): gated GeLU in CPM-Ant, SwiGLU with act=silu."""

    act = staticmethod(F.gelu)

    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.w_0 = Linear(dim, ff_dim)
        self.w_1 = Linear(dim, ff_dim)
        self.w_out = Linear(ff_dim, dim)

    def forward(self, x):
        return self.w_out(self.act(self.w_0(x)) * self.w_1(x))


class SwiGLU(GatedFFN):
    act = staticmethod(F.silu)


def relative_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5/CPM-Ant bidirectional log-bucketing of key_pos - query_pos."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    log_part = exact + (
        torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    return bucket + torch.where(rel < exact, rel, log_part.clamp(max=half - 1))


class RelativeBuckets(nn.Module):
    """CPM-Ant's position bias, shared by all layers: a learned bias per (head, distance bucket)
    between tokens of one segment, and per (head, query segment, key segment) across segments."""

    adds_bias = True

    def __init__(self, cfg):
        super().__init__()
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.num_segments = cfg.num_segments
        self.weight = nn.Parameter(torch.empty(cfg.num_buckets + cfg.num_segments**2, cfg.num_heads))

    def reset_parameters(self):
        nn.init.normal_(self.weight)  # CPM-Ant: N(0, 1), as its linears

    def bias(self, q_pos, k_pos, q_seg, k_seg):
        """Additive attention bias [B or 1, H, T, S] from positions [T], [S] and segments
        [B, T], [B, S] (or None for a single segment), consecutive positions each. The log
        bucketing runs once per distance, not per (query, key): the chunked kernel rebuilds this
        for every chunk of rows, in every layer, twice."""
        lo, hi = int(k_pos[0] - q_pos[-1]), int(k_pos[-1] - q_pos[0])
        bucket_of = relative_bucket(torch.arange(lo, hi + 1, device=q_pos.device), self.num_buckets,
                                    self.max_distance)
        bucket = bucket_of[k_pos[None, :] - q_pos[:, None] - lo][None]  # [1, T, S]
        if q_seg is not None:
            pair = self.num_buckets + q_seg[:, :, None] * self.num_segments + k_seg[:, None, :]
            bucket = torch.where(q_seg[:, :, None] == k_seg[:, None, :], bucket, pair)  # [B, T, S]
        # A gather from the [H, buckets] table with an expanded index writes the bias in SDPA's
        # [B, H, T, S] layout: indexing the [buckets, H] table gives [B, T, S, H], whose permute
        # was copied to contiguous and back (0.78 s of a 5.0 s cpm-ant-1b block step at T = 2048
        # on CPU), and index_put's backward is several times slower than gather's scatter-add.
        B, H = bucket.shape[0], self.weight.shape[1]
        table = self.weight.t()[None].expand(B, -1, -1)
        return torch.gather(table, 2, bucket.flatten(1)[:, None].expand(-1, H, -1)).view(B, H, *bucket.shape[1:])

    def score_mod(self, T: int, seg):
        """`bias` for FlexAttention over T positions from 0, segments seg [B, T] or None: a
        gather from the table per score, so its gradient reaches the table, from a [2T - 1]
        bucket per distance instead of a [T, T] one."""
        bucket_of = relative_bucket(torch.arange(1 - T, T, device=self.weight.device), self.num_buckets,
                                    self.max_distance)  # bucket of k - q at k - q + T - 1
        weight, buckets, n = self.weight, self.num_buckets, self.num_segments
        if seg is None:
            return lambda score, b, h, q, k: score + weight[bucket_of[k - q + T - 1], h]

        def mod(score, b, h, q, k):
            q_seg, k_seg = seg[b, q], seg[b, k]
            row = torch.where(q_seg == k_seg, bucket_of[k - q + T - 1], buckets + q_seg * n + k_seg)
            return score + weight[row, h]

        return mod

    def rotate(self, q, k, pos):
        return q, k


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer), applied to q and k; no additive bias."""

    adds_bias = False

    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.base = cfg.head_dim, cfg.rope_base

    def reset_parameters(self):
        pass

    def bias(self, q_pos, k_pos, q_seg, k_seg):
        return None

    def score_mod(self, T: int, seg):
        return None

    def rotate(self, q, k, pos):
        inv_freq = self.base ** -(torch.arange(0, self.head_dim, 2, device=q.device).float() / self.head_dim)
        angle = pos.float()[..., None] * inv_freq  # [T, D/2], or [B, T, D/2] per sample of a packed window
        turn = torch.polar(torch.ones_like(angle), angle)
        if turn.ndim == 3:
            turn = turn[:, None]  # over the heads
        return _turn(q, turn), _turn(k, turn)


def _turn(x, turn):
    """Rotate each pair (x[2i], x[2i+1]) of x [B, H, T, D] by the angle of turn [T, D/2] (or
    [B, 1, T, D/2]), as one
    complex multiply: an order of magnitude faster on CPU than four real multiplies and a stack."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * turn).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention; grouped-query when num_kv_heads < num_heads. `mask` is what
    attention.attend takes (the dense mask, None or a FlexMask); `cache` is a KVCache slot for
    incremental decoding."""

    def __init__(self, cfg):
        super().__init__()
        self.h, self.kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # split_qk_scale: q and k each carry head_dim^-1/4, folded into their projections'
        # weight scale (rotation keeps norms, so it commutes) rather than paid per token.
        self.score_scale = 1.0 if cfg.split_qk_scale else None  # None: SDPA's 1/sqrt(D)
        qk_gain = self.d**-0.25 if cfg.split_qk_scale else 1.0
        self.project_q = Linear(cfg.dim, self.h * self.d, qk_gain)
        self.project_k = Linear(cfg.dim, self.kv * self.d, qk_gain)
        self.project_v = Linear(cfg.dim, self.kv * self.d)
        self.attention_out = Linear(self.h * self.d, cfg.dim)

    def forward(self, x, mask, position, pos, cache=None):
        B, T, _ = x.shape
        q = self.project_q(x).view(B, T, self.h, self.d).transpose(1, 2)  # [B, H, T, D]
        k = self.project_k(x).view(B, T, self.kv, self.d).transpose(1, 2)  # [B, K, T, D]
        v = self.project_v(x).view(B, T, self.kv, self.d).transpose(1, 2)
        q, k = position.rotate(q, k, pos)  # new tokens only: the cache holds rotated keys
        if cache is not None:
            k, v = cache.update(k, v)  # [B, K, S, D]
        out = attend(q, k, v, mask, self.score_scale, self.kv != self.h)
        return self.attention_out(out.transpose(1, 2).reshape(B, T, self.h * self.d))


class Block(nn.Module):
    """Pre-norm residual block; either sublayer may be absent (pruned CPM-Ant sizes)."""

    def __init__(self, cfg, has_attn: bool, has_ffn: bool):
        super().__init__()
        norm = COMPONENTS["norm"][cfg.norm]
        self.attn_norm = norm(cfg.dim, cfg.norm_eps) if has_attn else None
        self.attn = COMPONENTS["attention"][cfg.attention](cfg) if has_attn else None
        self.ffn_norm = norm(cfg.dim, cfg.norm_eps) if has_ffn else None
        self.ffn = COMPONENTS["ffn"][cfg.ffn](cfg.dim, cfg.ff_dim) if has_ffn else None

    def forward(self, x, mask, position, pos, cache=None):
        if self.attn is not None:
            x = x + self.attn(self.attn_norm(x), mask, position, pos, cache)
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x


COMPONENTS: dict[str, dict[str, type]] = {
    "norm": {"rmsnorm": RMSNorm, "layernorm": LayerNorm},
    "position": {"relative_buckets": RelativeBuckets, "rotary": Rotary},
    "ffn": {"gated_gelu": GatedFFN, "swiglu": SwiGLU},
    "attention": {"multi_head": Attention},
}
