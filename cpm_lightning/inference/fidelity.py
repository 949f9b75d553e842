"""How closely a converted model (a release's quantized variant, its Hugging Face export, a GGUF
file) computes what the float32 model computes, on the prompt book: the figures of a release
card's fidelity lines, so a conversion that loads but talks nonsense shows in the card.

For each prompt, S is the prompt followed by its float32 greedy continuation (at most the
prompt's max_tokens new tokens; it stops at EOS). Each model reads S in one forward pass. Over the
positions from the prompt's last token to the end of S (the prediction of each continuation
token and of the token after the last), of every prompt together:

    max |Δlogit|   the largest absolute difference between the model's logits and float32's
    agreement      the fraction of those positions where the model's argmax is float32's

Each model is given as a function of the ids (a logits function), so any runtime can be
measured: a CPMAnt at some precision (`model_logits`), `transformers`, llama.cpp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.inference.book import Prompt
from cpm_lightning.inference.generate import book_tokens, default_prompting, prompt_inputs, sample
from cpm_lightning.model import CPMAnt

DEFINITION = (
    "each prompt of the book followed by its float32 greedy continuation (at most its max_tokens new tokens, to EOS) "
    "is read by both models in one forward pass; over the positions from the prompt's last token to the end (the "
    "prediction of each continuation token and of the token after the last), of every prompt together, max |Δlogit| "
    "is the largest absolute difference between the model's logits and float32's, and greedy-token agreement the "
    "fraction of those positions where the model's most likely token is float32's")
"""The definition of the figures, for the card."""

Logits = Callable[[torch.Tensor], torch.Tensor]
"""ids [1, T] (on the CPU) -> logits [T, V]."""


@dataclass(frozen=True)
class Reference:
    """The float32 model's side of the comparison."""

    sequences: list[torch.Tensor]
    """S of each prompt, [1, T]."""
    starts: list[int]
    """Index in S of each prompt's last token: the first position compared."""
    logits: list[torch.Tensor]
    """float32's logits at the compared positions of each S, [T - start, V], on the CPU."""


@dataclass(frozen=True)
class Fidelity:
    name: str
    """What was compared with float32: int8, int4, hf, gguf q8_0, ..."""
    max_logit_diff: float
    agreement: float
    positions: int
    """Positions compared, over every prompt."""

    def line(self) -> str:
        return (f"{self.name}: max |Δlogit| {self.max_logit_diff:.4f}, greedy-token agreement "
                f"{self.agreement:.1%} ({round(self.agreement * self.positions)}/{self.positions} positions)")

    def tags(self) -> dict[str, str]:
        """Model-version tags: fidelity/<name>/max_logit_diff and fidelity/<name>/agreement."""
        return {f"fidelity/{self.name}/max_logit_diff": f"{self.max_logit_diff:.4f}",
                f"fidelity/{self.name}/agreement": f"{self.agreement:.4f}"}


def model_logits(model: CPMAnt, prompting: str | None = None) -> Logits:
    """The logits function of a CPMAnt, its input presented as `prompting` says (unset: the
    model's default, as `generate` presents it)."""
    prompting = prompting or default_prompting(model.cfg)
    device = model.embedding.device

    @torch.inference_mode()
    def logits(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        return model(ids, **prompt_inputs(model, ids, prompting))[0]
    return logits


def greedy_paths(model: CPMAnt, tokenizer: Tokenizer, prompts: list[Prompt]) -> list[tuple[list[int], list[int]]]:
    """(the tokens of each prompt, its greedy continuation by `model`), as the prompt book's
    completions are made (a prompt that does not fit the model is a UserError)."""
    tokens, problems = book_tokens(prompts, tokenizer, model.cfg)
    if problems:
        raise UserError(problems[0])
    return [(ids, sample(model, ids, p.max_tokens, temperature=0, eos_id=tokenizer.eos_id))
            for p, ids in zip(prompts, tokens, strict=True)]


def reference(float32: Logits, paths: list[tuple[list[int], list[int]]]) -> Reference:
    """The float32 side, from its logits function and the greedy paths."""
    sequences = [torch.tensor([ids + new]) for ids, new in paths]
    starts = [len(ids) - 1 for ids, _ in paths]
    return Reference(sequences, starts, [float32(s)[start:].float().cpu() for s, start in zip(sequences, starts,
                                                                                               strict=True)])


def measure(name: str, logits: Logits, ref: Reference) -> Fidelity:
    """The fidelity of the model whose logits function is `logits` against `ref`."""
    worst, agree, total = 0.0, 0, 0
    for sequence, start, expected in zip(ref.sequences, ref.starts, ref.logits, strict=True):
        got = logits(sequence)[start:].float().cpu()
        if got.shape != expected.shape:
            raise UserError(f"fidelity of {name}: logits of shape {list(got.shape)}, float32's are "
                            f"{list(expected.shape)}; expected the same vocabulary")
        diff = float((got - expected).abs().max())
        worst = max(worst, diff) if math.isfinite(diff) else math.inf  # NaN would lose to any number
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += expected.shape[0]
    return Fidelity(name, worst, agree / total if total else 1.0, total)
