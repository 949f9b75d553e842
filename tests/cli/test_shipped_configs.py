"""Every file under configs/ is one a user runs as the README and docs say: a run config that
fit's parser accepts key by key, or a proposal that the registry accepts (copied under the
NNNN-slug.yaml name the Makefile gives it) with the limits of the run config it is run with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cpm_lightning.cli.main import main
from cpm_lightning.registry.apply import RegistryConfig
from cpm_lightning.registry.keys import ConfigSchema, check_changes
from cpm_lightning.registry.schema import load_proposal
from cpm_lightning.train.run_config import GROUPS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
PROPOSALS = [c for c in CONFIGS if "id" in yaml.safe_load(c.read_text())]
RUN_CONFIGS = [c for c in CONFIGS if c not in PROPOSALS]
RUN_WITH = {"demo-proposal.yaml": "demo-live.yaml", "demo-growth-proposal.yaml": "demo-growth.yaml",
            "demo-task-proposal.yaml": "demo-tasks.yaml"}
"""The run config whose `registry` limits a proposal meets, as the Makefile runs them (others:
the defaults, the project's data bucket)."""


def print_config(path: Path, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    return exit_info.value.code, capsys.readouterr().err


def test_configs_holds_both_kinds():
    assert {c.name for c in RUN_CONFIGS} >= {"demo.yaml", "tune-squad.yaml", "cpm-ant-10b.yaml"}
    assert {c.name for c in PROPOSALS} >= {"demo-proposal.yaml", "task-proposal.yaml"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=[c.name for c in RUN_CONFIGS])
def test_a_run_config_is_accepted_by_fits_parser(path, capsys):
    code, err = print_config(path, capsys)
    assert (code, [line for line in err.splitlines() if line.startswith("error:")]) == (0, [])


def test_a_misspelt_key_in_a_run_config_is_refused(tmp_path, capsys):
    text = (CONFIG_DIR / "tune-squad.yaml").read_text()
    assert "\n    lr: " in text
    (bad := tmp_path / "bad.yaml").write_text(text.replace("\n    lr: ", "\n    lrr: ", 1))
    code, err = print_config(bad, capsys)
    assert code == 2 and "error: Group 'model' does not accept option 'optim.lrr'" in err


@pytest.mark.parametrize("path", PROPOSALS, ids=[c.name for c in PROPOSALS])
def test_a_shipped_proposal_is_valid(path, tmp_path):
    copy = tmp_path / f"{yaml.safe_load(path.read_text())['id']:04d}-shipped.yaml"
    shutil.copy(path, copy)
    proposal, problems = load_proposal(copy)
    assert [str(p) for p in problems] == []
    run = yaml.safe_load((CONFIG_DIR / RUN_WITH[path.name]).read_text()) if path.name in RUN_WITH else {}
    limits = RegistryConfig(**run.get("registry", {}))  # the run's `registry` group: its limits among its keys
    assert [str(p) for p in check_changes(proposal, ConfigSchema(GROUPS), limits)] == []
