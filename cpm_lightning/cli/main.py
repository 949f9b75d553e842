"""`cpm-lightning`: LightningCLI for fit/validate/test (fit.py), the `live` supervisor
(live/commands.py), argparse for the other verbs. Nothing imports this module; it imports each
verb's code only when that verb runs, so light commands start fast (docs/ARCHITECTURE.md,
"Layers").
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cpm_lightning.core.errors import UserError
from cpm_lightning.train.run_config import VERBS

# Modules that add verbs to `cpm-lightning`: each has `add_commands(subparsers)`, and each
# command it adds sets `func` (called with the parsed args).
COMMAND_MODULES = [
    "cpm_lightning.cli.tools",
    "cpm_lightning.tracking.commands",
    "cpm_lightning.registry.commands",
    "cpm_lightning.cli.trial",  # adds `proposals trial` and the trials of `proposals show`
]


def run_lightning(argv: list[str] | None) -> None:
    """argv None: LightningCLI reads sys.argv itself (it warns when given both). The run config
    is read strictly first (registry/run_args.py): YAML errors as file:line:column (jsonargparse
    names neither), and no aliases, duplicate keys or empty files, which jsonargparse would
    expand, merge or take for an inline config; `live` reads it so too, and refuses the same."""
    from cpm_lightning.registry.run_args import read_run_args

    read_run_args((sys.argv[1:] if argv is None else argv)[1:])  # after the verb
    from cpm_lightning.cli.fit import run

    run(argv)


class _Parser(argparse.ArgumentParser):
    """A usage mistake (a missing or unknown option, a value of the wrong type) as one line,
    like every other error, instead of argparse's usage block. Its subparsers are of this
    class too."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")


def tools_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cpm-lightning",
        description="Train CPM-Ant-style language models in public.\n\n"
        "Training verbs (LightningCLI; `cpm-lightning fit --help` lists every config key):\n"
        "  fit --config FILE        train (resume with --ckpt_path last)\n"
        "  validate --config FILE   validation metrics of a checkpoint\n"
        "  test --config FILE       test metrics of a checkpoint\n"
        "  live --config FILE       fit that takes up accepted proposals at their step, restarts\n"
        "                           after crashes and rolls back from divergence (live --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="other verbs", metavar="VERB")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from_sys = argv is None
    argv = sys.argv[1:] if from_sys else argv
    try:
        if argv and argv[0] in VERBS:
            run_lightning(None if from_sys else argv)
        elif argv and argv[0] == "live":  # its arguments are fit's: passed on as they are
            from cpm_lightning.live.commands import main as live

            live(argv[1:])
        else:
            args = tools_parser().parse_args(argv)
            if not hasattr(args, "func"):
                tools_parser().print_help()
                sys.exit(2)
            args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except argparse.ArgumentError as e:  # from jsonargparse (see run_lightning); its messages may span lines
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
