"""The run config's `data` group. A plain dataclass, without Lightning: the proposal registry
checks `data.*` keys against its fields, and `PretrainDataModule` *is* a `DataConfig`."""

# No `from __future__ import annotations`: jsonargparse resolves the string hints of the
# dataclass __init__ that PretrainDataModule inherits in the subclass's module, where these names are not.
from dataclasses import dataclass
from typing import Literal

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.ranges import check_ranges, ranged
from cpm_lightning.core.tasks import TASK_PROMPTS
from cpm_lightning.core.tokenizer import MAX_VOCAB, MIN_VOCAB
from datamodules.sources import SourceConfig, where

MAX_SEQ_LEN = 1 << 20
"""Tokens per sample at most (1 Mi): 8 times the longest contexts trained today."""
MAX_BATCH_SIZE = 1 << 20
"""Samples per optimizer step at most (1 Mi): 256 times the largest global batches in use."""
MAX_BATCH_TOKENS = 1 << 24
"""Tokens of one device's micro-batch at most (16 Mi, 100 times what a GPU trains on at once): its
windows and the batch collated from them take 24 bytes a token of host memory (384 MiB), twice
with the next batch fetched ahead."""

FIRST_EXTRA_ROW = max(TASK_PROMPTS.values()) + 1
"""data.tasks' rows come after the built-in tasks' (core/tasks.py)."""


def task_rows(extra: dict[str, int] | None) -> dict[str, int]:
    """Task name -> prompt row: core/tasks.py's, then data.tasks' (checked)."""
    for name, row in (extra or {}).items():
        if name in TASK_PROMPTS:
            raise UserError(f"data.tasks.{name}: {name!r} is a built-in task (row {TASK_PROMPTS[name]}); "
                            "data.tasks names other tasks")
        if not isinstance(row, int) or row < FIRST_EXTRA_ROW:
            raise UserError(f"data.tasks.{name}: the prompt row must be an integer from {FIRST_EXTRA_ROW} "
                            f"(rows up to {FIRST_EXTRA_ROW - 1} are CPM-Ant's and the built-in tasks'), got {row!r}")
    rows = {**TASK_PROMPTS, **(extra or {})}
    taken: dict[int, str] = {}
    for name, row in rows.items():
        if row in taken:
            raise UserError(f"data.tasks.{name}: prompt row {row} is already task {taken[row]!r}'s")
        taken[row] = name
    return rows


# eq/repr off: PretrainDataModule inherits this class and is compared and printed as itself.
# Not kw_only: PretrainDataModule(sources, ...) keeps working positionally.
@dataclass(eq=False, repr=False)
class DataConfig:
    """The training data: a mixture of sources, its tokenizer, and how it is cut into batches."""

    sources: dict[str, SourceConfig]
    """The mixture: {name: {url, weight, format, field}}."""
    tokenizer: str | None = None
    """Path or fsspec URL of a SentencePiece model. Unset: one is trained on the sources on first
    use and cached."""
    tokenizer_vocab_size: int = ranged(4096, ge=MIN_VOCAB, le=MAX_VOCAB)
    """Vocabulary of the tokenizer trained when `tokenizer` is unset."""
    seq_len: int = ranged(256, ge=1, le=MAX_SEQ_LEN)
    """Tokens per training sample (windows of seq_len + 1 are cut from the stream)."""
    batch_size: int = ranged(8, ge=1, le=MAX_BATCH_SIZE)
    """The global batch: samples per optimizer step over all devices. Each device takes
    batch_size / (devices x nodes x trainer.accumulate_grad_batches) per forward pass, so the
    optimization, and the samples of each step, do not depend on the world size; that is at most
    MAX_BATCH_TOKENS tokens, the memory a batch may take."""
    val_windows: int = ranged(32, ge=0)
    """Windows held out at the end of each source for validation (at most a tenth of the
    source)."""
    seed: int = ranged(0, ge=0)
    """Seed of the per-source window order."""
    val_sources: list[str] | None = None
    """The sources whose held-out windows make the validation set; unset: every source.
    `proposals trial` validates both arms of a data proposal on the baseline's sources."""
    cache_dir: str | None = None
    """Where shards and trained tokenizers are cached: a local directory, or an fsspec URL
    (s3://, gs://, file://...) shared by machines, mirrored in `local_cache`; unset:
    $CPM_LIGHTNING_CACHE (a directory or a URL) or ~/.cache/cpm-lightning."""
    tasks: dict[str, int] | None = None
    """Task names beyond qa, summarize and translate (cpm_lightning/core/tasks.py) that task
    sources may name -> the row of the model's prompt embeddings each uses (from 6 on)."""
    task_overflow: Literal["truncate", "refuse"] = "truncate"
    """A task sample longer than seq_len: truncate (its input is cut from the left, and the
    count said in a warning) or refuse (an error, before anything trains)."""
    local_cache: str | None = None
    """With a URL as cache: the local directory its pieces, manifests and tokenizers are
    downloaded into and memory-mapped from; unset: ~/.cache/cpm-lightning."""

    def __post_init__(self):
        if not self.sources:
            raise UserError("data.sources is empty; expected {name: {url: ..., weight: ...}}")
        check_ranges(self, "data")
        self.sources = {n: s if isinstance(s, SourceConfig) else SourceConfig(**s) for n, s in self.sources.items()}
        for name, src in self.sources.items():  # here, where the source's name is known
            check_ranges(src, where(name))
        for name in self.val_sources or []:
            if name not in self.sources:
                raise UserError(f"data.val_sources: no source {name!r}; the sources are {', '.join(sorted(self.sources))}")
        self.task_rows = task_rows(self.tasks)
        """Task name -> prompt row, of the tasks task sources may name."""
        if self.val_sources == []:
            raise UserError("data.val_sources is empty; name at least one source, or leave it unset for all")
