"""Sampling with a KV cache, and loading a trained model for inference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cpm_lightning.errors import UserError
from cpm_lightning.model import ArchConfig, CPMAnt, KVCache
from cpm_lightning.tokenizer import Tokenizer


@torch.inference_mode()
def sample(model: CPMAnt, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           generator: torch.Generator | None = None) -> list[int]:
    """Continue `prompt` by up to `max_new_tokens` ids; temperature 0 is greedy. Stops at EOS."""
    device = model.embedding.device
    room = model.cfg.max_len - len(prompt)
    if not prompt:
        raise UserError("the prompt is empty; expected some text")
    if room <= 0:
        raise UserError(f"the prompt is {len(prompt)} tokens; the model's maximum length is {model.cfg.max_len}")
    max_new_tokens = min(max_new_tokens, room)
    cache = KVCache(model, 1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = _pick(logits.float(), temperature, top_k, top_p, generator)
        if token == eos_id:
            break
        out.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    return out


def _pick(logits, temperature, top_k, top_p, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def model_from_state(arch: dict, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> CPMAnt:
    """A CPMAnt in eval mode from its arch dict and weights (keys without the `model.` prefix)."""
    model = CPMAnt(ArchConfig(**arch))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"weights do not fit the architecture: {str(e).splitlines()[-1].strip()}") from None
    return model.to(device).eval()


# A model directory, as `cpm-lightning checkpoint consolidate` writes it.
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"


def load_model_dir(path: str, device: str = "cpu") -> tuple[CPMAnt, Tokenizer]:
    """Model and tokenizer from a model directory: safetensors weights, config.json (the arch),
    tokenizer.model."""
    from safetensors.torch import load_file

    root = Path(path)
    missing = [f for f in (CONFIG_FILE, TOKENIZER_FILE) if not (root / f).is_file()]
    if missing:
        raise UserError(f"{path}: the model directory has no {missing[0]}")
    arch = json.loads((root / CONFIG_FILE).read_text())
    tokenizer = Tokenizer((root / TOKENIZER_FILE).read_bytes(), str(root / TOKENIZER_FILE))
    return model_from_state(arch, load_file(root / WEIGHTS_FILE), device), tokenizer


def _load_checkpoint(path: str, device: str = "cpu") -> tuple[CPMAnt, Tokenizer]:
    from cpm_lightning.checkpoint import load_for_inference  # imports Lightning: only when needed

    return load_for_inference(path, device)


def _load_registered(uri: str, device: str = "cpu") -> tuple[CPMAnt, Tokenizer]:
    from cpm_lightning.tracking.models import load_registered  # imports MLflow: only when needed

    return load_registered(uri, device)


def _load_release(path: str, device: str = "cpu") -> tuple[CPMAnt, Tokenizer]:
    from cpm_lightning.tracking.modeldir import load_release

    return load_release(path, device)


def load_for_inference(source: str, device: str = "cpu") -> tuple[CPMAnt, Tokenizer]:
    """Model and tokenizer from any place a trained model can be: see INFERENCE_LOADERS."""
    for accepts, loader in INFERENCE_LOADERS:
        if accepts(source):
            return loader(source, device)
    raise UserError(f"{source!r} is not a checkpoint file or model directory")


# (predicate, loader) pairs, first match wins; sharded checkpoints, model directories and
# models:/ URIs register themselves here.
INFERENCE_LOADERS = [
    (lambda s: s.startswith("models:/"), _load_registered),
    (lambda s: (Path(s) / "MODEL_CARD.md").is_file(), _load_release),  # verified against its sha256 lines
    (lambda s: (Path(s) / WEIGHTS_FILE).is_file(), load_model_dir),
    # A checkpoint file, a sharded checkpoint directory (meta.pt is Lightning's name), or a path
    # that does not exist (the checkpoint loader says so).
    (lambda s: Path(s).is_file() or not Path(s).exists() or (Path(s) / "meta.pt").is_file(), _load_checkpoint),
]
