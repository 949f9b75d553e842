"""How a CPMAnt's weights and architecture map onto the two `transformers` architectures that can
express it exactly, in both directions, one tensor at a time.

- relative_buckets models (CPM-Ant's own) <-> CpmAntForCausalLM;
- rotary models <-> LlamaForCausalLM.

Both store plain linear weights, so CPM-Ant's scalings are folded in: each linear's
1/sqrt(d_in) and the embeddings' 1/sqrt(dim). (Neither needs split_qk_scale: both divide the
scores by sqrt(head_dim), which is the same computation.) A block without an attention or FFN
sublayer (the pruned CPM-Ant sizes) is written as one whose weights are zero, which adds exactly
nothing; trailing all-zero sublayers read back as pruned ones.

Scaling by a power of two is exact both ways, so the round trip is bitwise when dim and every
linear's input width are powers of 4; otherwise a weight may come back 1 ulp away (multiplying
float32 values by 2^-k/sqrt(2) maps some neighbours onto one value: no format with folded
scales can avoid it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from cpm_lightning.checkpoint.modeldir import TensorSpec, model_shapes
from cpm_lightning.core.errors import UserError
from cpm_lightning.model import PRESETS, ArchConfig
from cpm_lightning.model.config import CPM_ANT_DEFAULTS

Read = Callable[[str], torch.Tensor]
Make = Callable[[], torch.Tensor]

# A block's weights in CPMAnt.state_dict(), after "blocks.{i}.". The first group is the attention
# sublayer, the second the FFN; the norm first, the output projection last.
ATTN = ("attn_norm.weight", "attn.project_q.weight", "attn.project_k.weight", "attn.project_v.weight",
        "attn.attention_out.weight")
FFN = ("ffn_norm.weight", "ffn.w_0.weight", "ffn.w_1.weight", "ffn.w_out.weight")


class Target:
    """One `transformers` architecture: its names, config and the scalings folded in."""

    architecture: str
    model_type: str
    block: dict[str, str]
    """Our name after "blocks.{i}." -> its name, with {i}."""
    final_norm: str
    HEAD = "lm_head.weight"

    # -- export -----------------------------------------------------------------------------
    def refuse(self, arch: ArchConfig) -> None:
        """A UserError naming the first field this architecture cannot express exactly."""
        if arch.norm != "rmsnorm":
            raise UserError(f"model.arch.norm is {arch.norm}: {self.architecture} has RMSNorm only")

    def plan(self, arch: ArchConfig, read: Read, have: set[str]) -> tuple[dict, list[TensorSpec], dict[str, Make]]:
        """(config.json fields, its tensors in order, name -> a function computing that tensor)
        for our model `arch` with weights `read` (names in `have`)."""
        tied = self.ties(arch, read)
        full = _unpruned(arch)
        shapes = model_shapes(full)
        specs, make = [], {}
        for name, (shape, fn) in self.export_embeddings(arch, read, tied).items():
            specs.append(TensorSpec(name, tuple(shape)))
            make[name] = fn
        for i in range(full.num_blocks):
            for suffix in (*ATTN, *FFN):
                ours, theirs = f"blocks.{i}.{suffix}", self.block[suffix].format(i=i)
                specs.append(TensorSpec(theirs, tuple(shapes[ours])))
                if ours in have:
                    make[theirs] = lambda ours=ours, suffix=suffix: self.to_theirs(suffix, read(ours), arch)
                else:  # a pruned sublayer: a norm of ones before zero weights, which adds nothing
                    fill = torch.ones if suffix.endswith("norm.weight") else torch.zeros
                    make[theirs] = lambda shape=shapes[ours], fill=fill: fill(shape)
        specs.append(TensorSpec(self.final_norm, (arch.dim,)))
        make[self.final_norm] = lambda: read("norm.weight").float()
        return self.config(arch, tied), specs, make

    def ties(self, arch: ArchConfig, read: Read) -> bool:
        """Whether its input and output embeddings are one tensor (then only one is written)."""
        return False

    def config(self, arch: ArchConfig, tied: bool) -> dict:
        raise NotImplementedError

    def export_embeddings(self, arch: ArchConfig, read: Read, tied: bool) -> dict[str, tuple[list[int], Make]]:
        """Its embedding tensors: name -> (shape, a function computing it)."""
        raise NotImplementedError

    def to_theirs(self, suffix: str, t: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
        t = t.float()
        return t if suffix.endswith("norm.weight") else t * t.shape[1] ** -0.5

    # -- import -----------------------------------------------------------------------------
    def arch_fields(self, config: dict, where: str) -> dict:
        """ArchConfig fields from its config.json (every block complete)."""
        raise NotImplementedError

    def is_tied(self, config: dict, names) -> bool:
        """Whether its output embedding is its input embedding (then it is not in the files)."""
        return self.HEAD not in names

    def pruned(self, fields: dict, read: Read) -> dict:
        """`fields` with trailing sublayers whose matrices are all zero counted as pruned."""
        counts = {}
        for key, suffixes in (("num_attn_layers", ATTN), ("num_ffn_layers", FFN)):
            n = fields[key]
            while n > 0 and all(not read(self.block[s].format(i=n - 1)).any() for s in reversed(suffixes[1:])):
                n -= 1
            counts[key] = n
        return {**fields, **counts}

    def importer(self, arch: ArchConfig, read: Read, where: str, tied: bool) -> Read:
        """Our name -> that weight computed from its tensors (`read`); `tied`: it has no
        separate output embedding."""
        blocks = {}
        for i in range(arch.num_blocks):
            for suffix in (*ATTN, *FFN):
                blocks[f"blocks.{i}.{suffix}"] = (suffix, self.block[suffix].format(i=i))
        embeddings = self.import_embeddings(arch, read, where, tied)

        def read_ours(name: str) -> torch.Tensor:
            if name in blocks:
                suffix, theirs = blocks[name]
                return self.to_ours(suffix, read(theirs).float(), arch)
            if name == "norm.weight":
                return read(self.final_norm).float()
            return embeddings(name)
        return read_ours

    def import_embeddings(self, arch: ArchConfig, read: Read, where: str, tied: bool) -> Read:
        raise NotImplementedError

    def to_ours(self, suffix: str, t: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
        return t if suffix.endswith("norm.weight") else t / t.shape[1] ** -0.5


class CpmAnt(Target):
    architecture, model_type = "CpmAntForCausalLM", "cpmant"
    block = {
        "attn_norm.weight": "cpmant.encoder.layers.{i}.self_att.layernorm_before_attention.weight",
        "attn.project_q.weight": "cpmant.encoder.layers.{i}.self_att.self_attention.project_q.weight",
        "attn.project_k.weight": "cpmant.encoder.layers.{i}.self_att.self_attention.project_k.weight",
        "attn.project_v.weight": "cpmant.encoder.layers.{i}.self_att.self_attention.project_v.weight",
        "attn.attention_out.weight": "cpmant.encoder.layers.{i}.self_att.self_attention.attention_out.weight",
        "ffn_norm.weight": "cpmant.encoder.layers.{i}.ffn.layernorm_before_ffn.weight",
        "ffn.w_0.weight": "cpmant.encoder.layers.{i}.ffn.ffn.w_in.w_0.weight",
        "ffn.w_1.weight": "cpmant.encoder.layers.{i}.ffn.ffn.w_in.w_1.weight",
        "ffn.w_out.weight": "cpmant.encoder.layers.{i}.ffn.ffn.w_out.weight",
    }
    final_norm = "cpmant.encoder.output_layernorm.weight"
    EMBEDDING, SEGMENTS = "cpmant.input_embedding.weight", "cpmant.segment_embedding.weight"
    POSITION = "cpmant.position_bias.relative_attention_bias"
    TASK = 2  # the task whose prompt CpmAntModel.forward always prepends

    def refuse(self, arch: ArchConfig) -> None:
        super().refuse(arch)
        if arch.ffn != "gated_gelu":
            raise UserError(f"model.arch.ffn is {arch.ffn}: {self.architecture} has a gated-GeLU FFN only")
        if arch.num_kv_heads != arch.num_heads:
            raise UserError(f"model.arch.num_kv_heads is {arch.num_kv_heads}, not num_heads ({arch.num_heads}): "
                            f"{self.architecture} has no grouped-query attention")
        if 0 < arch.num_tasks <= self.TASK:
            raise UserError(f"model.arch.num_tasks is {arch.num_tasks}: {self.architecture} always prompts with "
                            f"task {self.TASK}, so it needs 0 or at least {self.TASK + 1} tasks")

    def config(self, arch: ArchConfig, tied: bool) -> dict:
        # tie_word_embeddings: its lm_head is a slice of the input embedding, written out.
        return dict(vocab_size=arch.vocab_size, hidden_size=arch.dim, num_attention_heads=arch.num_heads,
                    dim_head=arch.head_dim, dim_ff=arch.ff_dim, num_hidden_layers=arch.num_blocks, dropout_p=0.0,
                    position_bias_num_buckets=arch.num_buckets, position_bias_max_distance=arch.max_distance,
                    eps=arch.norm_eps, prompt_types=arch.num_tasks, prompt_length=arch.prompt_len if arch.num_tasks else 0,
                    segment_types=arch.num_segments, max_position_embeddings=arch.max_len)

    def export_embeddings(self, arch: ArchConfig, read: Read, tied: bool) -> dict[str, tuple[list[int], Make]]:
        s, d = arch.dim**-0.5, arch.dim

        def tokens_and_prompts():
            parts = [read("embedding")] + ([read("prompt_embedding")] if arch.num_tasks else [])
            return torch.cat([p.float() for p in parts]) * s
        return {self.EMBEDDING: ([arch.vocab_size + arch.num_tasks * arch.prompt_len, d], tokens_and_prompts),
                self.SEGMENTS: ([arch.num_segments, d], lambda: read("segment_embedding").float() * s),
                self.POSITION: ([arch.num_buckets + arch.num_segments**2, arch.num_heads],
                                lambda: read("position.weight").float()),
                self.HEAD: ([arch.vocab_size, d], lambda: read("embedding").float() * s)}

    def arch_fields(self, config: dict, where: str) -> dict:
        c = _Config(config, where)
        tasks = c.get("prompt_types", 32) if c.get("prompt_length", 32) else 0
        return dict(position="relative_buckets", ffn="gated_gelu", norm="rmsnorm", vocab_size=c.get("vocab_size"),
                    dim=c.get("hidden_size"), num_heads=c.get("num_attention_heads"), head_dim=c.get("dim_head"),
                    ff_dim=c.get("dim_ff"), num_attn_layers=c.get("num_hidden_layers"),
                    num_ffn_layers=c.get("num_hidden_layers"), num_buckets=c.get("position_bias_num_buckets", 512),
                    max_distance=c.get("position_bias_max_distance", 2048), norm_eps=c.get("eps", 1e-6),
                    num_segments=c.get("segment_types", 32), num_tasks=tasks,
                    prompt_len=c.get("prompt_length", 32) if tasks else ArchConfig.prompt_len,
                    max_len=c.get("max_position_embeddings", CPM_ANT_DEFAULTS["max_len"]))

    def import_embeddings(self, arch: ArchConfig, read: Read, where: str, tied: bool) -> Read:
        s = arch.dim**-0.5

        def embedding(name: str) -> torch.Tensor:
            if name == "segment_embedding":
                return read(self.SEGMENTS).float() / s
            if name == "position.weight":
                return read(self.POSITION).float()
            table = read(self.EMBEDDING).float()
            if name == "prompt_embedding":
                return table[arch.vocab_size:] / s
            if not tied:
                _check_tied(table[:arch.vocab_size], read(self.HEAD).float(), where, self.HEAD, self.EMBEDDING)
            return table[:arch.vocab_size] / s
        return embedding


class Llama(Target):
    architecture, model_type = "LlamaForCausalLM", "llama"
    block = {
        "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "attn.project_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "attn.project_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "attn.project_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "attn.attention_out.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "ffn.w_0.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "ffn.w_1.weight": "model.layers.{i}.mlp.up_proj.weight",
        "ffn.w_out.weight": "model.layers.{i}.mlp.down_proj.weight",
    }
    final_norm = "model.norm.weight"
    EMBEDDING = "model.embed_tokens.weight"
    ACTS = {"gated_gelu": "gelu", "swiglu": "silu"}  # transformers' "gelu" is the exact (erf) GeLU

    def refuse(self, arch: ArchConfig) -> None:
        super().refuse(arch)
        if arch.num_tasks:
            raise UserError(f"model.arch.num_tasks is {arch.num_tasks}: {self.architecture} has no task prompts")

    def ties(self, arch: ArchConfig, read: Read) -> bool:
        # Segment 0's embedding, which every token of plain text carries, is folded into the
        # input embedding: input and output are one tensor only when it is zero.
        return not read("segment_embedding")[0].any()

    def config(self, arch: ArchConfig, tied: bool) -> dict:
        return dict(vocab_size=arch.vocab_size, hidden_size=arch.dim, intermediate_size=arch.ff_dim,
                    num_hidden_layers=arch.num_blocks, num_attention_heads=arch.num_heads,
                    num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, hidden_act=self.ACTS[arch.ffn],
                    max_position_embeddings=arch.max_len, rms_norm_eps=arch.norm_eps,
                    rope_parameters={"rope_type": "default", "rope_theta": arch.rope_base},
                    attention_bias=False, mlp_bias=False, tie_word_embeddings=tied)

    def export_embeddings(self, arch: ArchConfig, read: Read, tied: bool) -> dict[str, tuple[list[int], Make]]:
        s, shape = arch.dim**-0.5, [arch.vocab_size, arch.dim]
        # As CPMAnt.forward computes it for plain text (segment 0 everywhere).
        out = {self.EMBEDDING: (shape, lambda: (read("embedding").float() + read("segment_embedding")[0].float()) * s)}
        if not tied:
            out[self.HEAD] = (shape, lambda: read("embedding").float() * s)
        return out

    def is_tied(self, config: dict, names) -> bool:
        return super().is_tied(config, names) or bool(config.get("tie_word_embeddings", False))

    def to_theirs(self, suffix: str, t: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
        t = super().to_theirs(suffix, t, arch)
        if suffix in ("attn.project_q.weight", "attn.project_k.weight"):
            # Ours turns pairs (x[2i], x[2i+1]); Llama's rotate_half pairs (x[i], x[i + D/2]).
            t = t.unflatten(0, (-1, arch.head_dim))[:, _halves(arch.head_dim)].flatten(0, 1)
        return t

    def arch_fields(self, config: dict, where: str) -> dict:
        c = _Config(config, where)
        act = c.get("hidden_act", "silu")
        ffn = {v: k for k, v in self.ACTS.items()}.get(act)
        if ffn is None:
            raise UserError(f"{where}: hidden_act is {act!r}; expected gelu or silu")
        for key in ("attention_bias", "mlp_bias"):
            if c.get(key, False):
                raise UserError(f"{where}: {key} is true; cpm-lightning's linears have no bias")
        rope = c.get("rope_parameters", None) or c.get("rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise UserError(f"{where}: rope_parameters.rope_type is {rope['rope_type']!r}; expected default (no scaling)")
        heads = c.get("num_attention_heads")
        return dict(position="rotary", ffn=ffn, norm="rmsnorm", vocab_size=c.get("vocab_size"), dim=c.get("hidden_size"),
                    num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
                    head_dim=c.get("head_dim", None) or c.get("hidden_size") // heads, ff_dim=c.get("intermediate_size"),
                    num_attn_layers=c.get("num_hidden_layers"), num_ffn_layers=c.get("num_hidden_layers"),
                    norm_eps=c.get("rms_norm_eps", 1e-6), rope_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
                    max_len=c.get("max_position_embeddings", 2048))

    def import_embeddings(self, arch: ArchConfig, read: Read, where: str, tied: bool) -> Read:
        s = arch.dim**-0.5

        def embedding(name: str) -> torch.Tensor:
            embed = read(self.EMBEDDING).float()
            head = embed if tied else read(self.HEAD).float()
            # The difference of input and output embeddings is segment 0's, the same for every
            # token (what to-hf folds in), or the model is not one with tied embeddings.
            segment = (embed - head).mean(0)
            _check_tied(embed - segment, head, where, self.HEAD, self.EMBEDDING)
            if name == "embedding":
                return head / s
            table = torch.zeros(arch.num_segments, arch.dim)
            table[0] = segment / s
            return table
        return embedding

    def to_ours(self, suffix: str, t: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
        if suffix in ("attn.project_q.weight", "attn.project_k.weight"):
            t = t.unflatten(0, (-1, arch.head_dim))[:, torch.argsort(_halves(arch.head_dim))].flatten(0, 1)
        return super().to_ours(suffix, t, arch)


TARGETS = {"relative_buckets": CpmAnt(), "rotary": Llama()}
BY_ARCHITECTURE = {t.architecture: t for t in TARGETS.values()}


def _halves(head_dim: int) -> torch.Tensor:
    """Row order of one head in Llama's layout: the even rows of ours, then the odd ones."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _unpruned(arch: ArchConfig) -> ArchConfig:
    return dataclasses.replace(arch, num_attn_layers=arch.num_blocks, num_ffn_layers=arch.num_blocks)


