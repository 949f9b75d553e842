"""Migrations: a model in training grows into a new architecture and keeps what it learned
(docs/ARCHITECTURE.md, "Migrations").

Each migration changes one `model.arch` field, taking the weights and AdamW state of the old
architecture to those of the new one:

  max_len, split_qk_scale  no parameter changes: the same weights compute the same function
  grow_num_tasks           new rows of the task prompt embeddings drawn as the init draws them,
                           N(0, 0.02^2) (a model without prompts gains the table): every old
                           task's prompt and plain text compute what they did
  grow_ff_dim              new rows of w_0 and w_1 drawn as the init draws them, new columns of w_out zero
  add_attention_layers     attention sublayers in the blocks that lack one, then new blocks on top:
  add_ffn_layers           output projection zero and norm one, so the residual stream is unchanged
  pool_kv_heads            fewer key/value heads, each the mean of a group (the GQA paper's
                           uptraining, Ainslie et al. 2023): NOT exact, the loss jumps

CPM-Ant's linears scale their output by 1/sqrt(d_in) in the forward pass, so a linear whose input
widens (w_out, when ff_dim grows) would compute less from the same weights: its old columns are
multiplied by sqrt(new/old) to compensate. The gradient of a weight so rescaled is that much
smaller, so AdamW's moments are divided accordingly.

AdamW's state follows each tensor: carried when unchanged, zero-extended where it grows, pooled
where it is pooled, and zero with a step count of 0 for a new tensor (its first update is then
bias-corrected as in a fresh optimizer). New weights are drawn from a generator seeded by their
name and the step, so every rank, and a run that redoes the migration after a crash, draws the
same ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cpm_lightning.core.errors import UserError

PROMPT_INIT_STD = 0.02  # CPM-Ant's init of its embeddings (CPMAnt.init_weights)
Moments = dict[str, torch.Tensor]  # AdamW's state of one parameter: exp_avg, exp_avg_sq, step


@dataclass
class TrainState:
    """A model's weights and AdamW state as full tensors, by CPMAnt parameter name."""

    arch: dict[str, Any]
    """The resolved architecture (ArchConfig.resolved().to_dict())."""
    weights: dict[str, torch.Tensor]
    moments: dict[str, Moments]
    """AdamW's state by parameter name; empty for a model without an optimizer."""
    step: int
    """The optimizer step it is migrated at (seeds the new weights)."""

    def set(self, name: str, weight: torch.Tensor,
            moments: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Replace parameter `name`; `moments(key, moment)` maps each of its AdamW moments
        (None: a new parameter, whose moments start at zero and whose step count at 0)."""
        self.weights[name] = weight
        old = self.moments.get(name)
        if moments is not None and old is not None:
            self.moments[name] = {k: v if k == "step" else moments(k, v) for k, v in old.items()}
        elif self.moments:
            step = next(iter(self.moments.values()))["step"]
            self.moments[name] = {"exp_avg": torch.zeros_like(weight), "exp_avg_sq": torch.zeros_like(weight),
                                  "step": torch.zeros_like(step)}

    def draw(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """N(0, 1), the init of CPM-Ant's linears, the same wherever it is drawn."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{name}@{self.step}".encode()))
        return torch.randn(shape, generator=generator)


# -- the migrations -------------------------------------------------------------------------------
def _unchanged(state: TrainState, old: dict, new: dict) -> None:
    pass


def _grow_num_tasks(state: TrainState, old: dict, new: dict) -> None:
    # Task t's prompt is rows t*prompt_len .. (t+1)*prompt_len - 1 (CPMAnt._embed): appended rows
    # leave every old task's rows where they were.
    name, d = "prompt_embedding", old["dim"]
    extra = (new["num_tasks"] - old["num_tasks"]) * old["prompt_len"]
    rows = PROMPT_INIT_STD * state.draw(name, (extra, d))
    if not old["num_tasks"]:  # a new parameter: fresh AdamW moments, step count 0
        state.set(name, rows)
        return
    state.set(name, torch.cat([state.weights[name], rows]), lambda key, m: torch.cat([m, m.new_zeros(extra, d)]))


def _grow_ff_dim(state: TrainState, old: dict, new: dict) -> None:
    d, extra, c = old["dim"], new["ff_dim"] - old["ff_dim"], (new["ff_dim"] / old["ff_dim"]) ** 0.5

    def rows(key: str, m: torch.Tensor) -> torch.Tensor:
        return torch.cat([m, m.new_zeros(extra, d)])

    def columns(key: str, m: torch.Tensor) -> torch.Tensor:
        # The weight is multiplied by c, so its gradient is divided by c and its square by c^2.
        return torch.cat([m / (c if key == "exp_avg" else c * c), m.new_zeros(d, extra)], dim=1)

    for i in range(old["num_ffn_layers"]):
        for w in ("w_0", "w_1"):
            name = f"blocks.{i}.ffn.{w}.weight"
            state.set(name, torch.cat([state.weights[name], state.draw(name, (extra, d))]), rows)
        name = f"blocks.{i}.ffn.w_out.weight"
        # Zero columns: the new hidden units add nothing to the residual stream until trained.
        state.set(name, torch.cat([state.weights[name] * c, state.weights[name].new_zeros(d, extra)], dim=1), columns)


def _add_attention(state: TrainState, old: dict, new: dict) -> None:
    d, q, kv = new["dim"], new["num_heads"] * new["head_dim"], new["num_kv_heads"] * new["head_dim"]
    for i in range(old["num_attn_layers"], new["num_attn_layers"]):
        p = f"blocks.{i}."
        state.set(p + "attn_norm.weight", torch.ones(d))
        for proj, rows in (("project_q", q), ("project_k", kv), ("project_v", kv)):
            state.set(f"{p}attn.{proj}.weight", state.draw(f"{p}attn.{proj}.weight", (rows, d)))
        state.set(p + "attn.attention_out.weight", torch.zeros(d, q))


def _add_ffn(state: TrainState, old: dict, new: dict) -> None:
    d, f = new["dim"], new["ff_dim"]
    for i in range(old["num_ffn_layers"], new["num_ffn_layers"]):
        p = f"blocks.{i}."
        state.set(p + "ffn_norm.weight", torch.ones(d))
        for w in ("w_0", "w_1"):
            state.set(f"{p}ffn.{w}.weight", state.draw(f"{p}ffn.{w}.weight", (f, d)))
        state.set(p + "ffn.w_out.weight", torch.zeros(d, f))


def _pool_kv_heads(state: TrainState, old: dict, new: dict) -> None:
    # Query head h reads key/value head h // (num_heads / num_kv_heads): new head j stands for
    # the consecutive old heads j*g .. j*g + g - 1.
    g = old["num_kv_heads"] // new["num_kv_heads"]

    def pool(key: str, t: torch.Tensor) -> torch.Tensor:
        return t.view(new["num_kv_heads"], g, old["head_dim"], -1).mean(1).flatten(0, 1)

    for i in range(old["num_attn_layers"]):
        for proj in ("project_k", "project_v"):
            name = f"blocks.{i}.attn.{proj}.weight"
            state.set(name, pool("weight", state.weights[name]), pool)


def _grows(old, new) -> str | None:
    return None if new > old else f"a migration only grows it ({old} -> {new} would drop what the model learned)"


def _any(old, new) -> str | None:
    return None


def _pools(old, new) -> str | None:
    if new < old and old % new == 0:
        return None
    return f"a migration only pools key/value heads into fewer groups of equal size ({old} -> {new})"


@dataclass(frozen=True)
class Migration:
    key: str
    """The model.arch field it changes."""
    exact: bool
    """Whether the model computes the same function after it (up to float rounding)."""
    refuses: Callable[[Any, Any], str | None]
    """(old value, new value) -> why it cannot, or None."""
    apply: Callable[[TrainState, dict, dict], None]
    """(state, old resolved arch, new resolved arch): changes the state in place."""


# In the order they apply: heads are pooled before attention layers are added and ff_dim grows
# before FFN layers are, so that new sublayers are built in the new shape.
MIGRATIONS: dict[str, Migration] = {
    "max_len": Migration("max_len", True, _any, _unchanged),
    "split_qk_scale": Migration("split_qk_scale", True, _any, _unchanged),
    "grow_num_tasks": Migration("num_tasks", True, _grows, _grow_num_tasks),
    "pool_kv_heads": Migration("num_kv_heads", False, _pools, _pool_kv_heads),
    "grow_ff_dim": Migration("ff_dim", True, _grows, _grow_ff_dim),
    "add_attention_layers": Migration("num_attn_layers", True, _grows, _add_attention),
    "add_ffn_layers": Migration("num_ffn_layers", True, _grows, _add_ffn),
}
_BY_KEY = {m.key: name for name, m in MIGRATIONS.items()}
_NEXT_GENERATION = "it changes what every layer computes and belongs to the next model generation"
_WHY_NONE = {
    "position": _NEXT_GENERATION, "ffn": _NEXT_GENERATION, "norm": _NEXT_GENERATION, "attention": _NEXT_GENERATION,
    "vocab_size": "a new vocabulary is a new tokenizer: it belongs to the next model generation",
}


def why_none(key: str) -> str | None:
    """Why no migration changes model.arch field `key`; None when one may (depending on the values)."""
    if key in _BY_KEY or key == "preset":
        return None
    return _WHY_NONE.get(key, "no migration changes it; it waits for the next model generation")


@dataclass(frozen=True)
class Step:
    """One migration of a plan, with the values it takes its field between."""

    name: str
    key: str
    old: Any
    new: Any
    exact: bool

    def __str__(self) -> str:
        return f"{self.name} (model.arch.{self.key} {self.old} -> {self.new}{'' if self.exact else ', not exact'})"

    def as_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "old": self.old, "new": self.new, "exact": self.exact}


