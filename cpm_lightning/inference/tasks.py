"""Tasks at inference (docs/tasks.md): one sample laid out as cpm_lightning/core/tasks.py says,
decoded token by token with the KV cache, and the task evaluation (qa, summarize, translate) on
the real data shipped in task_data/, which evaluation.py registers beside its other tasks.

The layout, single sample: `model(input, segment_ids=INPUT_SEGMENT, context=True, task=ROW)` (the
task's prompt embeddings first, every position seeing the input), then each output token in
OUTPUT_SEGMENT, causal. A model whose prompt table lacks the task's rows (num_tasks <= ROW, e.g.
the demo's 0) reads the same input without the prompt: `prompt_note` says so. Torch only.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cpm_lightning.core.errors import UserError, lookup
from cpm_lightning.core.tasks import INPUT_SEGMENT, OUTPUT_SEGMENT, TASK_PROMPTS, input_text
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.inference import task_metrics
from cpm_lightning.inference.decode import decoded
from cpm_lightning.model import ArchConfig, CPMAnt

DATA = Path(__file__).parent / "task_data"
EVAL_INSTALL = 'pip install "cpm-lightning[eval]"'
"""The extra that brings the evaluation's optional packages (setup.cfg)."""


def task_row(cfg: ArchConfig, task: str) -> int | None:
    """The task's row block in the model's prompt embeddings, or None when the model has none."""
    row = lookup(TASK_PROMPTS, task, "task")
    return row if cfg.num_tasks > row else None


def prompt_len(cfg: ArchConfig, task: str) -> int:
    """Positions the task's prompt takes before the input (0 without its rows)."""
    return cfg.prompt_len if task_row(cfg, task) is not None else 0


def prompt_note(cfg: ArchConfig, task: str) -> str | None:
    """The line that says a model reads `task` without its prompt, or None when it has the rows."""
    if task_row(cfg, task) is not None:
        return None
    return (f"task {task}: the model has no prompt embeddings for it (num_tasks {cfg.num_tasks}, the task's row "
            f"{TASK_PROMPTS[task]}): its input is read without the task prompt")


def input_ids(tokenizer: Tokenizer, cfg: ArchConfig, task: str, text: str, context: str | None,
              max_new_tokens: int) -> tuple[list[int], int]:
    """(the input's tokens, how many were cut): the input (context then `text`) with its oldest
    tokens cut so that the prompt, the input and max_new_tokens fit the model's maximum length."""
    ids = tokenizer.encode(input_text(text, context))
    room = cfg.max_len - prompt_len(cfg, task) - max_new_tokens
    if room < 1:
        raise UserError(f"task {task}: {max_new_tokens} new tokens and {prompt_len(cfg, task)} prompt positions "
                        f"leave no room for the input in the model's maximum length {cfg.max_len}")
    return ids[-room:], max(len(ids) - room, 0)


