"""The model directory: what `checkpoint consolidate` and `release` write and what `generate`,
`pull` and the MLflow model load (docs/ARCHITECTURE.md, "Releases").

    model.safetensors   the weights (keys as in CPMAnt.state_dict())
    config.json         the architecture (ArchConfig fields)
    tokenizer.model     the SentencePiece model
    MODEL_CARD.md       releases only: facts about the release, ending with the sha256 of every
                        other file (for `sha256sum -c` and to catch damage on disk; a pulled
                        release is trusted for its manifest, cpm_lightning/tracking/integrity.py)

One place for the format: file names, writing, verifying, and the check that weights fit an
architecture. No Lightning, no MLflow.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cpm_lightning.errors import UserError
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.tokenizer import Tokenizer

WEIGHTS, CONFIG, TOKENIZER, CARD = "model.safetensors", "config.json", "tokenizer.model", "MODEL_CARD.md"
# The card lists hashes in `sha256sum` format, so `sha256sum -c` can check a download too.
HASH_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.M)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shapes(saved: Mapping[str, Sequence[int]], arch: dict | ArchConfig, where: str, expected_by: str) -> None:
    """A UserError naming the first weight that is missing from `saved`, has another shape than
    the model `arch` builds, or is not in that model. `where` names the weights, `expected_by`
    what the architecture came from."""
    arch = arch if isinstance(arch, ArchConfig) else ArchConfig(**arch)
    with torch.device("meta"):
        expected = {name: list(t.shape) for name, t in CPMAnt(arch).state_dict().items()}
    for name, shape in expected.items():
        if name not in saved:
            raise UserError(f"{where}: {name} {shape} is missing; {expected_by} expects it")
        if list(saved[name]) != shape:
            raise UserError(f"{where}: {name} has shape {list(saved[name])}, but {expected_by} expects {shape}")
    extra = sorted(saved.keys() - expected.keys())
    if extra:
        raise UserError(f"{where}: {extra[0]} is not a weight of the model {expected_by} describes")


def model_from_state(arch: dict, weights: dict[str, torch.Tensor], where: str, device: str = "cpu") -> CPMAnt:
    """A CPMAnt in eval mode from its arch dict and weights (keys as in CPMAnt.state_dict())."""
    check_shapes({k: v.shape for k, v in weights.items()}, arch, where, "its architecture")
    model = CPMAnt(ArchConfig(**arch))
    model.load_state_dict(weights)
    return model.to(device).eval()


def write_model_dir(out: Path, weights: dict[str, torch.Tensor], arch: dict, tokenizer: bytes | None,
                    card_body: str | None = None) -> list[Path]:
    """Write weights, config and tokenizer (when there is one) into `out`; with `card_body`, also
    the card: the body, then the sha256 of every file written. Returns the files written."""
    from safetensors.torch import save_file

    out = Path(out)
    files = {WEIGHTS: None, CONFIG: json.dumps(arch, indent=2) + "\n", TOKENIZER: tokenizer}
    files = {name: content for name, content in files.items() if name == WEIGHTS or content is not None}
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS), metadata={"format": "pt"})
        for name, content in files.items():
            if name != WEIGHTS:
                (out / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        if card_body is not None:
            hashes = "\n".join(f"{sha256(out / name)}  {name}" for name in files)
            (out / CARD).write_text(f"{card_body.rstrip()}\n\n## Files (sha256)\n\n```\n{hashes}\n```\n")
    except OSError as e:
        raise UserError(f"cannot write the model directory {out}: {e.strerror or e}") from None
    return [out / name for name in (*files, *([CARD] if card_body is not None else []))]


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


def load_model_dir(path: str | Path, device: str = "cpu") -> tuple[CPMAnt, Tokenizer]:
    """Model and tokenizer from a model directory; a released one (with a card) is verified
    against its hashes first."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    root = Path(path)
    if (root / CARD).is_file():
        verify_model_dir(root)
    missing = [f for f in (CONFIG, TOKENIZER) if not (root / f).is_file()]
    if missing:
        raise UserError(f"{path}: the model directory has no {missing[0]}")
    arch = json.loads((root / CONFIG).read_text())
    with safe_open(str(root / WEIGHTS), "pt") as f:  # shapes from the header, before any tensor is read
        check_shapes({k: f.get_slice(k).get_shape() for k in f.keys()}, arch, str(root / WEIGHTS), CONFIG)
    tokenizer = Tokenizer((root / TOKENIZER).read_bytes(), str(root / TOKENIZER))
    return model_from_state(arch, load_file(root / WEIGHTS), str(root / WEIGHTS), device), tokenizer