def migration_text(record: dict) -> str:
    """A Step.as_dict() record (as checkpoints and the ledger keep them) in words."""
    return str(Step(**{k: record[k] for k in ("name", "key", "old", "new", "exact")}))


class NoMigration(UserError):
    """No migration takes the model to the asked architecture."""


def plan(old: dict, new: dict) -> list[Step]:
    """The migrations that take a model of resolved architecture `old` to `new`, in the order
    they apply; NoMigration names the first field that none can change, and why."""
    steps = []
    for key in sorted(set(old) | set(new)):
        if key == "preset" or old.get(key) == new.get(key):  # the preset's values are in the others
            continue
        name = _BY_KEY.get(key)
        why = MIGRATIONS[name].refuses(old[key], new[key]) if name else why_none(key)
        if why:
            raise NoMigration(f"model.arch.{key} {old.get(key)!r} -> {new.get(key)!r}: {why}")
        steps.append(Step(name, key, old[key], new[key], MIGRATIONS[name].exact))
    order = list(MIGRATIONS)
    return sorted(steps, key=lambda s: order.index(s.name))


def migrate(state: TrainState, steps: list[Step]) -> None:
    """Apply `steps` (plan's) to `state` in place."""
    for s in steps:
        new = {**state.arch, s.key: s.new}
        MIGRATIONS[s.name].apply(state, state.arch, new)
        state.arch = new
