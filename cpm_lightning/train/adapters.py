"""Parameter-efficient tuning of a trained model (`cpm-lightning tune`; docs/tasks.md): LoRA on the
attention and FFN projections, through `peft`, or CPM-Ant's P-tuning of task prompt rows; the
adapter directory `tune` writes (weights, config, a card naming its base by the hash of the
base's weights) and an adapter applied to a base, unmerged or folded into its weights.

No Lightning: `generate`, `evaluate` and `serve --adapter` apply adapters too. peft is imported
only when LoRA is used (it takes seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cpm_lightning.core.errors import UserError, lookup
from cpm_lightning.model import CPMAnt
from cpm_lightning.model.layers import Linear

CONFIG, WEIGHTS, CARD = "adapter.json", "adapter.safetensors", "README.md"
FORMAT = 1
"""The version of adapter.json's layout."""
PROJECTIONS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
"""The Linear projections of CPMAnt's attention and FFN (model/layers.py), LoRA's default targets."""


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """What is tuned; written to adapter.json beside the weights."""

    method: str = "lora"
    """lora: low-rank updates of the `targets` projections; prompt: the prompt rows of `tasks`."""
    rank: int = 8
    """LoRA's rank r."""
    alpha: float = 16.0
    """LoRA's alpha: its update is scaled by alpha / rank."""
    targets: tuple[str, ...] = PROJECTIONS
    """LoRA: the names of the projections it adapts, in every block."""
    tasks: tuple[str, ...] = ("qa",)
    """prompt: the tasks whose prompt rows train (their names, core/tasks.py and data.tasks)."""
    rows: tuple[int, ...] = ()
    """prompt: those tasks' prompt rows (row blocks of prompt_len), filled from the run's data
    (`for_tasks`)."""

    def __post_init__(self):
        lookup(METHODS, self.method, "--method")
        if self.method == "lora" and self.rank < 1:
            raise UserError(f"--rank must be at least 1, got {self.rank}")
        if not self.targets or not self.tasks:
            raise UserError("--targets and --tasks name at least one projection or task")

    def for_tasks(self, task_rows: Mapping[str, int]) -> AdapterConfig:
        """With `rows` from the run's task rows (data.task_rows)."""
        return dataclasses.replace(self, rows=tuple(lookup(dict(task_rows), t, "--tasks task") for t in self.tasks))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets), "tasks": list(self.tasks),
                "rows": list(self.rows)}


# -- LoRA ---------------------------------------------------------------------------------------
def _lora_layer() -> type:
    """peft's LoRA Linear for this project's Linear, which scales its output by `scale`
    (CPM-Ant's init): peft reads in/out features from the weight, and a merged update is divided
    by the scale the base multiplies it by again."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class ScaledLoraLinear(LoraLinear):
        def _get_in_out_features(self, module):
            return module.weight.shape[1], module.weight.shape[0]

        def get_delta_weight(self, adapter):
            return super().get_delta_weight(adapter) / self.get_base_layer().scale

    return ScaledLoraLinear


def _projections(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Linear)}


def _check_lora(model: CPMAnt, cfg: AdapterConfig) -> None:
    names = _projections(model)
    if missing := [t for t in cfg.targets if t not in names]:
        raise UserError(f"--method lora --targets {','.join(cfg.targets)}: the model has no projection named "
                        f"{', '.join(missing)}; its projections: {', '.join(sorted(names))}")


def _attach_lora(model: CPMAnt, cfg: AdapterConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    _check_lora(model, cfg)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets))
    config._register_custom_module({Linear: _lora_layer()})  # peft's API for layers it does not know
    inject_adapter_in_model(config, model)  # B starts at zero: the tuned model starts as the base


def _lora_state(model: CPMAnt) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _load_lora(model: CPMAnt, state: Mapping[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, dict(state))


def _merge_lora(model: CPMAnt) -> None:
    """Fold every LoRA update into its projection's weight and put the plain projection back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


