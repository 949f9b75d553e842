"""Sampling with a KV cache, and how a prompt is presented to the model. Loading a model is
`cpm_lightning.cli.loader`'s job."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tasks import input_text
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.inference import tasks
from cpm_lightning.inference.book import Prompt
from cpm_lightning.inference.decode import decoded
from cpm_lightning.model import ArchConfig, CPMAnt

# causal: plain text as `fit` trains on it (segment 0, causal attention, no task prompt).
# cpm-ant: as CPM-Ant generates, and as transformers' CpmAntForCausalLM reads every input: the
# prompt of task 2 first (when the model has task prompts), the text in segment 2, and all of
# the given text context (every position sees it); padding in segment 0.
PROMPTINGS = ("causal", "cpm-ant")
CPM_ANT_TASK = CPM_ANT_TEXT_SEGMENT = 2


def default_prompting(arch: ArchConfig) -> str:
    """cpm-ant for a model with CPM-Ant's task prompts (an imported CPM-Ant), causal otherwise."""
    return "cpm-ant" if arch.position == "relative_buckets" and arch.num_tasks > CPM_ANT_TASK else "causal"


def task_prompt_len(cfg: ArchConfig, prompting: str | None = None) -> int:
    """Positions the task prompt takes before the text when `prompting` presents it (`sample`
    counts them against the maximum length)."""
    return cfg.prompt_len if (prompting or default_prompting(cfg)) == "cpm-ant" and cfg.num_tasks else 0


def prompt_inputs(model: CPMAnt, input_ids: torch.Tensor, prompting: str, attention_mask: torch.Tensor | None = None,
                  first: bool = True) -> dict:
    """The keyword arguments of CPMAnt.forward that present `input_ids` [B, T] as `prompting`
    says; attention_mask [B, T] is False at (left) padding. `first`: the start of a sequence
    (later tokens continuing a cache get no prompt)."""
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    if prompting == "causal":
        return kwargs
    B, T = input_ids.shape
    segment = torch.full_like(input_ids, CPM_ANT_TEXT_SEGMENT)
    if attention_mask is not None:
        segment = segment.masked_fill(~attention_mask, 0)
    kwargs.update(segment_ids=segment, context=torch.ones(B, T, dtype=torch.bool, device=input_ids.device))
    if first and model.cfg.num_tasks:
        kwargs["task"] = torch.full((B,), CPM_ANT_TASK, device=input_ids.device)
    return kwargs


def sample(model: CPMAnt, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           generator: torch.Generator | None = None, prompting: str | None = None) -> list[int]:
    """Continue `prompt` by up to `max_new_tokens` ids; temperature 0 is greedy. Stops at EOS.
    `prompting`: one of PROMPTINGS; unset, the model's default_prompting. Callers check
    user-given settings with `check_sampling` first."""
    return list(tokens(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, generator, prompting))


def tokens(model: CPMAnt, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           generator: torch.Generator | None = None, prompting: str | None = None) -> Iterator[int]:
    """`sample`'s ids one at a time, each as soon as it is picked (`serve` streams them), with a
    KV cache of the call's own. The prompt is checked here, at the call, not at the first id.
    Closing the iterator early stops the generation and frees its cache."""
    prompting = prompting or default_prompting(model.cfg)
    max_new_tokens = min(max_new_tokens, room(model.cfg, prompt, prompting))
    return _tokens(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, generator, prompting)


def room(cfg: ArchConfig, prompt: list[int], prompting: str | None = None, reserved: int | None = None) -> int:
    """How many new ids fit after `prompt` (and the task prompt `prompting` presents, or the
    `reserved` positions a task's prompt takes) within the model's maximum length; a UserError
    when the prompt is empty or leaves no room."""
    if not prompt:
        raise UserError("the prompt is empty; expected some text")
    left = cfg.max_len - len(prompt) - (task_prompt_len(cfg, prompting) if reserved is None else reserved)
    if left <= 0:
        raise UserError(f"the prompt is {len(prompt)} tokens; the model's maximum length is {cfg.max_len}")
    return left


def _tokens(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, generator, prompting):
    ids = torch.tensor([prompt], device=model.embedding.device)
    yield from decoded(model, ids, prompt_inputs(model, ids, prompting),
                       lambda x: prompt_inputs(model, x, prompting, first=False),
                       task_prompt_len(model.cfg, prompting) + max_new_tokens,
                       lambda logits: pick(logits, temperature, top_k, top_p, generator), eos_id)


