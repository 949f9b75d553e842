"""Task sources: samples of question answering, summarization and translation laid out as
CPM-Ant lays out one (cpm_lightning/core/tasks.py), packed several to a window.

A task source's pieces hold, per sample, its input's tokens, then its output's tokens and EOS
(shards.TaskWriter). At setup each sample gets its task's prompt row and is cut to fit, and the
samples, in order, are packed greedily into windows of data.seq_len positions: a pure function
of the source, seq_len and the model's prompt table, so the mixture draws a task source's
windows by index as it draws a text source's, and resume stays exact. In a window, sample k
(numbered from 1; padding is 0) takes

    positions   prompt_len prompt ids | its input (kept from the right) | its output
    input_ids   vocab_size + row * prompt_len + j | input tokens | output tokens
    targets     IGNORE ...              IGNORE ... first output token | the rest, then EOS
    segment_ids 0                     | INPUT_SEGMENT                   | OUTPUT_SEGMENT
    context     True                  | True                            | False

so the loss counts the output and its EOS only, each predicted from the position before it.
sample_ids keep the samples apart (CPMAnt.forward): a packed sample's logits are those of the
sample alone. A task whose row the model's prompt table lacks (model.arch.num_tasks too small)
gets no prompt positions, with a warning.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.loss import IGNORE
from cpm_lightning.core.tasks import INPUT_SEGMENT, OUTPUT_SEGMENT
from datamodules.shards import SourceTokens, open_source
from datamodules.sources import where


@dataclass(frozen=True)
class TaskPrompts:
    """The model's prompt table, as a task sample's prompt positions need it (set by `fit` from
    model.arch)."""

    vocab_size: int
    """Ids from vocab_size on are prompt positions: vocab_size + row * prompt_len + j."""
    num_tasks: int
    """Rows of the prompt table (model.arch.num_tasks); a task at a row beyond has no prompt."""
    prompt_len: int
    """Prompt positions per task (model.arch.prompt_len)."""


class TaskSource:
    """A task source's samples, cut to fit and packed into windows of seq_len positions."""

    def __init__(self, name: str, manifest: Path, cache_dir: Path, rows: dict[str, int],
                 prompts: TaskPrompts, seq_len: int, overflow: str, eos_id: int):
        self.name, self.seq_len, self.eos_id = name, seq_len, eos_id
        self.tokens: SourceTokens = open_source(manifest, cache_dir)
        self.row, self.start, self.input_end, self.end = self._samples(manifest, cache_dir, rows)
        self.prompt = prompts.prompt_len * (self.row < prompts.num_tasks)
        self.prompt_base = prompts.vocab_size + self.row * prompts.prompt_len
        lacking = sorted({t for t, r in rows.items() if r in set(self.row.tolist()) and r >= prompts.num_tasks})
        if lacking:
            print(f"warning: {where(name)}: the model's prompt table has rows for {prompts.num_tasks} task(s) "
                  f"(model.arch.num_tasks); the samples of {', '.join(lacking)} have no prompt positions", file=sys.stderr)
        self.input_start = self._fit(overflow)
        self.bounds = self._pack()

    def _samples(self, manifest: Path, cache_dir: Path, rows: dict[str, int]):
        """Per sample: its task's prompt row, and its start, input end and end in the token stream."""
        parts, offset = [], 0
        for piece in json.loads(manifest.read_text())["pieces"]:
            path = cache_dir / "shards" / piece["key"]
            names = json.loads((path / "meta.json").read_text())["tasks"]
            for task in names:
                if task not in rows:
                    raise UserError(f"{where(self.name)}: unknown task {task!r} (in {', '.join(piece['files'])}); "
                                    f"the tasks are {', '.join(sorted(rows))} (more are named in data.tasks)")
            index = np.load(path / "index.npy")  # checked against its hash when the piece was opened
            task_row = np.array([rows[t] for t in names], dtype=np.int64)[index[:, 0]]
            ends = index[:, 2] + offset
            starts = np.concatenate([[offset], ends[:-1]]).astype(np.int64)
            parts.append((task_row, starts, index[:, 1] + offset, ends))
            offset += piece["tokens"]
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))

    def _fit(self, overflow: str) -> np.ndarray:
        """Where each sample's input starts once cut from the left to fit seq_len (its prompt,
        its input and its output without EOS, which is only a target)."""
        output = self.end - self.input_end - 1
        room = self.seq_len - self.prompt - output  # for the input
        if (room < 1).any():
            k = int(np.argmax(room < 1))
            raise UserError(f"{where(self.name)}: sample {k} has an output of {int(output[k])} tokens: with its prompt "
                            f"({int(self.prompt[k])}) and an input token it does not fit data.seq_len={self.seq_len}")
        long = (self.input_end - self.start) > room
        if long.any():
            if overflow == "refuse":
                raise UserError(f"{where(self.name)}: {int(long.sum())} of {len(long)} samples are longer than "
                                f"data.seq_len={self.seq_len} (the first: sample {int(np.argmax(long))}); shorten them, "
                                "or set data.task_overflow: truncate to cut their inputs from the left")
            print(f"warning: {where(self.name)}: cut the inputs of {int(long.sum())} of {len(long)} samples from the left "
                  f"to fit data.seq_len={self.seq_len}", file=sys.stderr)
        return np.maximum(self.start, self.input_end - room)

    def _pack(self) -> list[int]:
        """The first sample of each window, then the number of samples: whole samples, in order,
        as many as fit."""
        bounds, used = [0], 0
        for k, n in enumerate((self.prompt + self.end - 1 - self.input_start).tolist()):
            if used + n > self.seq_len:
                bounds.append(k)
                used = 0
            used += n
        return [*bounds, len(self.row)]

    def __len__(self) -> int:
        """Windows."""
        return len(self.bounds) - 1

    def window(self, i: int) -> dict:
        """Window i: its samples laid out as the module docstring says, then padding."""
        T = self.seq_len
        out = {"input_ids": np.full(T, self.eos_id, np.int64), "targets": np.full(T, IGNORE, np.int64),
               "segment_ids": np.zeros(T, np.int64), "context": np.zeros(T, bool), "sample_ids": np.zeros(T, np.int64)}
        at = 0
        for number, k in enumerate(range(self.bounds[i], self.bounds[i + 1]), 1):
            P = int(self.prompt[k])
            tokens = self.tokens.read(int(self.input_start[k]), int(self.end[k])).astype(np.int64)
            a, n = int(self.input_end[k] - self.input_start[k]), P + len(tokens) - 1  # n positions
            span = slice(at, at + n)
            out["input_ids"][span] = np.concatenate([self.prompt_base[k] + np.arange(P), tokens[:-1]])
            out["targets"][at + P + a - 1:at + n] = tokens[a:]
            out["segment_ids"][span] = [0] * P + [INPUT_SEGMENT] * a + [OUTPUT_SEGMENT] * (n - P - a)
            out["context"][at:at + P + a] = True
            out["sample_ids"][span] = number
            at += n
        return {key: torch.from_numpy(value) for key, value in out.items()}


def as_packed(window: dict) -> dict:
    """A text window with the keys of a task window, for batches that mix them: one causal
    sample in segment 0, which the model reads as it reads the plain window."""
    T = len(window["input_ids"])
    return {**window, "segment_ids": torch.zeros(T, dtype=torch.long), "context": torch.zeros(T, dtype=torch.bool),
            "sample_ids": torch.ones(T, dtype=torch.long)}
