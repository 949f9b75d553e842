"""`cpm-lightning`: the verb table (`VERBS`) and the entry point that dispatches from it: LightningCLI
for fit/validate/test (cli/fit.py), the `live` supervisor (live/commands.py), argparse for the
other verbs. Nothing imports this module; it imports a verb's module only when that verb runs (or
`--help` lists them all), so light commands start fast (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import trusting_unverified


def run_lightning(argv: list[str] | None) -> None:
    """argv None: LightningCLI reads sys.argv itself (it warns when given both). The run config
    is read strictly first (registry/run_args.py): YAML errors as file:line:column (jsonargparse
    names neither), and no aliases, duplicate keys or empty files, which jsonargparse would
    expand, merge or take for an inline config; `live` reads it so too, and refuses the same."""
    from cpm_lightning.registry.run_args import read_run_args

    run_args = read_run_args((sys.argv[1:] if argv is None else argv)[1:])  # after the verb
    from cpm_lightning.cli.fit import run

    run(argv, run_args)


def _live(argv: list[str] | None) -> None:
    """Its arguments are fit's: passed on as they are."""
    from cpm_lightning.live.commands import main as live

    live((sys.argv[1:] if argv is None else argv)[1:])


@dataclass(frozen=True)
class Runs:
    """A verb that reads its own command line instead of argparse."""

    run: Callable[[list[str] | None], None]
    """Called with the command line after `cpm-lightning`; None: it is sys.argv's (LightningCLI
    reads that itself, and warns when given both)."""
    args: str
    """Its arguments as `--help` shows them."""
    help: str
    """Its line (lines) in `--help`."""


# Every verb of `cpm-lightning`, in the order `--help` lists them: name -> how it runs (Runs), or
# the module whose `add_commands(sub)` adds it to argparse (each command it adds sets `func`,
# called with the parsed args; it returns the subcommands of the verbs it adds that other modules
# add actions to). "VERB ACTION": a module that adds ACTION to another module's VERB; its
# `add_commands` gets VERB's subcommands. No module here may import Lightning or MLflow at its
# top: they take seconds, and `--help` imports every module (benchmarks/cli_startup.py).
TOOLS, TRACKING = "cpm_lightning.cli.tools", "cpm_lightning.tracking.commands"
VERBS: dict[str, Runs | str] = {
    "fit": Runs(run_lightning, "--config FILE", "train (resume with --ckpt_path last)"),
    "validate": Runs(run_lightning, "--config FILE", "validation metrics of a checkpoint"),
    "test": Runs(run_lightning, "--config FILE", "test metrics of a checkpoint"),
    "live": Runs(_live, "--config FILE", "fit that takes up accepted proposals at their step, restarts\n"
                                         "after crashes and rolls back from divergence (live --help)"),
    **dict.fromkeys(["model", "tokenizer", "data", "generate", "evaluate", "checkpoint", "convert"], TOOLS),
    **dict.fromkeys(["report", "release", "promote", "pull", "models"], TRACKING),
    "serve": "cpm_lightning.cli.serve",
    "tune": "cpm_lightning.cli.tune",
    "proposals": "cpm_lightning.registry.commands",
    "proposals trial": "cpm_lightning.cli.trial",  # and the trials of `proposals show`
}


class _Parser(argparse.ArgumentParser):
    """A usage mistake (a missing or unknown option, a value of the wrong type) as one line,
    like every other error, instead of argparse's usage block. Its subparsers are of this
    class too."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")


def verbs_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser of the argparse verbs: of `verb` alone (the modules of its VERBS entries), or,
    with None, of every verb (for `--help`, and a verb that is none of them)."""
    runs = [f"  {f'{name} {v.args}':<25}{v.help}".replace("\n", "\n" + " " * 27)
            for name, v in VERBS.items() if isinstance(v, Runs)]
    parser = _Parser(
        prog="cpm-lightning",
        description="Train CPM-Ant-style language models in public.\n\n"
        "Training verbs (LightningCLI; `cpm-lightning fit --help` lists every config key):\n" + "\n".join(runs),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="other verbs", metavar="VERB")
    subcommands, added = {}, set()
    for name, module in VERBS.items():
        of, _, action = name.partition(" ")
        if isinstance(module, Runs) or module in added or verb not in (None, of):
            continue
        added.add(module)
        if action:
            importlib.import_module(module).add_commands(subcommands[of])
        else:
            subcommands.update(importlib.import_module(module).add_commands(sub) or {})
    return parser


def main(argv: list[str] | None = None) -> None:
    from_sys = argv is None
    argv = sys.argv[1:] if from_sys else argv
    verb = VERBS.get(argv[0]) if argv else None
    try:
        if isinstance(verb, Runs):
            verb.run(None if from_sys else argv)
        else:
            args = verbs_parser(argv[0] if verb else None).parse_args(argv)
            if not hasattr(args, "func"):
                verbs_parser().print_help()
                sys.exit(2)
            with trusting_unverified(getattr(args, "trust_unverified", False)):  # the verbs' --trust-unverified
                args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except argparse.ArgumentError as e:  # from jsonargparse (see run_lightning); its messages may span lines
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