# -- prompt tuning ------------------------------------------------------------------------------
class TaskRows(nn.Module):
    """A parametrization of the prompt embeddings: the tuned tasks' rows are a parameter of
    their own, the others the frozen original, so that AdamW (its weight decay included) never
    touches another task's rows."""

    def __init__(self, original: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.rows = nn.Parameter(original[index].detach().clone())

    def forward(self, original):
        return original.index_copy(0, self.index, self.rows)


def _row_index(model: CPMAnt, cfg: AdapterConfig) -> torch.Tensor:
    L = model.cfg.prompt_len
    return torch.tensor([r * L + i for r in cfg.rows for i in range(L)], dtype=torch.long)


def _check_prompt(model: CPMAnt, cfg: AdapterConfig) -> None:
    n = model.cfg.num_tasks
    if bad := [f"{t} (row {r})" for t, r in zip(cfg.tasks, cfg.rows, strict=True) if r >= n]:
        raise UserError(f"--method prompt --tasks {','.join(cfg.tasks)}: the model has {n} task prompts "
                        f"(model.arch.num_tasks), none for {', '.join(bad)}")


def _attach_prompt(model: CPMAnt, cfg: AdapterConfig) -> None:
    from torch.nn.utils import parametrize

    _check_prompt(model, cfg)
    index = _row_index(model, cfg).to(model.prompt_embedding.device)
    parametrize.register_parametrization(model, "prompt_embedding", TaskRows(model.prompt_embedding, index))


def _prompt_state(model: CPMAnt) -> dict[str, torch.Tensor]:
    return {"prompt_rows": model.parametrizations.prompt_embedding[0].rows.detach()}


def _load_prompt(model: CPMAnt, state: Mapping[str, torch.Tensor]) -> None:
    rows = model.parametrizations.prompt_embedding[0].rows
    with torch.no_grad():
        rows.copy_(state["prompt_rows"])


def _merge_prompt(model: CPMAnt) -> None:
    from torch.nn.utils import parametrize

    parametrize.remove_parametrizations(model, "prompt_embedding", leave_parametrized=True)


@dataclass(frozen=True)
class Method:
    check: Callable[[CPMAnt, AdapterConfig], None]
    """A UserError when the method cannot apply to the model (before anything trains)."""
    attach: Callable[[CPMAnt, AdapterConfig], None]
    """Add the adapter's parameters, initialised so that the model is unchanged."""
    state: Callable[[CPMAnt], dict[str, torch.Tensor]]
    """The adapter's tensors, as saved."""
    load: Callable[[CPMAnt, Mapping[str, torch.Tensor]], None]
    """Load saved tensors into an attached adapter."""
    merge: Callable[[CPMAnt], None]
    """Fold the adapter into the model's own weights, leaving a plain CPMAnt."""


METHODS: dict[str, Method] = {
    "lora": Method(_check_lora, _attach_lora, _lora_state, _load_lora, _merge_lora),
    "prompt": Method(_check_prompt, _attach_prompt, _prompt_state, _load_prompt, _merge_prompt),
}


def check(arch, cfg: AdapterConfig) -> None:
    """`cfg` on a model of `arch` (an ArchConfig), checked on a weightless copy."""
    with torch.device("meta"):
        METHODS[cfg.method].check(CPMAnt(arch), cfg)


def attach(model: CPMAnt, cfg: AdapterConfig) -> None:
    """Freeze `model` and add the adapter's parameters, the only ones left to train."""
    model.requires_grad_(False)
    METHODS[cfg.method].attach(model, cfg)
    if cfg.method == "lora":
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)


