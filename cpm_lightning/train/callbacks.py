"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path

import lightning as L

from cpm_lightning.checkpoint import meta
from cpm_lightning.inference.book import STEP_ARTIFACT, Prompt, completions_json
from cpm_lightning.inference.evaluation import evaluate, flat
from cpm_lightning.inference.generate import complete_book
from cpm_lightning.train.config import EvalConfig


class CarryProvenance(L.Callback):
    """Store in every checkpoint what its release needs beside the weights: the tokenizer model,
    so a checkpoint alone can generate text and be released, and the proposals in effect (the
    run's `cpm.proposals` tag names those of its latest segment; a nightly release of an older
    checkpoint lists the checkpoint's)."""

    def __init__(self, proposals: str | None):
        self.proposals = proposals
        """The applied proposals' ids, comma-separated; None when the run follows no registry."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        tokenizer = getattr(trainer.datamodule, "text_tokenizer", None)
        if tokenizer is not None:
            meta.write(checkpoint, tokenizer=tokenizer.model_bytes)
        if self.proposals is not None:
            meta.write(checkpoint, proposals=self.proposals)


class LogSamplesPerSource(L.Callback):
    """Log `data/samples/<source>`, the samples drawn from each source so far, at every logging
    step: a change of the mixture shows at its step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        drawn = getattr(trainer.datamodule, "samples_drawn", None)
        for name, count in (drawn() if drawn else {}).items():
            pl_module.log(f"data/samples/{name}", float(count))


class Evaluate(L.Callback):
    """The `eval` group's tasks every `eval.every_n_steps` optimizer steps, logged as
    eval/<task>/<metric> at that step, and the greedy completions of the prompt book `prompts`,
    logged as the MLflow artifact prompts/step-NNNNNNNN.json. Every rank runs both, the tasks on
    its share of the examples, the prompts all of them: under FSDP2 a forward pass is collective
    (evaluation.loglikelihoods, generate.complete_book); rank 0 logs."""

    def __init__(self, config: EvalConfig, prompts: list[Prompt] = ()):
        self.config, self.prompts = config, list(prompts)
        self._done = -1  # the step last evaluated: a step ends once, after its last micro-batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, c = trainer.global_step, self.config
        if step == self._done or step == 0 or step % c.every_n_steps:
            return
        self._done = step
        dm = trainer.datamodule
        heldout = dm.held_out_windows() if "heldout" in c.tasks else None
        with trainer.precision_plugin.forward_context():  # the precision training computes in (bf16-mixed: autocast)
            scores = evaluate(pl_module.model, dm.text_tokenizer, c.tasks, c.limit, heldout, c.batch_size,
                              distributed=trainer.world_size > 1)
            book = complete_book(pl_module.model, dm.text_tokenizer, self.prompts, step) if self.prompts else None
        for logger in trainer.loggers:
            logger.log_metrics(flat(scores, "eval"), step=step)
        if book is not None and trainer.is_global_zero:
            log_artifact(trainer, completions_json(book), STEP_ARTIFACT.format(step=step))


def log_artifact(trainer, text: str, path: str) -> None:
    """Log `text` as artifact `path` of the run's MLflow run, if it has one (rank 0). A tracking
    store that cannot take it is a warning: training goes on, without that artifact."""
    from lightning.pytorch.utilities import rank_zero_warn
    from mlflow.exceptions import MlflowException

    for logger in trainer.loggers:
        if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_text"):  # MLflow's
            try:
                logger.experiment.log_text(logger.run_id, text, path)
            except (MlflowException, OSError) as e:
                rank_zero_warn(f"artifact {path} not logged: {' '.join(str(e).split())[:300]}")


class TrialArm(L.Callback):
    """What `proposals trial` adds to the `fit` of each arm: a stop at step `stop_at`, with a
    validation there wherever trainer.val_check_interval falls (the arms are compared by it),
    and the arm's throughput and peak memory, read from this callback once `fit` returns."""

    def __init__(self, stop_at: int):
        self.stop_at = stop_at
        """The optimizer step the arm trains to; the run config's trainer.max_steps, which sets
        the learning-rate schedule's length, stays as it is."""
        self.tokens_per_sec: float | None = None
        """Tokens trained per second from the end of the first step to the end of the last
        (None after a single step: the first step also pays for warm-up)."""
        self.peak_memory: int | None = None
        """Peak bytes during training: allocated on a CUDA device, else the process's resident
        set (None where the platform cannot tell)."""
        self._first: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module):
        self._first, self.tokens_per_sec = None, None
        reset_peak_memory(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = (time.perf_counter(), pl_module.tokens_seen)
        if self._first is None:
            self._first = now
        elif now[0] > self._first[0]:
            self.tokens_per_sec = (now[1] - self._first[1]) / (now[0] - self._first[0])
        if trainer.global_step >= self.stop_at:
            trainer.should_stop = True  # Lightning validates when training is asked to stop

    def on_train_end(self, trainer, pl_module):
        self.peak_memory = peak_memory(trainer.strategy.root_device)


def reset_peak_memory(device) -> None:
    """Start peak_memory(device) afresh. On CPU, memory that earlier work in the process freed
    goes back to the system first (glibc keeps freed heap memory resident), so that a second
    `fit` in one process (a trial's next arm) starts from what is alive, not from the last
    one's high-water mark."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:  # Linux: 5 resets the peak resident set size, VmHWM (proc(5))
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device) -> int | None:
    """Peak bytes since reset_peak_memory: allocated by torch on a CUDA device, else the process's
    peak resident set (VmHWM; None where there is no /proc)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(kb) * 1024 if kb else None
