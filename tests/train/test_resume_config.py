"""A resumed run trains with the config it resolved (files -> proposals at its step -> command
line), not with the settings its checkpoint was saved with; AdamW's moments carry over. The
sharded (DCP) path is in test_fsdp.py."""

from __future__ import annotations

import json
import sys
import textwrap

import conftest
import pytest
import yaml

from cpm_lightning.cli.main import main

RESUME_AT = 3


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])  # LightningCLI warns about pytest's own


def run_config(tmp_path, corpus, **overrides):
    cfg = conftest.write_config(tmp_path / "run.yaml", corpus, **{
        "trainer.default_root_dir": str(tmp_path / "run"), "trainer.max_steps": RESUME_AT,
        "checkpoint.every_n_steps": RESUME_AT, "registry.path": None, "trainer.logger": False, **overrides})
    data = yaml.safe_load(cfg.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "fsdp_probe.RecordOptimizer", "init_args": {"out": str(tmp_path)}}]
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_command_line_overrides_of_a_single_file_resume_are_what_trains(tmp_path, corpus):
    cfg = run_config(tmp_path, corpus)
    main(["fit", "--config", str(cfg)])
    main(["fit", "--config", str(cfg), "--ckpt_path", "last", f"--trainer.max_steps={RESUME_AT + 2}",
          *conftest.override_args(conftest.RESUME_OVERRIDES)])
    conftest.assert_optimizer_used(tmp_path / "optim.jsonl", RESUME_AT)


def test_a_training_proposal_effective_at_the_resume_step_is_what_trains(tmp_path, corpus):
    registry = tmp_path / "proposals"
    registry.mkdir()
    changes = "".join(f"\n  {k}: {json.dumps(v)}" for k, v in conftest.RESUME_OVERRIDES.items())
    (registry / "0001-faster.yaml").write_text(textwrap.dedent(f"""\
        id: 1
        title: A new optimizer setting from step {RESUME_AT}
        kind: training
        status: accepted
        authors: ["@someone"]
        discussion: https://github.com/cpm-lightning/cpm-lightning/discussions/1
        created: 2026-11-01
        decided: 2026-11-02
        effective_from_step: {RESUME_AT}
        summary: Tried at a resume.
        motivation: The test.
        changes:""") + changes + "\n")
    cfg = run_config(tmp_path, corpus, **{"registry.path": str(registry)})
    main(["fit", "--config", str(cfg)])  # at step 0 the proposal is not in effect yet
    records = (tmp_path / "optim.jsonl").read_text().splitlines()
    assert all('"betas": [0.9, 0.95]' in r for r in records)
    main(["fit", "--config", str(cfg), "--ckpt_path", "last", f"--trainer.max_steps={RESUME_AT + 2}"])
    conftest.assert_optimizer_used(tmp_path / "optim.jsonl", RESUME_AT)


def test_an_architecture_that_does_not_fit_the_single_file_checkpoint_is_one_error(tmp_path, corpus, capsys):
    cfg = run_config(tmp_path, corpus)
    main(["fit", "--config", str(cfg)])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--model.arch.dim=128"])
    ckpt = (tmp_path / "run" / "checkpoints" / "last.ckpt").resolve()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: checkpoint {ckpt} cannot resume with this run's model.arch: model.arch.dim 64 -> 128: no migration "
        "changes it; it waits for the next model generation")
