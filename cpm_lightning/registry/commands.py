"""`cpm-lightning proposals new|check|list|show|resolve`."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
from datetime import date
from pathlib import Path
from typing import get_args, get_type_hints

import yaml

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tasks import input_text
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.inference.book import APPS_FILE, PROMPTS_FILE, App, Prompt, read_book
from cpm_lightning.inference.generate import book_prompt_len, book_tokens, length_problem
from cpm_lightning.model.config import ArchConfig
from cpm_lightning.registry.apply import AppliedRegistry, RegistryConfig
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.limits import Limits
from cpm_lightning.registry.resolve import TEMPLATE, load_registry, proposal_files, resolve, set_key
from cpm_lightning.registry.run_args import read_run_config
from cpm_lightning.registry.schema import ACCEPTED, FILE_NAME, KINDS, Status
from cpm_lightning.registry.typecheck import mismatch
from cpm_lightning.train.run_config import GROUPS
from datamodules.config import DataConfig
from datamodules.sources import SourceConfig


def add_commands(sub) -> dict:
    """Add `proposals` to `sub`; returns its subcommands by name, for the actions cli/trial.py adds
    to it (cli/main.py, `VERBS`)."""
    kinds, statuses = list(KINDS), list(get_args(Status))
    proposals = sub.add_parser("proposals", help="the community proposal registry").add_subparsers(metavar="ACTION")
    registry = dict(default="proposals", help="the registry directory (default: proposals)")

    new = proposals.add_parser("new", help="write a draft proposal at the next free id and print its path")
    new.add_argument("--title", required=True, help="one line saying what changes")
    new.add_argument("--kind", required=True, choices=kinds)
    new.add_argument("--dir", **registry)
    new.set_defaults(func=proposals_new)

    limits = Limits()
    check = proposals.add_parser("check", help="validate proposals, and the prompt book and applications list of "
                                               "each registry directory; exit 2 and list every problem if any")
    check.add_argument("paths", nargs="*", default=["proposals"], metavar="PATH",
                       help="registry directories or proposal files (default: proposals)")
    check.add_argument("--allowed-sources", nargs="+", default=limits.allowed_sources, metavar="PREFIX",
                       help="locations proposals may make a run read, as registry.allowed_sources "
                            f"(default: {' '.join(limits.allowed_sources)})")
    check.add_argument("--max-params", type=int, default=limits.max_params, metavar="N",
                       help=f"largest model proposals may make, as registry.max_params (default: {limits.max_params})")
    check.add_argument("--against", metavar="CKPT",
                       help="a checkpoint written by fit (or a model directory): also tell, for each architecture "
                            "proposal, whether a migration folds it into that model while it trains, and which, or why not; "
                            "and count each prompt's tokens with its tokenizer against its maximum length")
    max_len = ArchConfig().resolved().max_len
    check.add_argument("--max-len", type=int, default=max_len, metavar="N",
                       help="without --against: the maximum length a prompt must fit, its text counted as at most "
                            f"UTF-8 bytes + 1 tokens (default: {max_len}, the default preset's)")
    check.set_defaults(func=proposals_check)

    ls = proposals.add_parser("list", help="one line per proposal")
    ls.add_argument("--status", choices=statuses)
    ls.add_argument("--kind", choices=kinds)
    ls.add_argument("--dir", **registry)
    ls.set_defaults(func=proposals_list)

    show = proposals.add_parser("show", help="print one proposal")
    show.add_argument("id", type=int)
    show.add_argument("--dir", **registry)
    show.set_defaults(func=proposals_show)

    res = proposals.add_parser("resolve", help="print a run config with the accepted proposals applied")
    res.add_argument("--config", required=True, help="run config file; its `registry` group picks the proposals")
    res.add_argument("--at-step", type=int, default=None, help="resolve at this step (default: registry.at_step)")
    res.set_defaults(func=proposals_resolve)
    return {"proposals": proposals}


def config_schema() -> ConfigSchema:
    return ConfigSchema(GROUPS)


def proposals_new(args) -> None:
    directory = Path(args.dir)
    template = directory / TEMPLATE
    if not template.is_file():
        raise UserError(f"--dir: no {TEMPLATE} in {directory}; expected a registry directory")
    if "\n" in args.title or not args.title.strip():
        raise UserError("--title: expected one non-empty line")
    numbers = [int(m[1]) for p in directory.iterdir() if (m := FILE_NAME.match(p.name))]
    pid = max(numbers, default=0) + 1
    slug = "-".join(re.findall(r"[a-z0-9]+", args.title.lower())[:6]) or "proposal"
    path = directory / f"{pid:04d}-{slug}.yaml"
    fill = {"id": str(pid), "title": json.dumps(args.title), "kind": args.kind, "status": "draft",
            "created": date.today().isoformat()}
    text = template.read_text(encoding="utf-8")
    for name, value in fill.items():  # the template's own comments stay
        text, n = re.subn(rf"^{name}:[^\n]*?(\s+#[^\n]*)?$", lambda m, name=name, value=value: f"{name}: {value}{m[1] or ''}", text,
                          count=1, flags=re.M)
        if not n:
            raise UserError(f"{template}: no `{name}:` line to fill in")
    path.write_text(text, encoding="utf-8")
    print(path)


def proposals_check(args) -> None:
    if args.max_params < 1:
        raise UserError(f"--max-params must be at least 1, got {args.max_params}")
    schema, limits = config_schema(), Limits(allowed_sources=args.allowed_sources, max_params=args.max_params)
    if args.max_len < 1:
        raise UserError(f"--max-len must be at least 1, got {args.max_len}")
    # A bad --against fails before the proposals are read.
    arch, tokenizer = _model_of(args.against) if args.against else (None, None)
    problems, count, books, proposals = [], 0, 0, []
    for arg in args.paths:
        path = Path(arg)
        if path.is_dir():
            reg = load_registry(path, schema, limits)
            problems += reg.problems + _book_problems(path, arch, tokenizer, args.max_len)
            proposals += reg.proposals.values()
            count += len(proposal_files(path))
            books += sum(os.path.lexists(path / name) for name in (PROMPTS_FILE, APPS_FILE))
        elif not os.path.lexists(path):
            problems.append(f"{arg}: path: no such file or directory")
        elif path not in proposal_files(path.parent):
            problems.append(f"{arg}: file: not a proposal; expected NNNN-slug.yaml (not {TEMPLATE})")
        else:  # a file, or a link or special file that load_registry refuses
            reg = load_registry(path.parent, schema, limits)
            problems += [p for p in reg.problems if Path(p.path) == path]
            proposals += [p for p in reg.proposals.values() if Path(p.path) == path]
            count += 1
    for problem in problems:
        print(problem)
    checked = f"{count} proposal file(s)" + (f" and {books} prompt book and applications file(s)" if books else "")
    if problems:
        print(f"{len(problems)} problem(s) in {checked}", file=sys.stderr)
        sys.exit(2)
    print(f"{checked} OK")
    if arch:
        print(f"against {args.against} ({arch['preset']}-based, step {arch.pop('step')}):")
        for p in sorted(proposals, key=lambda p: p.id):
            print(f"{p.label} {p.title}: {_foldable(p, arch)}")


def _model_of(source: str) -> tuple[dict, Tokenizer | None]:
    """The resolved model.arch of a checkpoint or model directory with its step (0 for a model
    directory), and its tokenizer when it has one. Imports torch (and, for a checkpoint,
    Lightning): --against only."""
    from cpm_lightning.checkpoint.migrate_on_load import resolved
    from cpm_lightning.checkpoint.modeldir import is_model_dir, open_model_dir

    if is_model_dir(Path(source)):
        stored = open_model_dir(source)
        return {**resolved(stored.arch), "step": 0}, stored.tokenizer
    from cpm_lightning.checkpoint.store import read_checkpoint

    saved = read_checkpoint(Path(source))
    tokenizer = saved.meta.tokenizer
    return ({**resolved(saved.meta.arch), "step": saved.step},
            tokenizer and Tokenizer.from_bytes(tokenizer, f"{source}: its tokenizer"))


def _book_problems(directory: Path, arch: dict | None, tokenizer: Tokenizer | None, max_len: int) -> list[str]:
    """The problems of the prompt book and the applications list of registry `directory`: their
    own, and the prompts that do not fit the maximum length of `arch`'s model (--against),
    counted with its tokenizer, else `max_len`. Without the tokenizer a prompt's tokens are
    bounded by its UTF-8 bytes + 1: SentencePiece with byte fallback spends at most a token per
    byte, plus one for the word boundary it puts first; CPM-Ant's tokenizer at most one per
    character."""
    prompts, problems = read_book(directory, Prompt)
    problems += read_book(directory, App)[1]
    cfg = ArchConfig(**{f.name: arch[f.name] for f in dataclasses.fields(ArchConfig)}) if arch else None
    if cfg is not None and tokenizer is not None:
        return problems + book_tokens(prompts, tokenizer, cfg)[1]
    limit = cfg.max_len if cfg else max_len
    name = "the model's maximum length {} (it has no tokenizer)" if cfg else \
        "--max-len {} (--against CKPT counts the model's own tokens)"
    found = (length_problem(p, len(input_text(p.text, p.context).encode()) + 1, book_prompt_len(cfg, p) if cfg else 0,
                            limit, bound=True, limit=name) for p in prompts)
    return problems + [p for p in found if p]


def _foldable(p, arch: dict) -> str:
    """Whether migrations fold architecture proposal `p` into a model of resolved `arch`."""
    from cpm_lightning.checkpoint.migrate_on_load import resolved
    from cpm_lightning.model.migrate import plan

    prefix = "model.arch."
    if p.kind != "architecture":
        return f"{p.kind}: no migration needed"
    new = {**arch, **{k.removeprefix(prefix): v for k, v in p.changes.items() if k.startswith(prefix)}}
    try:
        steps = plan(arch, resolved(new))
    except UserError as e:  # NoMigration, or a shape the model config refuses
        return f"cannot be folded in: {e}"
    if not steps:
        return "already in this model"
    return f"folds in by {', '.join(map(str, steps))}"


def _registry(directory: str):
    reg = load_registry(directory, config_schema())
    if reg.problems:
        print(f"warning: {len(reg.problems)} problem(s) in {directory}, left out here; "
              f"see `cpm-lightning proposals check {directory}`", file=sys.stderr)
    return reg


def proposals_list(args) -> None:
    reg = _registry(args.dir)
    for p in sorted(reg.proposals.values(), key=lambda p: p.id):
        if args.status in (None, p.status) and args.kind in (None, p.kind):
            print(f"{p.label}  {p.status:<10}  {p.kind:<12}  step {p.effective_from_step:<7}  {p.title}")


def proposals_show(args) -> None:
    p = _registry(args.dir).get(args.id)
    print(f"# {p.path}  sha256 {p.sha256}")
    print(p.path.read_text(encoding="utf-8"), end="")


def proposals_resolve(args) -> None:
    if args.at_step is not None and args.at_step < 0:
        raise UserError(f"--at-step must be >= 0, got {args.at_step}")
    path = Path(args.config)
    config = read_run_config(path)
    settings = registry_settings(config, path)
    if settings.path is None:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return
    reg = load_registry(settings.path, config_schema(), settings)
    at_step = (settings.at_step or 0) if args.at_step is None else args.at_step
    applied = _resolved(config, reg, settings, at_step)
    print(f"# {path} with the proposals of {settings.path} effective at step {at_step}: "
          f"{applied.resolution.ids or 'none'}")
    print(applied.annotate(yaml.safe_dump(config, sort_keys=False)), end="")


def _resolved(config: dict, reg, settings: RegistryConfig, at_step: int) -> AppliedRegistry:
    """Set the values of the proposals effective at `at_step` into `config`."""
    applied = AppliedRegistry(resolve(reg, at_step, settings.kinds, settings.exclude, settings.trial))
    for key, value in applied.resolution.values.items():
        set_key(config, key, value)
    return applied


def registry_settings(config: dict, path: Path) -> RegistryConfig:
    """The `registry` group of run config `config` (read from `path`), checked."""
    return RegistryConfig(**checked_group(config.get("registry") or {}, RegistryConfig, "registry", path))


def checked_group(group: dict, cls: type, name: str, path: Path) -> dict:
    """A group of the run config (`registry`, `data`, a source of `data.sources`), its keys and
    their types checked as LightningCLI would."""
    if not isinstance(group, dict):
        raise UserError(f"{path}: {name}: expected a mapping of {cls.__name__} fields, got {group!r}")
    hints = get_type_hints(cls)
    for key, value in group.items():
        if key not in hints:
            wrong = f"unknown key; expected: {', '.join(hints)}"
        elif cls is DataConfig and key == "sources" and isinstance(value, dict):
            for source, fields in value.items():
                checked_group(fields, SourceConfig, f"data.sources.{source}", path)
            continue
        else:
            wrong = mismatch(value, hints[key])
        if wrong:
            raise UserError(f"{path}: {name}.{key}: {wrong}")
    return group


def data_configs(path: Path) -> list[DataConfig]:
    """The `data` group of a run config as `fit` builds it at its first step and at each later
    step where an accepted data proposal of the registry it follows takes effect (the sources a
    live run will read), each distinct one once."""
    config = read_run_config(path)
    settings = registry_settings(config, path)
    start = settings.at_step or 0
    steps = [start]
    if settings.path is not None:
        reg = load_registry(settings.path, config_schema(), settings)
        steps += sorted({p.effective_from_step for p in reg.proposals.values()
                         if p.status == ACCEPTED and p.kind == "data" and "data" in settings.kinds
                         and p.id not in settings.exclude and p.effective_from_step > start})
    found = {}
    for step in steps:
        resolved = copy.deepcopy(config)
        if settings.path is not None:
            _resolved(resolved, reg, settings, step)
        data = checked_group(resolved.get("data") or {}, DataConfig, "data", path)
        found.setdefault(json.dumps(data, sort_keys=True, default=str), data)
    return [DataConfig(**data) for data in found.values()]
