"""A trial's numbers (`cpm-lightning proposals trial`; docs/ARCHITECTURE.md, "Trials"): what each
arm measured, the paired difference of the final validation loss with its 95% t interval over the
seeds, the verdict, and the Markdown table the trial's MLflow run keeps. Pure: it trains nothing
and imports neither Lightning nor MLflow (scipy for the t quantile, only with two seeds or more).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from cpm_lightning.cli.trial_plan import ROLES, Trial


@dataclass(kw_only=True)
class Arm:
    """What one arm measured."""

    role: str
    seed: int
    run_id: str
    val_loss: float
    """Validation loss after the last step."""
    tokens_per_sec: float | None
    peak_memory: int | None
    """Bytes (see callbacks.peak_memory)."""
    params: int
    flops_per_token: int
    """Training FLOPs per token at data.seq_len (model/stats.py)."""


@dataclass(kw_only=True)
class Comparison:
    """The paired difference of the final validation loss, proposal minus baseline, over seeds."""

    differences: list[float]
    mean: float = field(init=False)
    low: float | None = field(init=False)
    """The 95% interval (t distribution, K-1 degrees of freedom); None for one seed."""
    high: float | None = field(init=False)

    def __post_init__(self):
        k = len(self.differences)
        self.mean = statistics.fmean(self.differences)
        self.low = self.high = None
        if k > 1:
            from scipy.stats import t

            half = t.ppf(0.975, k - 1) * statistics.stdev(self.differences) / math.sqrt(k)
            self.low, self.high = self.mean - half, self.mean + half

    @property
    def word(self) -> str:
        if self.low is None:
            return "one seed, no interval"
        return "better" if self.high < 0 else "worse" if self.low > 0 else "no clear difference"

    def verdict(self, trial: Trial, preset: str) -> str:
        """One line: the word, the difference and its interval, and what was trained."""
        interval = f" (95% interval {self.low:+.4f} to {self.high:+.4f})" if self.low is not None else ""
        start = f"from {trial.start} (step {trial.start_step})" if trial.start else "from new weights"
        return (f"{self.word}: final val loss {self.mean:+.4f}{interval} with {trial.label} over "
                f"{_seeds(len(self.differences))} x {trial.steps} steps, {preset} preset, {start}")



# -- the table ----------------------------------------------------------------------------------
def render(trial: Trial, arms: list[Arm], comparison: Comparison, verdict: str, run_id: str, preset: str) -> str:
    """The trial's comparison in Markdown."""
    p = trial.proposal
    names = {"baseline": "baseline", "proposal": f"baseline + {p.label}"}
    start = f"from {trial.start} (step {trial.start_step})" if trial.start else "from new weights"
    lines = [f"## Trial of proposal {p.label}: {p.title}", "",
             f"{trial.steps} steps {start}, seeds {', '.join(map(str, range(trial.seeds)))}: run config "
             f"`{trial.config}` ({preset} preset), registry `{trial.registry.path}` at step {trial.at_step}. "
             f"MLflow run {run_id}.", ""]
    if trial.note:
        lines += [f"Note: {trial.note}.", ""]
    architecture = p.kind == "architecture"
    head = ["arm", "final val loss", "tokens/s", "peak memory"] + (["parameters", "GFLOP/token"] if architecture else [])
    lines += [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for role in ROLES:
        group = [a for a in arms if a.role == role]
        losses = [a.val_loss for a in group]
        cells = [names[role], f"{statistics.fmean(losses):.4f}" + (f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""),
                 _mean([a.tokens_per_sec for a in group], lambda v: f"{v:,.0f}"),
                 _mean([a.peak_memory for a in group], lambda v: f"{v / 2**20:,.0f} MiB")]
        if architecture:
            cells += [_count(group[0].params), f"{group[0].flops_per_token / 1e9:.4f}"]
        lines.append(_row(cells))
    lines += ["", _row(["seed", "baseline", names["proposal"], "difference"]), _row(["---:"] * 4)]
    for a, b in zip(arms[::2], arms[1::2], strict=True):
        lines.append(_row([str(a.seed), f"{a.val_loss:.4f}", f"{b.val_loss:.4f}", f"{b.val_loss - a.val_loss:+.4f}"]))
    lines += ["", f"**Verdict:** {verdict}.", "",
              "Final val loss: after the last step, mean ± standard deviation over the seeds. Difference: the "
              "proposal's minus the baseline's, per seed (same initial weights or checkpoint, same data order); its "
              "95% interval is the mean's, t distribution with seeds − 1 degrees of freedom. Tokens/s: from the end "
              "of the first step to the end of the last. Peak memory: the peak resident set of the process while the "
              "arm trained (on a GPU: the peak allocated by torch).", ""]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _mean(values: list, fmt) -> str:
    known = [v for v in values if v is not None]
    return fmt(statistics.fmean(known)) if known else "n/a"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"



def _seeds(k: int) -> str:
    return f"{k} seed{'s' if k > 1 else ''}"