def continuation(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text tokens `new` add after `prompt`: decoded alone, SentencePiece would drop their
    leading space."""
    head, full = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


def book_tokens(prompts: list[Prompt], tokenizer: Tokenizer, cfg: ArchConfig) -> tuple[list[list[int]], list[str]]:
    """(the tokens of each prompt, problems): a prompt whose tokens, task prompt and max_tokens
    new tokens do not fit the model's maximum length is a problem, one line naming it."""
    tokens = [tokenizer.encode(input_text(p.text, p.context)) for p in prompts]
    problems = [length_problem(p, len(ids), book_prompt_len(cfg, p), cfg.max_len) for p, ids in zip(prompts, tokens, strict=True)]
    return tokens, [p for p in problems if p]


def book_prompt_len(cfg: ArchConfig, p: Prompt) -> int:
    """Positions the task prompt takes before prompt `p`'s text: its task's, or generation's."""
    return tasks.prompt_len(cfg, p.task) if p.task else task_prompt_len(cfg)


def length_problem(p: Prompt, tokens: int, task: int, max_len: int, bound: bool = False,
                   limit: str = "the model's maximum length {}") -> str | None:
    """The problem of prompt `p` of `tokens` tokens (`bound`: at most that many) when they, `task`
    task prompt tokens and its max_tokens do not fit `max_len` (`limit` names it); else None."""
    total = tokens + task + p.max_tokens
    if total <= max_len:
        return None
    counted = f"at most {tokens} tokens (its UTF-8 bytes + 1)" if bound else f"{tokens} tokens"
    return (f"{p.where}: text: {counted}" + (f" + {task} task prompt tokens" if task else "")
            + f" + max_tokens {p.max_tokens} = {total}, above {limit.format(max_len)}")


def complete_book(model: CPMAnt, tokenizer: Tokenizer, prompts: list[Prompt], step: int,
                  release: str | None = None) -> dict:
    """The greedy completion of every prompt of the book, as the JSON the site reads
    (docs/ARCHITECTURE.md, "The prompt book"): {step, model (the release's models:/NAME/VERSION
    or None), completions: [{id, author, text, max_tokens, [task, context,] completion}]}; a
    prompt naming a task is laid out as that task's input (inference/tasks.py). A prompt that does not
    fit the model is a UserError before any forward pass. Under FSDP2 every rank calls this with
    the same prompts: greedy decoding takes the same tokens on every rank, so all run the same
    (collective) forward passes."""
    tokens, problems = book_tokens(prompts, tokenizer, model.cfg)
    if problems:
        raise UserError(problems[0])
    completions = []
    for p, ids in zip(prompts, tokens, strict=True):
        if p.task:  # the output is a segment of its own, not a continuation of the text
            completion = tokenizer.decode(tasks.decode(model, ids, p.task, p.max_tokens, tokenizer.eos_id))
        else:
            completion = continuation(tokenizer, ids, sample(model, ids, p.max_tokens, temperature=0,
                                                             eos_id=tokenizer.eos_id))
        completions.append({"id": p.id, "author": p.author, "text": p.text, "max_tokens": p.max_tokens,
                            **{k: getattr(p, k) for k in ("task", "context") if getattr(p, k)},
                            "completion": completion})
    return {"step": step, "model": release, "completions": completions}


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   seed: int) -> None:
    """A UserError for settings `sample` cannot use, checked where they enter, before a model
    is loaded (torch's own errors come from inside the first sampling step, or never: an
    infinite temperature samples uniformly)."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # also refuses NaN
        raise UserError(f"top_p must be in (0, 1] (or unset), got {top_p}")
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UserError(f"seed must be in [-2**63, 2**64 - 1], got {seed}")


def pick(logits, temperature, top_k, top_p, generator) -> int:
    """The next id from float32 `logits` [V]: the likeliest at temperature 0, else sampled."""
    if temperature <= 0:
        return int(logits.argmax())
    # In float64 (a tiny temperature is 0 in float32) and shifted so the largest is 0: a tiny
    # temperature then gives -inf and 0, whose softmax picks the likeliest, instead of NaNs.
    logits = (logits.double() - logits.max()) / temperature
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
