"""PretrainDataModule: sources -> tokenizer -> shards -> mixture -> packed windows (of text, and
of task samples: datamodules/tasks.py)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import Tokenizer
from datamodules.config import MAX_BATCH_TOKENS, DataConfig
from datamodules.mixture import Mixture
from datamodules.prepare import PreparedData
from datamodules.shards import SourceTokens, open_source
from datamodules.tasks import TaskPrompts, TaskSource, as_packed


def window(shard: SourceTokens, i: int, seq_len: int) -> dict:
    """Window i of a source's packed stream: seq_len inputs and the seq_len next tokens as targets."""
    w = torch.from_numpy(shard.read(i * seq_len, (i + 1) * seq_len + 1).astype(np.int64))
    return {"input_ids": w[:-1], "targets": w[1:]}


class TrainStream(IterableDataset):
    """This rank's share of the global mixture, forever. Remembers the mixture state after each
    of its recent batches so the DataModule can save the state of the last *consumed* batch
    (Lightning fetches one batch ahead), and continue the mixture from it with new weights."""

    def __init__(self, dm: "PretrainDataModule", rank: int, world: int, batch_size: int):
        self.dm, self.rank, self.world, self.batch_size = dm, rank, world, batch_size
        self.history: dict[int, dict] = {}
        self.drawn = 0
        self.mix: Mixture | None = None

    def __iter__(self):
        self.mix = self._mixture(self.dm.start_state)
        self.drawn, self.history = 0, {0: self.mix.state.to_dict()}
        while True:
            yield from self.draw()  # `self.mix` may be another one at the next batch (restart_at)

    def _mixture(self, state: dict | None) -> Mixture:
        dm = self.dm
        return Mixture(dm.weights, dm.train_windows, dm.seed, state, dm.skip)

    def draw(self) -> list[dict]:
        """The samples of this rank's next batch."""
        samples = []
        for _ in range(self.batch_size):
            for r in range(self.world):
                name, i = self.mix.next()
                if r == self.rank:
                    samples.append(self.dm.window(name, i))
        self.drawn += 1
        self.history[self.drawn] = self.mix.state.to_dict()
        self.history.pop(self.drawn - 64, None)
        return samples

    def restart_at(self, consumed: int) -> dict:
        """Continue after the `consumed`-th batch with the DataModule's weights now, as a run
        resumed from that batch's state would (Mixture: the picks restart, the cursors go on);
        returns the batch after it, which replaces the one fetched ahead."""
        self.mix = self._mixture(self.history[consumed])
        self.drawn, self.history = consumed, {k: v for k, v in self.history.items() if k <= consumed}
        return default_collate(self.draw())


class ValWindows(Dataset):
    """The held-out windows at the end of every source's stream (of data.val_sources, if set)."""

    def __init__(self, dm: "PretrainDataModule"):
        self.dm = dm
        self.items = [(n, dm.train_windows[n] + j) for n in sorted(dm.val_sources or dm.sources)
                      for j in range(dm.val_windows_of[n])]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.dm.window(*self.items[k])


