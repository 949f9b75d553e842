"""Model directories: what a release contains and what `pull` and `generate` load.

    model.safetensors   the weights (keys as in CPMAnt.state_dict())
    config.json         the architecture (ArchConfig fields)
    tokenizer.model     the SentencePiece model
    MODEL_CARD.md       facts about the release, ending with the sha256 of every other file
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cpm_lightning.errors import UserError

from cpm_lightning.generate import CONFIG_FILE as CONFIG
from cpm_lightning.generate import TOKENIZER_FILE as TOKENIZER
from cpm_lightning.generate import WEIGHTS_FILE as WEIGHTS

CARD = "MODEL_CARD.md"
# The card lists hashes in `sha256sum` format, so `sha256sum -c` can check a download too.
HASH_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.M)


@dataclass(kw_only=True)
class TrainedModel:
    """What a release takes from a checkpoint."""

    weights: dict[str, torch.Tensor]
    """Model weights, keys as in CPMAnt.state_dict()."""
    arch: dict
    """ArchConfig fields."""
    tokenizer: bytes
    """The SentencePiece model."""
    step: int
    """Optimizer steps trained."""
    tokens_seen: int
    """Training tokens seen, all ranks together."""
    run_id: str | None
    """The MLflow run that trained it, when the checkpoint recorded one."""


def from_checkpoint(path: str) -> TrainedModel:
    """A TrainedModel from a checkpoint written by `fit`, sharded or a single file."""
    from cpm_lightning.checkpoint import load_weights, tokenizer_of
    from cpm_lightning.tracking.logger import RUN_ID_KEY

    meta, weights = load_weights(Path(path))
    cpm = meta["cpm"]
    return TrainedModel(weights=weights, arch=cpm["arch"], tokenizer=tokenizer_of(path, meta),
                        step=meta.get("global_step", 0), tokens_seen=cpm.get("tokens_seen", 0),
                        run_id=cpm.get(RUN_ID_KEY))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_model_dir(out: Path, trained: TrainedModel, card_body: str) -> None:
    """Write the weights, config, tokenizer and a card (`card_body`, then the file hashes)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.weights.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(trained.arch, indent=2) + "\n")
    (out / TOKENIZER).write_bytes(trained.tokenizer)
    hashes = "\n".join(f"{sha256(out / name)}  {name}" for name in (WEIGHTS, CONFIG, TOKENIZER))
    (out / CARD).write_text(f"{card_body.rstrip()}\n\n## Files (sha256)\n\n```\n{hashes}\n```\n")


def verify_model_dir(path: Path) -> None:
    """A UserError unless every file the card lists is there with its recorded sha256."""
    card = path / CARD
    if not card.is_file():
        raise UserError(f"{path}: no {CARD}; expected a model directory written by `cpm-lightning release`")
    recorded = HASH_LINE.findall(card.read_text())
    if not recorded:
        raise UserError(f"{card}: no sha256 lines; expected '<sha256>  <file>' lines under 'Files (sha256)'")
    for digest, name in recorded:
        file = path / name
        if not file.is_file():
            raise UserError(f"{file}: missing; {CARD} lists it")
        actual = sha256(file)
        if actual != digest:
            raise UserError(f"{file}: sha256 {actual[:16]}... does not match {digest[:16]}... recorded in "
                            f"{CARD}; the file is damaged or was changed")


def check_shapes(path: Path) -> None:
    """A UserError naming the first weight whose shape differs from what config.json builds."""
    from safetensors import safe_open

    from cpm_lightning.model import ArchConfig, CPMAnt

    with torch.device("meta"):
        expected = CPMAnt(ArchConfig(**json.loads((path / CONFIG).read_text()))).state_dict()
    with safe_open(str(path / WEIGHTS), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if key in expected and list(shape) != list(expected[key].shape):
                raise UserError(f"{path / WEIGHTS}: {key} has shape {list(shape)}, but {CONFIG} "
                                f"expects {list(expected[key].shape)}")


def load_release(source: str, device: str = "cpu"):
    """Model and tokenizer from a released model directory, after checking hashes and shapes."""
    from cpm_lightning.generate import load_model_dir

    verify_model_dir(Path(source))
    check_shapes(Path(source))
    return load_model_dir(source, device)
