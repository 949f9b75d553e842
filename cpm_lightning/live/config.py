"""The run config's `live` group. A plain dataclass: `live` reads it without Lightning, and
`fit` accepts the group (and ignores it) so one run config serves both."""

from __future__ import annotations

from dataclasses import dataclass

from cpm_lightning.core.errors import UserError
from cpm_lightning.tracking.integrity import check_variants


@dataclass(kw_only=True)
class LiveConfig:
    """How `cpm-lightning live` follows the registry and guards the run (docs/ARCHITECTURE.md,
    "Live training"). `fit` ignores this group."""

    poll_seconds: float = 60.0
    """Seconds between two reads of registry.path (after `git pull --ff-only` when it is in a git
    working copy with an upstream)."""
    max_restarts: int = 3
    """Restarts from the same checkpoint (after crashes or rollbacks) before `live` stops with a
    record naming the step and the last error."""
    restart_backoff: float = 30.0
    """Seconds before restarting a crashed segment, doubled at each further restart from the
    same checkpoint."""
    spike_window: int = 128
    """Recent losses a spike is measured against (OLMo-core's stability monitor: 128). Checks
    start once the window is full; it restarts when a data change takes effect, since the loss
    of a new mixture is not comparable with the old one's."""
    spike_sigma: float = 6.0
    """A loss above the window's mean by this many standard deviations is a spike (OLMo-core:
    6): the run rolls back to the last checkpoint before it and skips the data in between."""
    max_nonfinite: int = 3
    """Non-finite steps in a row (each skipped, counted in train/skipped_steps) that count as
    a divergence and roll the run back."""
    suspend_window: int = 1000
    """A divergence within this many steps after a proposal took effect, when the run has rolled
    back once already since then, suspends that proposal in this run: back to the checkpoint
    before it, and on without it."""
    reports: bool = True
    """Publish the daily training log once a UTC day has ended and the weekly digest once an ISO
    week has ended (`report daily`, `report weekly`: in MLflow, and under
    <trainer.default_root_dir>/reports); needs MLflow, and registry.path for the digest."""
    release_every_n_steps: int = 0
    """Release the checkpoint of every this many steps (a multiple of checkpoint.every_n_steps)
    to the Model Registry with alias `nightly`, evaluated on the `eval` group's tasks; 0: never."""
    release_quantize: list[str] | None = None
    """Variants each of those releases adds (`release --quantize`): some of int8, int4, bfloat16,
    float16, so every published checkpoint comes in sizes people can run; unset: none."""
    release_name: str | None = None
    """Registered model name of those releases; unset: the MLflow experiment's name."""
    apps_limit: int = 20
    """Examples per task each of those releases re-scores the applications' adapters on
    (apps.yaml `adapter`; `release --apps-limit`)."""
    site_dir: str | None = None
    """Where `report site` builds the run's public static site (a link swapped in one rename,
    docs/ARCHITECTURE.md, "Publishing"); unset: no site."""
    site_every_minutes: float = 10.0
    """Minutes between two builds of the site (and one when `live` starts and ends)."""
    launcher: list[str] | None = None
    """Command that starts a segment's Python, given `-m cpm_lightning.cli fit ...`: unset runs
    this interpreter (Lightning launches the local ranks); e.g. [srun, python] inside a SLURM
    allocation, or [torchrun, --nnodes=2, --nproc-per-node=8, --rdzv-endpoint=HOST:29500]."""

    def __post_init__(self):
        for key in ("poll_seconds", "spike_sigma", "site_every_minutes"):
            if not getattr(self, key) > 0:
                raise UserError(f"live.{key} must be positive, got {getattr(self, key)}")
        for key in ("spike_window", "max_nonfinite", "suspend_window"):
            if getattr(self, key) < 1:
                raise UserError(f"live.{key} must be at least 1, got {getattr(self, key)}")
        if self.apps_limit < 1:
            raise UserError(f"live.apps_limit must be at least 1, got {self.apps_limit}")
        for key in ("max_restarts", "restart_backoff", "release_every_n_steps"):
            if getattr(self, key) < 0:
                raise UserError(f"live.{key} must be 0 or more, got {getattr(self, key)}")
        if self.release_quantize:
            check_variants(self.release_quantize, "live.release_quantize")
            if not self.release_every_n_steps:
                raise UserError("live.release_quantize: the variants of nightly releases, and live.release_every_n_steps "
                                "is 0 (no releases); set it, or unset live.release_quantize")
        if self.launcher is not None and not self.launcher:
            raise UserError("live.launcher is empty; expected a command such as [srun, python], or null")