def _check_tied(embedding: torch.Tensor, head: torch.Tensor, where: str, head_name: str, embedding_name: str) -> None:
    """A UserError unless `head` equals `embedding` up to float32 rounding: the model ties them."""
    scale = max(float(embedding.abs().max()), float(head.abs().max()), 1e-30)
    if (embedding - head).abs().max() > 8 * torch.finfo(torch.float32).eps * scale:
        raise UserError(f"{where}: {head_name} is not tied to {embedding_name}; cpm-lightning's model uses one "
                        "table for both")


class _Config:
    """A config.json's values; a missing required key or a wrong type is a UserError."""

    def __init__(self, config: dict, where: str):
        self.config, self.where = config, where

    def get(self, key: str, default=...):
        if key not in self.config or self.config[key] is None:
            if default is ...:
                raise UserError(f"{self.where}: config.json has no {key}")
            return default
        return self.config[key]


def preset_of(fields: dict) -> str:
    """The preset whose every value `fields` has (the CPM-Ant sizes), else tiny: an imported
    directory sets every field, so the preset only names it."""
    for name, values in PRESETS.items():
        expected = {**CPM_ANT_DEFAULTS, **values}
        if all(fields.get(k) == v for k, v in expected.items() if k not in ("max_len",)):
            return name
    return "tiny"
