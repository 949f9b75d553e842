"""The decoding loop every way of prompting a model shares (`generate`'s promptings, a task's
sample): ids picked one at a time with a KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from cpm_lightning.core.errors import UserError
from cpm_lightning.model import CPMAnt, KVCache


@torch.inference_mode()  # around each step of the generator, on whichever thread runs it
def decoded(model: CPMAnt, ids: torch.Tensor, first: dict, later: Callable[[torch.Tensor], dict], extra: int,
            choose: Callable[[torch.Tensor], int], eos_id: int | None) -> Iterator[int]:
    """The ids `model` continues `ids` [1, T] with, one at a time, with a KV cache of its own:
    `ids` read with the forward arguments `first`, each new id x [1, 1] with `later(x)`'s (how a
    prompt is presented: generate.py's PROMPTINGS, a task's sample in tasks.py), each chosen by `choose`
    from the float32 logits; until EOS or until the cache, of T + `extra` positions, is full
    (`extra`: the positions `first` prepends, a task prompt, plus the most new ids)."""
    cache = KVCache(model, 1, ids.shape[1] + extra)
    logits = model(ids, **first, cache=cache)[0, -1]
    while cache.length < cache.max_len:
        if not torch.isfinite(logits).all():  # sampling would fail inside torch.multinomial
            raise UserError("the model's output is not finite (NaN or infinite logits): its weights are damaged")
        token = choose(logits.float())
        if token == eos_id:
            return
        yield token
        if cache.length + 1 == cache.max_len:  # the last id needs no forward pass
            return
        x = torch.tensor([[token]], device=ids.device)
        logits = model(x, **later(x), cache=cache)[0, -1]
