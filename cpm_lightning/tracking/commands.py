"""MLflow verbs: `report daily|weekly|site`, `release`, `promote`, `pull`, `models list`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import TRUST_FLAG, TRUST_HELP
from cpm_lightning.tracking.config import DEFAULT_TRACKING_URI, TrackingConfig

URI_HELP = f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})"


def add_commands(sub) -> None:
    report = sub.add_parser("report", help="training logs").add_subparsers(metavar="KIND")
    daily = report.add_parser("daily", help="the training log of one UTC day: markdown + plot")
    daily.add_argument("--date", help="YYYY-MM-DD, UTC (default: today)")
    daily.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else cpm-lightning)")
    daily.add_argument("--out", required=True, type=Path, help="directory for DATE.md and DATE.png")
    daily.add_argument("--proposals", default="proposals", type=Path, help="the registry directory (default: proposals)")
    daily.set_defaults(func=report_daily)

    weekly = report.add_parser("weekly", help="the community digest of one ISO week: markdown + plot")
    weekly.add_argument("--week", help="YYYY-Www, e.g. 2026-W48, Monday to Sunday UTC (default: this week)")
    weekly.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else cpm-lightning)")
    weekly.add_argument("--registry", default="proposals", type=Path, help="the registry directory (default: proposals)")
    weekly.add_argument("--out", required=True, type=Path, help="directory for YYYY-Www.md and YYYY-Www.png")
    weekly.set_defaults(func=report_weekly)

    site = report.add_parser("site", help="the run's public static site: overview, metrics, logs, proposals, "
                             "releases, prompt book, applications, incidents")
    site.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else cpm-lightning)")
    site.add_argument("--registry", default="proposals", type=Path,
                      help="the registry directory, with prompts.yaml and apps.yaml (default: proposals)")
    site.add_argument("--out", required=True, type=Path,
                      help="the site: a symbolic link to the latest build in OUT.builds/, replaced atomically")
    site.set_defaults(func=report_site)

    rel = sub.add_parser("release", help="release a checkpoint (or an adapter: --adapter) to the MLflow Model Registry")
    rel.add_argument("checkpoint", nargs="?", help="a checkpoint written by fit")
    rel.add_argument("--adapter", type=Path, metavar="DIR", help="instead of a checkpoint: register the adapter "
                     "`cpm-lightning tune` wrote to DIR as a version of its own, linked to --base (refused unless "
                     "tuned on it)")
    rel.add_argument("--base", metavar="URI", help="with --adapter: the release it was tuned on, models:/NAME/VERSION "
                     "or models:/NAME@ALIAS")
    rel.add_argument("--name", required=True, help="registered model name")
    rel.add_argument("--alias", default="candidate", help="alias to point at the new version (default: candidate)")
    rel.add_argument("--out", type=Path, help="also keep the model directory here")
    rel.add_argument("--proposals", default="proposals", type=Path, help="the registry directory (default: proposals)")
    rel.add_argument("--sign-key", type=Path, metavar="KEY",
                     help="sign the release with this PEM elliptic-curve private key (OpenSSF model-signing)")
    rel.add_argument("--eval-tasks", help="the tasks of `cpm-lightning evaluate` whose scores the release records "
                     "(tags eval/TASK/METRIC and the card), comma-separated, or none (default: hellaswag,piqa,arc_easy, "
                     "and heldout with --eval-config)")
    rel.add_argument("--eval-limit", type=int, default=100, help="examples per task (default 100)")
    rel.add_argument("--eval-config", type=Path, metavar="CONFIG", help="the run config whose data sources heldout scores")
    rel.add_argument("--quantize", metavar="NAMES", help="also add these variants of the weights to the version, "
                     "comma-separated: int8, int4 (its group size the largest of 128, 64, 32 the model takes), "
                     "bfloat16, float16; each with its held-out bits per byte and its fidelity to float32 in the card "
                     "(`pull --variant NAME` downloads one alone)")
    rel.add_argument("--apps-limit", type=int, metavar="N", help="also re-score the adapter of every application of "
                     "the registry's apps.yaml on this release, N examples per task of the adapter (tags "
                     "app/NAME/TASK/METRIC and app/NAME/status: ok, or broken and why); the nightly releases of "
                     "`live` do (live.apps_limit)")
    rel.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    rel.set_defaults(func=release)

    pro = sub.add_parser("promote", help="point an alias at a registered version")
    pro.add_argument("name", help="registered model name")
    pro.add_argument("version", help="version number")
    pro.add_argument("--alias", required=True, help="e.g. stable")
    pro.set_defaults(func=promote)

    pull = sub.add_parser("pull", help="download a release, verify every file, then write it")
    pull.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    pull.add_argument("--dst", required=True, type=Path, help="directory to write (new or empty)")
    pull.add_argument("--verify-key", type=Path, metavar="PUB",
                      help="require a signature by this PEM public key (default: $CPM_LIGHTNING_TRUSTED_KEY, if set)")
    pull.add_argument("--variant", metavar="NAME", help="download only this variant of the release (int8, int4, ...: "
                      "`release --quantize`), not its float32 weights")
    pull.set_defaults(func=pull_model)

    models = sub.add_parser("models", help="the Model Registry").add_subparsers(metavar="ACTION")
    ls = models.add_parser("list", help="versions, aliases, steps and proposals")
    ls.add_argument("name", nargs="?", help="one registered model (default: all)")
    ls.set_defaults(func=models_list)

    for parser in (daily, weekly, site, rel, pro, pull, ls):
        parser.add_argument("--tracking-uri", help=URI_HELP)


def _use_tracking_uri(args) -> str:
    import mlflow

    from cpm_lightning.tracking.config import check_reachable

    uri = TrackingConfig(uri=args.tracking_uri).resolved_uri
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def report_daily(args) -> None:
    from cpm_lightning.tracking.report import daily_report

    try:
        date = dt.date.fromisoformat(args.date) if args.date else dt.datetime.now(dt.timezone.utc).date()
    except ValueError:
        raise UserError(f"--date {args.date!r}: expected YYYY-MM-DD") from None
    _use_tracking_uri(args)
    print(daily_report(date, TrackingConfig(experiment=args.experiment).resolved_experiment, args.out, args.proposals))


def report_weekly(args) -> None:
    from cpm_lightning.tracking.weekly import parse_week, weekly_report

    monday = parse_week(args.week)
    _use_tracking_uri(args)
    print(weekly_report(monday, TrackingConfig(experiment=args.experiment).resolved_experiment, args.registry, args.out))


def report_site(args) -> None:
    from mlflow.exceptions import MlflowException

    from cpm_lightning.tracking.config import without_credentials
    from cpm_lightning.tracking.site import build_site, tracking_secrets

    uri = _use_tracking_uri(args)
    try:
        build = build_site(TrackingConfig(experiment=args.experiment).resolved_experiment, args.registry, args.out,
                           tracking_secrets(uri))
    except MlflowException as e:  # the store went away, or refused, while the site was read
        why = str(e).strip().splitlines()[0].replace(uri, without_credentials(uri))
        for secret in tracking_secrets(uri)[1:]:
            why = why.replace(secret, "***")
        raise UserError(f"tracking store {without_credentials(uri)}: {why}; {args.out} was left as it was") from None
    print(f"{args.out} -> {build}")


def release(args) -> None:
    if args.adapter is not None:
        release_adapter(args)
        return
    if args.checkpoint is None:
        raise UserError("release: give a checkpoint written by fit, or --adapter DIR --base models:/NAME/VERSION")
    if args.base is not None:
        raise UserError("--base names the release an adapter was tuned on; give --adapter DIR too")
    from cpm_lightning.inference.evaluation import task_list
    from cpm_lightning.registry.commands import data_configs
    from cpm_lightning.tracking.integrity import check_variants
    from cpm_lightning.tracking.make_release import release as do_release

    if args.eval_limit < 1:
        raise UserError(f"--eval-limit must be at least 1, got {args.eval_limit}")
    if args.apps_limit is not None and args.apps_limit < 1:
        raise UserError(f"--apps-limit must be at least 1, got {args.apps_limit}")
    variants = check_variants(args.quantize.split(",") if args.quantize else [], f"--quantize {args.quantize}")
    tasks = [] if args.eval_tasks == "none" else task_list(args.eval_tasks, args.eval_config is not None)
    data = data_configs(args.eval_config)[0] if args.eval_config else None
    _use_tracking_uri(args)
    version = do_release(args.checkpoint, args.name, args.alias, args.out, args.proposals, args.sign_key, tasks,
                         args.eval_limit, data, variants, args.apps_limit)
    signed = f", signed with {args.sign_key}" if args.sign_key else ""
    added = f", with the variants {', '.join(variants)}" if variants else ""
    print(f"registered models:/{args.name}/{version}{added}{signed}; models:/{args.name}@{args.alias} points at it")


ADAPTER_REFUSES = ("quantize", "eval_tasks", "eval_config", "out", "apps_limit")
"""release's options about a checkpoint's release: an adapter is registered as it is."""


def release_adapter(args) -> None:
    from cpm_lightning.tracking.make_release import release_adapter as do_release

    if args.checkpoint is not None:
        raise UserError(f"release: a checkpoint ({args.checkpoint}) or --adapter {args.adapter}, not both")
    if args.base is None:
        raise UserError(f"--adapter {args.adapter}: give --base models:/NAME/VERSION, the release it was tuned on")
    if given := [f"--{k.replace('_', '-')}" for k in ADAPTER_REFUSES if getattr(args, k) is not None]:
        raise UserError(f"{', '.join(given)}: not with --adapter, which registers the adapter as it is (they are "
                        "about a checkpoint's release)")
    _use_tracking_uri(args)
    version, base = do_release(args.adapter, args.base, args.name, args.alias, args.sign_key)
    signed = f", signed with {args.sign_key}" if args.sign_key else ""
    print(f"registered models:/{args.name}/{version}, an adapter of {base}{signed}; models:/{args.name}@{args.alias} "
          "points at it")


def promote(args) -> None:
    from cpm_lightning.tracking.releases import promote as do_promote

    _use_tracking_uri(args)
    do_promote(args.name, args.version, args.alias)
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")


def pull_model(args) -> None:
    from cpm_lightning.tracking.releases import pull, trusted_key

    key = trusted_key(args.verify_key)
    _use_tracking_uri(args)
    signed = f"; signature verified with {key}" if key else "; no signature checked (no --verify-key)"
    what = f"the variant {args.variant} of the release" if args.variant else "the release"
    print(f"wrote {pull(args.uri, args.dst, key, args.variant)} ({what}; every file verified against the release's "
          f"manifest{signed})")


def models_list(args) -> None:
    from cpm_lightning.tracking.releases import list_models

    _use_tracking_uri(args)
    rows = list_models(args.name)
    cols = ("name", "version", "aliases", "step", "tokens", "val_loss", "proposals", "variants")
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    for row in [dict(zip(cols, cols, strict=True))] + rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in cols).rstrip())