def base_shapes(shapes: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """The base's weight shapes, by the base's names, in the shapes of a tuned model's state (a
    `tune` checkpoint): without the adapter's tensors, and with the weights that peft's LoRA layers
    (`.base_layer.`) and the prompt parametrization (`parametrizations.prompt_embedding.original`)
    hold under their own names back under the base's."""
    prompt = "parametrizations.prompt_embedding."
    base = {}
    for name, shape in shapes.items():
        if any(part.startswith("lora_") for part in name.split(".")) or name == f"{prompt}0.rows":
            continue
        base["prompt_embedding" if name == f"{prompt}original" else name.replace(".base_layer.", ".")] = shape
    return base


# -- the adapter directory ----------------------------------------------------------------------
def weights_sha256(names: list[str], read: Callable[[str], torch.Tensor]) -> str:
    """The identity of a base: sha256 of its tensors (name, dtype, shape, bytes; sorted by name),
    read one at a time. The same weights give the same hash whatever holds them (a checkpoint, a
    model directory, a pulled release)."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = read(name).detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_sha256(stored) -> str:
    """The identity of a base model (a checkpoint.modeldir.StoredModel) that adapters are
    checked against."""
    return weights_sha256(list(stored.shapes), stored.read)


def save_adapter(out: Path, model: CPMAnt, cfg: AdapterConfig, base: dict, card: str) -> list[Path]:
    """Write the adapter of `model` into directory `out`: its tensors, adapter.json (the config
    and `base`, the base's sha256 and where it was read) and the card. Returns the files."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in METHODS[cfg.method].state(model).items()}
    save_file(state, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({"format": FORMAT, **cfg.as_dict(), "base": base}, indent=2) + "\n")
    (out / CARD).write_text(card)
    return [out / WEIGHTS, out / CONFIG, out / CARD]


def read_adapter(directory: Path) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(config, base, tensors) of an adapter directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise UserError(f"--adapter {directory}: not an adapter directory (expected {CONFIG} and {WEIGHTS}, "
                        "as `cpm-lightning tune` writes them)")
    try:
        record = json.loads((directory / CONFIG).read_text())
        base = record.pop("base")
        if record.pop("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        fields = {f.name for f in dataclasses.fields(AdapterConfig)}
        if unknown := set(record) - fields:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        cfg = AdapterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--adapter {directory}: {CONFIG} is not an adapter config ({e})") from None
    return cfg, base, load_file(str(directory / WEIGHTS))


def apply_adapter(model: CPMAnt, directory: Path, base_sha256: str, merge: bool = False,
                  any_base: bool = False) -> AdapterConfig:
    """Apply the adapter in `directory` to `model`, whose weights hash to `base_sha256`: an
    adapter tuned on another base, or whose tensors do not fit this model, is a UserError.
    `merge`: fold it into the weights (a plain CPMAnt, as fast as the base). `any_base`: apply
    it to another base too (a nightly release re-scores the applications' adapters on the new
    weights: whether they still work is the question), still refusing tensors that do not fit."""
    cfg, base, state = read_adapter(directory)
    if base.get("sha256") != base_sha256 and not any_base:
        raise UserError(f"--adapter {directory} was tuned on the base with weights sha256 {base.get('sha256')}, "
                        f"not on this one ({base_sha256})")
    method = METHODS[cfg.method]
    method.check(model, cfg)
    attach(model, cfg)
    expected = {k: list(v.shape) for k, v in method.state(model).items()}
    saved = {k: list(v.shape) for k, v in state.items()}
    if expected != saved:
        wrong = sorted(set(expected) ^ set(saved)) or [k for k in expected if expected[k] != saved[k]]
        name = wrong[0]
        raise UserError(f"--adapter {directory}: its tensors do not fit a {cfg.method} adapter of rank {cfg.rank} on "
                        f"this model: {name} is {saved.get(name, 'missing')}, expected {expected.get(name, 'none')}")
    dtype = next(iter(method.state(model).values())).dtype
    method.load(model, {k: v.to(dtype) for k, v in state.items()})
    if merge or cfg.method == "prompt":  # prompt rows are the model's own weights: applying them is merging
        method.merge(model)
    model.eval()
    return cfg
