"""`cpm-lightning tune SRC --config FILE`: parameter-efficient tuning of a trained model (a
checkpoint, a model directory, a pulled release or a `models:/` URI) on a run config's data, its
task sources most usefully. It runs `fit` (cli/fit.py: LightningCLI, MLflow, checkpoints) from
SRC's weights (checkpoint.init_from) with the model frozen and only the adapter training, then
writes the adapter directory (train/adapters.py) that `generate`, `evaluate` and `serve` take with
`--adapter DIR`. A tune stopped before trainer.max_steps (a signal) writes no adapter; `--resume`
goes on from its newest checkpoint, checked against the run's tune.json (TuneRecord).

Torch, Lightning and peft are imported when the verb runs: `--help` imports every verb module.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import TRUST_FLAG, TRUST_HELP

DEFAULTS = {"method": "lora", "rank": 8, "alpha": 16.0, "tasks": "qa"}


def add_commands(sub) -> None:
    tune = sub.add_parser("tune", help="tune a trained model with LoRA or its task prompts (an adapter of a few MB)",
                          description="Train an adapter on a frozen model through `fit` and write it to --out.")
    tune.add_argument("source", help="a checkpoint written by fit, a model directory, a pulled release or a models:/ URI")
    tune.add_argument("--config", required=True, help="run config (fit's) whose data the adapter trains on, "
                      "typically task sources (format: task)")
    tune.add_argument("--method", default=DEFAULTS["method"], help="lora (default): low-rank updates of the "
                      "projections; prompt: the task prompt rows alone (CPM-Ant's P-tuning)")
    tune.add_argument("--rank", type=int, default=DEFAULTS["rank"], help="LoRA's rank (default 8)")
    tune.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="LoRA's alpha; its update is scaled by "
                      "alpha/rank (default 16)")
    tune.add_argument("--targets", help="LoRA: comma-separated projections (default: all of attention's and the FFN's, "
                      "project_q,project_k,project_v,attention_out,w_0,w_1,w_out)")
    tune.add_argument("--tasks", default=DEFAULTS["tasks"], help="prompt: comma-separated tasks whose prompt rows "
                      "train (default qa)")
    tune.add_argument("--out", default="adapter", help="adapter directory to write, new or empty (default ./adapter)")
    tune.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted tune from the newest "
                      "checkpoint in the config's trainer.default_root_dir (checkpoint.resume: auto); refused "
                      "if that run tuned another base or adapter")
    tune.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    tune.set_defaults(func=run_tune)


def run_tune(args) -> None:
    from cpm_lightning.checkpoint.modeldir import open_model_dir, staged_dir
    from cpm_lightning.cli.fit import run
    from cpm_lightning.cli.loader import model_directory
    from cpm_lightning.registry.run_args import read_run_args
    from cpm_lightning.train.adapters import PROJECTIONS, AdapterConfig, base_sha256, save_adapter

    out = Path(args.out)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not empty; expected a new or empty directory (--force replaces it)")
    targets = tuple(args.targets.split(",")) if args.targets else PROJECTIONS
    cfg = AdapterConfig(method=args.method, rank=args.rank, alpha=args.alpha, targets=targets,
                        tasks=tuple(args.tasks.split(",")))
    config = read_run_args(["--config", args.config]).config
    root = Path(config.get("trainer", {}).get("default_root_dir") or os.getcwd())  # as fit's
    resume = args.resume or config.get("checkpoint", {}).get("resume") == "auto"
    fit_argv = ["fit", "--config", args.config] + (["--checkpoint.resume=auto"] if args.resume else [])
    with model_directory(args.source) as directory:
        sha256 = base_sha256(open_model_dir(directory))
        record = TuneRecord(root, {"base_sha256": sha256, "source": args.source, "adapter": cfg.as_dict()})
        record.start(resume)
        start = time.perf_counter()
        with record.kept_if_checkpointed():
            cli = run([*fit_argv, f"--checkpoint.init_from={directory}"], adapter=cfg)
        minutes = (time.perf_counter() - start) / 60
    trainer, module = cli.trainer, cli.model
    if not trainer.is_global_zero:
        return
    if trainer.global_step < trainer.max_steps:  # a signal (checkpoint/store.py) or trainer.max_time
        print(f"tune stopped at step {trainer.global_step} of {trainer.max_steps}: no adapter written; "
              "run the same command with --resume to go on", file=sys.stderr)
        return
    trained = module.adapter  # with the rows of its tasks
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    loss = trainer.callback_metrics.get("train/loss")
    base = {"sha256": sha256, "source": args.source}
    run_id = getattr(trainer.logger, "run_id", None)
    resumed_at = cli.run_plan.start.step if cli.run_plan.start else None
    with staged_dir(out, args.force) as tmp:
        files = save_adapter(tmp, module.model, trained, base, _card(args, trained, base, n_params, trainer.global_step,
                                                                     resumed_at, loss, minutes, run_id))
        size = sum(f.stat().st_size for f in files)
    print(f"{out}: {trained.method} adapter, {n_params:,} parameters, {size / 1024:.1f} KiB, "
          f"{trainer.global_step} steps in {minutes:.1f} min; base weights sha256 {sha256[:16]}…")


class TuneRecord:
    """tune.json in the run's trainer.default_root_dir: the base (its weights' sha256) and the
    adapter config that the run's checkpoints hold. fit's checkpoints know neither, and resuming
    them with another base or adapter would train on without complaint, or fail deep inside a
    state-dict load."""

    NAME = "tune.json"

    def __init__(self, root: Path, record: dict):
        self.path, self.record, self.checkpoints = root / self.NAME, record, root / "checkpoints"
        self.written = False
        self.created: list[Path] = []  # the directories start() made for the record, deepest first

    def start(self, resume: bool) -> None:
        """Check the record against the run's to resume (a UserError naming the first difference),
        or, when it starts fresh, write it."""
        from cpm_lightning.checkpoint.directory import latest

        if resume and latest(self.checkpoints) is not None:
            if not self.path.is_file():
                raise UserError(f"--resume: {self.checkpoints} holds checkpoints but no {self.path.name}: "
                                "not a `cpm-lightning tune` run; tune into a new trainer.default_root_dir")
            saved = json.loads(self.path.read_text())
            if saved["base_sha256"] != self.record["base_sha256"]:
                raise UserError(f"--resume: the tune run in {self.path.parent} tunes {saved['source']} (weights sha256 "
                                f"{saved['base_sha256']}), not this base ({self.record['base_sha256']})")
            ours = self.record["adapter"]
            if wrong := [k for k in ours if k != "rows" and saved["adapter"].get(k) != ours[k]]:
                raise UserError(f"--resume: the tune run in {self.path.parent} trains an adapter of {wrong[0]} "
                                f"{_flag(saved['adapter'][wrong[0]])}, not {_flag(ours[wrong[0]])}; give its options")
            return
        root = self.path.parent
        self.created = [d for d in (root, *root.parents) if not d.exists()]
        root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.partial")  # every rank writes the same: whole, by rename
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        tmp.replace(self.path)
        self.written = True

    @contextlib.contextmanager
    def kept_if_checkpointed(self):
        """Remove the record written by start(), and the directories it made that are still
        empty, if the run fails before its first checkpoint (a refused target, a bad config): it
        would describe a run that does not exist."""
        from cpm_lightning.checkpoint.directory import latest

        try:
            yield
        except BaseException:
            if self.written and latest(self.checkpoints) is None:
                self.path.unlink(missing_ok=True)
                for directory in self.created:
                    with contextlib.suppress(OSError):  # not empty: the run wrote there
                        directory.rmdir()
            raise


def _flag(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _card(args, cfg, base: dict, n_params: int, steps: int, resumed_at: int | None, loss, minutes: float,
          run_id: str | None) -> str:
    what = (f"LoRA of rank {cfg.rank} (alpha {cfg.alpha:g}) on {', '.join(cfg.targets)}" if cfg.method == "lora"
            else f"the prompt rows of {', '.join(f'{t} (row {r})' for t, r in zip(cfg.tasks, cfg.rows, strict=True))}")
    resumed = f" (resumed at step {resumed_at}: the minutes are the resumed part's)" if resumed_at else ""
    return "\n".join([
        "# Adapter", "",
        f"Tuned with `cpm-lightning tune {args.source} --config {args.config} --method {cfg.method}`: {what}, "
        f"{n_params:,} trained parameters.", "",
        f"- base: `{base['source']}`, weights sha256 `{base['sha256']}` (`--adapter` refuses any other base)",
        f"- steps: {steps}, {minutes:.1f} min{resumed}; last train/loss: {float(loss):.4f}" if loss is not None
        else f"- steps: {steps}, {minutes:.1f} min{resumed}",
        f"- MLflow run: `{run_id}`" if run_id else "- MLflow run: none (trainer.logger off)",
        "",
        f"Use: `cpm-lightning generate {base['source']} --adapter DIR [--merge] ...` (also evaluate, serve).", ""])