def greedy(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def decode(model: CPMAnt, ids: list[int], task: str, max_new_tokens: int, eos_id: int | None,
           choose: Callable[[torch.Tensor], int] = greedy) -> list[int]:
    """The output of the input `ids` (not empty; fitting with max_new_tokens, as input_ids
    makes them) for `task`: up to max_new_tokens ids, stopping at EOS, each chosen by `choose`
    from the logits (greedy by default). Greedy decoding takes the same tokens on every rank, so
    under FSDP2 every rank runs the same (collective) forward passes."""
    return list(steps(model, ids, task, max_new_tokens, eos_id, choose))


def steps(model: CPMAnt, ids: list[int], task: str, max_new_tokens: int, eos_id: int | None,
          choose: Callable[[torch.Tensor], int] = greedy) -> Iterator[int]:
    """`decode`'s ids one at a time, each as soon as it is chosen (`serve` streams them)."""
    device, row = model.embedding.device, task_row(model.cfg, task)
    x = torch.tensor([ids], device=device)
    first = {"segment_ids": torch.full_like(x, INPUT_SEGMENT), "context": torch.ones_like(x, dtype=torch.bool)}
    if row is not None:
        first["task"] = torch.tensor([row], device=device)
    # The output segment, causal (no context): each token sees the input and the tokens before it.
    return decoded(model, x, first, lambda new: {"segment_ids": torch.full_like(new, OUTPUT_SEGMENT)},
                   prompt_len(model.cfg, task) + max_new_tokens, choose, eos_id)


# -- evaluation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    input: str
    context: str | None
    references: list[str]
    """The gold outputs: every annotator's answer for QA, one summary or translation otherwise."""


def _squad(r: dict) -> Example:
    return Example(r["question"], r["context"], r["answers"])


def _summary(r: dict) -> Example:
    return Example(r["text"], None, [r["summary"]])


def _translation(r: dict) -> Example:
    return Example(r["zh"], None, [r["en"]])


def _qa_scores(outputs: list[str], examples: list[Example]) -> dict[str, float]:
    n = len(examples)
    return {"exact_match": sum(task_metrics.exact_match(o, e.references) for o, e in zip(outputs, examples, strict=True)) / n,
            "f1": sum(task_metrics.f1(o, e.references) for o, e in zip(outputs, examples, strict=True)) / n}


def _summary_scores(outputs: list[str], examples: list[Example]) -> dict[str, float]:
    return {"rouge_l": task_metrics.rouge_l(outputs, [e.references[0] for e in examples])}


def _translation_scores(outputs: list[str], examples: list[Example]) -> dict[str, float]:
    chrf, bleu = task_metrics.chrf_bleu(outputs, [e.references[0] for e in examples])
    return {"chrf": chrf, "bleu": bleu}


@dataclass(frozen=True)
class TaskEval:
    """A task scored on its outputs: each example's input decoded greedily with the task's
    prompt, the outputs scored against the references."""

    task: str
    """The task of core/tasks.py whose prompt and layout the examples use."""
    file: str
    """JSON lines under task_data/ (its README names the source and licence)."""
    example: Callable[[dict], Example]
    score: Callable[[list[str], list[Example]], dict[str, float]]
    """(outputs, examples) -> {metric: value}."""
    max_new_tokens: int
    """Tokens decoded at most per example."""
    package: str | None = None
    """The module its metric comes from, of the `eval` extra (None: no package)."""

    def check(self, name: str, where: str, has_heldout: bool) -> None:
        if not (DATA / self.file).is_file():
            raise UserError(f"{where}: task {name}: its data {DATA / self.file} is missing; reinstall cpm-lightning")
        if self.package and importlib.util.find_spec(self.package) is None:
            raise UserError(f"{where}: task {name}: its metric comes from the package {self.package}, which is not "
                            f"installed; install it with `{EVAL_INSTALL}`")

    def examples(self, limit: int | None) -> list[Example]:
        with open(DATA / self.file, encoding="utf-8") as f:
            lines = f.read().splitlines()[:limit]
        return [self.example(json.loads(line)) for line in lines]

    def run(self, name: str, inputs, limit: int | None) -> dict[str, float]:
        """`inputs`: evaluation.Inputs (its model, tokenizer and notes)."""
        model, tokenizer = inputs.model, inputs.tokenizer
        examples, outputs, cut = self.examples(limit), [], 0
        for e in examples:
            ids, dropped = input_ids(tokenizer, model.cfg, self.task, e.input, e.context, self.max_new_tokens)
            cut += dropped > 0
            outputs.append(tokenizer.decode(decode(model, ids, self.task, self.max_new_tokens, tokenizer.eos_id)))
        if note := prompt_note(model.cfg, self.task):
            inputs.notes.append(note)
        if cut:
            inputs.notes.append(f"task {name}: {cut} of {len(examples)} inputs were longer than the model's maximum "
                                f"length {model.cfg.max_len} allows and lost their oldest tokens")
        return self.score(outputs, examples)


TASK_EVALS: dict[str, TaskEval] = {
    "qa": TaskEval("qa", "squad.jsonl", _squad, _qa_scores, max_new_tokens=32),
    "summarize": TaskEval("summarize", "shijing_mao.jsonl", _summary, _summary_scores, max_new_tokens=32,
                          package="rouge_score"),
    "translate": TaskEval("translate", "analects_legge.jsonl", _translation, _translation_scores,
                          max_new_tokens=160, package="sacrebleu"),
}
"""The task evaluations, by task name (evaluation.TASKS holds them beside the others)."""