class PretrainDataModule(DataConfig, L.LightningDataModule):
    """Sources -> tokenizer -> shards -> mixture -> packed windows.

    Its fields are the run config's `data` group (DataConfig); the loaded tokenizer is
    `text_tokenizer` (`tokenizer` is the field that says where it comes from)."""

    def __post_init__(self):
        super().__post_init__()
        L.LightningDataModule.__init__(self)
        self.prepared = PreparedData(self)
        """The sources' files, tokenizer and shards: each source is listed once per process
        (prepare_data and setup both ask)."""
        self.cache_path = self.prepared.cache_path
        self.weights = {n: s.weight for n, s in self.sources.items()}
        self.start_state: dict | None = None
        self.skip: list[tuple[int, int]] = []
        """[start, end) global sample indices the mixture draws past without training on them
        (set by `live` after a rollback: the window before a loss spike)."""
        self._stream: TrainStream | None = None
        self.prompts: TaskPrompts | None = None
        """The model's prompt table, which task samples need (set by `fit` from model.arch);
        unset: none, so task samples have no prompt positions."""

    # -- tokenizer ----------------------------------------------------------------------------
    @property
    def text_tokenizer(self) -> Tokenizer:
        return self.prepared.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.text_tokenizer.vocab_size

    # -- data ---------------------------------------------------------------------------------
    def prepare_data(self):
        for name in self.sources:
            self.prepared.manifest(name)

    def setup(self, stage: str | None = None):
        self.shards, self.task_sources, self.train_windows, self.val_windows_of = {}, {}, {}, {}
        for name in self.sources:
            self._open(name)

    def _open(self, name: str) -> None:
        """Source `name`'s windows, from its tokens in the cache."""
        src, manifest = self.sources[name], self.prepared.manifest(name)
        if src.format == "task":
            prompts = self.prompts or TaskPrompts(self.vocab_size, 0, 0)
            task = TaskSource(name, manifest, self.cache_path, self.task_rows, prompts, self.seq_len,
                              self.task_overflow, self.text_tokenizer.eos_id)
            self.task_sources[name], n, what = task, len(task), f"{len(task.row)} samples"
        else:
            self.shards[name] = open_source(manifest, self.cache_path)
            n, what = (len(self.shards[name]) - 1) // self.seq_len, f"{len(self.shards[name])} tokens"
        held_out = min(self.val_windows, max(1, n // 10))
        if n - held_out < 1:
            raise UserError(f"data.sources.{name}: {what} make fewer than 2 windows "
                            f"of data.seq_len={self.seq_len}; add {'samples' if src.format == 'task' else 'text'} "
                            "or lower seq_len")
        self.train_windows[name], self.val_windows_of[name] = n - held_out, held_out

    def change_sources(self, sources: dict) -> dict | None:
        """Draw from `sources` (name -> SourceConfig: new weights, new sources) from the next
        batch on, inside a running fit (a `live` boundary): a new source's tokens are read from
        the cache, or prepared now by each node's first rank while the others wait; the mixture
        goes on from the state of the last batch trained on, as after a resume. Returns the
        next batch drawn again (Lightning fetched it ahead from the old mixture), None when
        the mixture is the same. Only weights may change for a source drawn from already
        (live/policy.py restart_reason)."""
        weights = {n: s.weight for n, s in sources.items()}
        if sources == self.sources and weights == self.weights:
            return None
        new = [n for n in sources if n not in self.sources]
        self.sources, self.weights = dict(sources), weights
        t = self.trainer
        if new:
            if t.local_rank == 0:
                for name in new:
                    self.prepared.manifest(name)
            t.strategy.barrier("cpm-new-sources")
            for name in new:
                self._open(name)
        return self._stream.restart_at((t.global_step - self._start_step) * t.accumulate_grad_batches)

    def window(self, name: str, i: int) -> dict:
        """Window i of source `name`; when the mixture has task sources, every window has their keys."""
        if name in self.task_sources:
            return self.task_sources[name].window(i)
        w = window(self.shards[name], i, self.seq_len)
        return as_packed(w) if self.task_sources else w

    def held_out_windows(self) -> dict[str, list[list[int]]]:
        """The tokens of each source's validation windows (seq_len + 1 each: the inputs and the
        last target), as ValWindows cuts them: what `validate` and the held-out evaluation score.
        Text sources only: a task source's held-out windows are in `validate`'s loss, its
        scores are the task evaluation's."""
        L = self.seq_len
        return {name: [self.shards[name].read(i * L, (i + 1) * L + 1).tolist()
                       for i in range(self.train_windows[name], self.train_windows[name] + self.val_windows_of[name])]
                for name in sorted(self.shards)}

    def train_dataloader(self):
        t = self.trainer
        micro_batch = self.micro_batch_size(t.world_size, t.accumulate_grad_batches)
        self._stream = TrainStream(self, t.global_rank, t.world_size, micro_batch)
        self._start_step = t.global_step
        return DataLoader(self._stream, batch_size=micro_batch)

    def val_dataloader(self):
        t = self.trainer
        return DataLoader(ValWindows(self), batch_size=self.micro_batch_size(t.world_size, t.accumulate_grad_batches))

    def micro_batch_size(self, world_size: int, accumulate: int) -> int:
        """Samples per device per forward pass: data.batch_size split over the devices and the
        gradient-accumulation steps."""
        if self.batch_size % (world_size * accumulate):
            raise UserError(f"data.batch_size={self.batch_size} (the global batch) does not split over "
                            f"{world_size} device(s) x trainer.accumulate_grad_batches={accumulate}; "
                            f"use a multiple of {world_size * accumulate}")
        micro = self.batch_size // (world_size * accumulate)
        if micro * (self.seq_len + 1) > MAX_BATCH_TOKENS:
            raise UserError(f"data.batch_size={self.batch_size} over {world_size} device(s) x "
                            f"trainer.accumulate_grad_batches={accumulate} makes micro-batches of {micro} windows of "
                            f"data.seq_len + 1 = {self.seq_len + 1} tokens, {micro * (self.seq_len + 1):,} tokens; at "
                            f"most {MAX_BATCH_TOKENS:,} fit the memory a batch may take: raise "
                            "trainer.accumulate_grad_batches or lower data.batch_size or data.seq_len")
        return micro

    def test_dataloader(self):
        return self.val_dataloader()

    # -- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The mixture state after the last batch the model trained on."""
        if self._stream is None or not self._stream.history:
            return {"mixture": self.start_state}
        consumed = (self.trainer.global_step - self._start_step) * self.trainer.accumulate_grad_batches
        return {"mixture": self._stream.history[consumed]}

    def load_state_dict(self, state: dict) -> None:
        self.start_state = state["mixture"]

    def samples_drawn(self) -> dict[str, int]:
        """Samples drawn from each source over the whole run, up to the last batch the model
        trained on (all ranks together; a skipped window counts as drawn)."""
        state = self.state_dict()["mixture"]
        return dict(state["cursors"]) if state else {}
