"""`convert to-hf` and `convert from-hf`: a model of this project <-> a Hugging Face directory
that `transformers.AutoModelForCausalLM` and `AutoTokenizer` open with no extra code. Weights
stream one tensor at a time, into safetensors shards of at most 5 GB with an index above that,
so converting a 10B model never holds two copies of it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cpm_lightning.checkpoint.modeldir import SafetensorsFile, StoredModel, TensorSpec, model_shapes, write_safetensors
from cpm_lightning.core.errors import UserError
from cpm_lightning.inference.hf.mapping import BY_ARCHITECTURE, TARGETS, CpmAnt, Target, preset_of
from cpm_lightning.inference.hf.tokenizer_files import check_vocab, read_tokenizer, special_ids, write_tokenizer_files
from cpm_lightning.model import ArchConfig

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size
CARD = "README.md"
SUPPORTED = " or ".join(BY_ARCHITECTURE)


def require_transformers() -> None:
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("converting to or from Hugging Face needs transformers; install cpm-lightning[hf]") from None


# -- to-hf ------------------------------------------------------------------------------------
def hf_target(arch: dict) -> Target:
    """The architecture `arch` is written as; a UserError naming the field if none can express it."""
    resolved = ArchConfig(**arch).resolved()
    target = TARGETS[resolved.position]
    target.refuse(resolved)
    return target


def write_hf(stored: StoredModel, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write the Hugging Face layout of `stored` into the directory `out`."""
    require_transformers()
    from transformers import AutoConfig, GenerationConfig

    arch = ArchConfig(**stored.arch).resolved()
    target = hf_target(stored.arch)
    tokenizer = stored.require_tokenizer()
    check_vocab(tokenizer, arch.vocab_size, stored.where)
    fields, specs, make = target.plan(arch, stored.read, set(stored.shapes))
    files = write_shards(out, specs, lambda name: make[name](), max_shard_bytes)
    ids = special_ids(tokenizer)
    config = AutoConfig.for_model(target.model_type, architectures=[target.architecture], dtype="float32", **fields, **ids)
    config.save_pretrained(out)
    GenerationConfig(**ids).save_pretrained(out)
    files += write_tokenizer_files(tokenizer, out)
    (out / CARD).write_text(_card(target, arch, stored.where))
    return files + [out / "config.json", out / "generation_config.json", out / CARD]


def write_shards(out: Path, specs: Sequence[TensorSpec], make: Callable[[str], torch.Tensor],
                 max_shard_bytes: int) -> list[Path]:
    """Safetensors shards of at most `max_shard_bytes` (a larger tensor gets one of its own),
    each tensor made when its turn comes; with more than one shard, the index."""
    shards: list[list[TensorSpec]] = [[]]
    for spec in specs:
        if shards[-1] and sum(s.nbytes for s in shards[-1]) + spec.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(spec)
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(out / name, shard, (make(s.name) for s in shard))
    if len(shards) == 1:
        return [out / WEIGHTS]
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
             "weight_map": {s.name: name for name, shard in zip(names, shards, strict=True) for s in shard}}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [out / n for n in (*names, INDEX)]


def _card(target: Target, arch: ArchConfig, source: str) -> str:
    convention = ""
    if isinstance(target, CpmAnt):
        convention = (
            "\n`CpmAntForCausalLM` reads every input the way CPM-Ant generates: the prompt of task 2 first (when "
            "the model has task prompts), the text in segment 2, and all of the given text as context that every "
            "position sees; padding (id 0) on the left. `cpm-lightning generate --prompting cpm-ant` computes "
            "the same.\n")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [cpm-lightning, {target.model_type}]
---

# {Path(source).name}

