"""The verb table (cli/main.py, `VERBS`): it names every verb its modules add and nothing else,
`main` dispatches from it importing only the verb's own modules, and no module in it imports
Lightning or MLflow."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from cpm_lightning.cli.main import VERBS, Runs, main, run_lightning
from cpm_lightning.train.run_config import VERBS as LIGHTNING_VERBS


def test_each_module_adds_exactly_the_verbs_the_table_gives_it():
    added = {}
    for module in {m for name, m in VERBS.items() if isinstance(m, str) and " " not in name}:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_commands(sub)
        added.update(dict.fromkeys(sub.choices, module))
    assert added == {name: m for name, m in VERBS.items() if isinstance(m, str) and " " not in name}
    assert {name for name, v in VERBS.items() if isinstance(v, Runs) and v.run is run_lightning} == set(LIGHTNING_VERBS)


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_a_module_adds_actions_to_another_modules_verb(capsys):
    assert help_of(capsys, "proposals", "trial").startswith(
        "usage: cpm-lightning proposals trial [-h] --config CONFIG --steps STEPS")
    assert "--tracking-uri TRACKING_URI" in help_of(capsys, "proposals", "show")


def test_help_lists_every_verb_of_the_table(capsys):
    out = help_of(capsys)
    assert "  live --config FILE       fit that takes up accepted proposals at their step, restarts\n" \
           "                           after crashes and rolls back from divergence (live --help)\n" in out
    for name, v in VERBS.items():
        if " " not in name:  # an action of another verb is in that verb's --help (above)
            assert (f"  {name} {v.args}" if isinstance(v, Runs) else f"\n    {name}") in out


def test_a_verb_imports_its_own_modules_and_no_module_of_the_table_imports_lightning_or_mlflow():
    script = ("import sys\n"
              "from cpm_lightning.cli.main import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'mlflow')"
              " or m.endswith(('.commands', '.tools', '.trial'))))")
    run = lambda *argv: subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,  # noqa: E731
                                       check=True).stdout.splitlines()[-1]
    assert run("report", "daily", "--help") == "['cpm_lightning.tracking.commands']"
    assert run("proposals", "list", "--help") == "['cpm_lightning.cli.trial', 'cpm_lightning.registry.commands']"
    assert run("--help") == ("['cpm_lightning.cli.tools', 'cpm_lightning.cli.trial', 'cpm_lightning.registry.commands', "
                             "'cpm_lightning.tracking.commands']")
