"""Tasks, as CPM-Ant+ added them: question answering, summarization and translation, as samples
laid out the way CPM-Ant lays out one (docs/tasks.md). Shared by the data that trains on them
(datamodules/) and the evaluation and generation that use them (inference/), which may not import
each other; no torch.

One sample, in order:

    the task's prompt     prompt_len positions of the task's prompt embeddings, segment 0,
                          context (every position sees them)
    the input             its tokens (a QA line's context and question, the text to summarize
                          or translate), segment INPUT_SEGMENT, context
    the output            its tokens then EOS, segment OUTPUT_SEGMENT, causal: the only tokens
                          the loss counts

Plain text, as `fit` trains on it, is segment 0, causal, with no prompt; CPM-Ant generates text
in segment 2 after the prompt of task 2 (inference/generate.py), so the output segment is 2.
"""

from __future__ import annotations

TASK_PROMPTS: dict[str, int] = {"qa": 3, "summarize": 4, "translate": 5}
"""Task name -> its row block in the model's prompt embeddings. 0-2 are CPM-Ant's own (2 is
plain generation); a run config may name more tasks, after these."""
INPUT_SEGMENT, OUTPUT_SEGMENT = 1, 2


def input_text(input: str, context: str | None = None) -> str:
    """The text of a sample's input: its context (a QA line's passage), if any, a newline, then
    the input itself (the question)."""
    return f"{context}\n{input}" if context else input
