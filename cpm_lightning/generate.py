"""Sampling with a KV cache. Loading a model is `cpm_lightning.load`'s job."""

from __future__ import annotations

import torch

from cpm_lightning.errors import UserError
from cpm_lightning.model import CPMAnt, KVCache


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
