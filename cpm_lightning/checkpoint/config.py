"""The run config's `checkpoint` group: when checkpoints are written and kept, whether `fit`
resumes by itself, and the model directory a new run starts from. A plain dataclass (no torch),
so `--help`, the registry's checks and `live` read it without the training stack."""

# No `from __future__ import annotations`: jsonargparse resolves the dataclass's string hints.
from dataclasses import dataclass
from typing import Literal

from cpm_lightning.core.ranges import check_ranges, ranged


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written and kept (in <trainer.default_root_dir>/checkpoints), and
    whether `fit` resumes by itself."""

    every_n_steps: int = ranged(500, ge=1)
    """Save every this many optimizer steps (CPM-Ant: 500), at the end of training, and at the
    next step boundary after SIGTERM, SIGINT or SIGUSR1 (then stop and exit cleanly)."""
    keep_last: int = ranged(3, ge=1)
    """Keep this many most recently written checkpoints; older ones are deleted."""
    resume: Literal["never", "auto"] = "never"
    """auto: without --ckpt_path, resume from the newest checkpoint if there is one (a job that a
    scheduler requeues after preemption). never: start fresh unless --ckpt_path names one."""
    init_from: str | None = None
    """A model directory (`convert from-hf`, `checkpoint consolidate`, a release) whose weights a
    new run starts from, with a fresh optimizer, schedule and data position. Its architecture
    and tokenizer are the run's: a model.arch value or data.tokenizer that differs is an error,
    except max_len and split_qk_scale, which the run may change. A run that resumes a checkpoint
    (checkpoint.resume: auto) takes only the architecture; with --ckpt_path it is an error."""

    trust_unverified: bool = False
    """Read a starting checkpoint or init_from directory that has no integrity record (written by
    other software or an older version) without verifying its bytes, with a warning; false:
    refuse it. One with a record is always verified (the other verbs' --trust-unverified)."""

    def __post_init__(self):
        check_ranges(self, "checkpoint")