A {arch.preset}-shaped language model trained with cpm-lightning (a CPM-Ant-style trainer), written
as `{target.architecture}` by `cpm-lightning convert to-hf` from `{source}`. Its logits are those
of the cpm-lightning model it came from.
{convention}
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tokenizer = AutoModelForCausalLM.from_pretrained(PATH), AutoTokenizer.from_pretrained(PATH)
print(tokenizer.decode(model.generate(**tokenizer("Once upon a time", return_tensors="pt"), max_new_tokens=20)[0]))
```

`cpm-lightning convert from-hf PATH DIR` reads it back.
"""


# -- from-hf ----------------------------------------------------------------------------------
class HFWeights:
    """The tensors of a Hugging Face directory (safetensors or PyTorch files, sharded or not),
    each read when asked for."""

    FILES = (WEIGHTS, INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")

    def __init__(self, root: Path):
        self.root = root
        found = next((name for name in self.FILES if (root / name).is_file()), None)
        if found is None:
            raise UserError(f"{root}: no weights; expected {', '.join(self.FILES)}")
        if found.endswith(".index.json"):
            files = self._indexed(root / found)
        else:
            files = [found]
        self.files = {f: self._open(root / f) for f in files}
        self.where = {name: f for f, opened in self.files.items() for name in opened[0]}

    @staticmethod
    def _indexed(index: Path) -> list[str]:
        """The weight files an index names: plain names of files in its directory (a path
        outside it would read any file the user can)."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise UserError(f"{index}: not a readable index ({type(e).__name__}); expected a JSON object whose "
                            "weight_map maps each tensor to a file") from None
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise UserError(f"{index}: names {name!r}, not a file in {index.parent}; an index names the "
                                "weight files beside it")
        return files

    @staticmethod
    def _open(path: Path) -> tuple[dict[str, list[int]], Callable[[str], torch.Tensor]]:
        if path.suffix == ".safetensors":
            f = SafetensorsFile(path)
            return f.shapes, f.read
        try:  # a file torch.save wrote: memory-mapped, each tensor read when touched
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
            raise UserError(f"{path}: not a readable PyTorch weights file ({type(e).__name__})") from None
        return {k: list(v.shape) for k, v in state.items()}, state.__getitem__

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {name: shape for shapes, _ in self.files.values() for name, shape in shapes.items()}

    def read(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise UserError(f"{self.root}: no weight {name}; its config.json describes a model that has one")
        return self.files[self.where[name]][1](name)


def read_hf_config(hf_dir: Path) -> tuple[dict, Target]:
    """Its config.json and the architecture it is; a UserError for any other architecture."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    names = config.get("architectures") or [config.get("model_type", "an unnamed architecture")]
    target = BY_ARCHITECTURE.get(names[0]) or {t.model_type: t for t in TARGETS.values()}.get(names[0])
    if target is None:
        raise UserError(f"{hf_dir}: a {names[0]} model; convert from-hf reads {SUPPORTED}")
    return config, target


def read_hf(hf_dir: Path) -> StoredModel:
    """A Hugging Face directory as a model of this project, its weights converted one at a time."""
    hf_dir = Path(hf_dir)
    config, target = read_hf_config(hf_dir)
    where = str(hf_dir)
    weights = HFWeights(hf_dir)
    tokenizer = read_tokenizer(hf_dir)
    fields = target.arch_fields(config, where)
    full = ArchConfig(**fields).resolved()
    _check_hf_shapes(target, full, weights.shapes, where)
    fields = target.pruned(fields, weights.read)
    arch = ArchConfig(preset=preset_of(fields), **fields).resolved().to_dict()
    check_vocab(tokenizer, arch["vocab_size"], where)
    read = target.importer(ArchConfig(**arch), weights.read, where, target.is_tied(config, weights.shapes))
    shapes = model_shapes(arch)
    return StoredModel(arch=arch, shapes=shapes, dtypes=dict.fromkeys(shapes, torch.float32), read=read,
                       tokenizer=tokenizer, where=where)


def _check_hf_shapes(target: Target, arch: ArchConfig, found: dict[str, list[int]], where: str) -> None:
    """A UserError naming the first tensor that is missing or has another shape than config.json
    implies (the output embedding may be missing: tied)."""
    zeros = model_shapes(arch)
    _, specs, _ = target.plan(arch, lambda name: torch.zeros(zeros[name]), set(zeros))
    for spec in specs:
        if spec.name == target.HEAD and spec.name not in found:
            continue  # tied to the input embedding
        if spec.name not in found:
            raise UserError(f"{where}: no weight {spec.name}; its config.json describes a model that has one")
        if list(found[spec.name]) != list(spec.shape):
            raise UserError(f"{where}: {spec.name} has shape {list(found[spec.name])}, but its config.json "
                            f"implies {list(spec.shape)}")
