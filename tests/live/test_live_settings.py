"""What `live` reads of a run config before any segment starts (live/settings.py): the reader fit
reads it with (registry/run_args.py), so `live` refuses what fit refuses, with fit's line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_error

from cpm_lightning.core.errors import UserError
from cpm_lightning.live.settings import read_settings

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_live_reads_a_group_file(tmp_path):
    # It read `--trainer t.yaml` as the string "t.yaml": "trainer.max_steps: live needs the run's
    # length (a positive integer), got None".
    (tmp_path / "t.yaml").write_text("max_steps: 2\n")
    for argv in (["--config", str(DEMO), "--trainer", "t.yaml"], ["--config", str(DEMO), "--trainer=t.yaml"]):
        settings = read_settings(argv)
        assert settings.max_steps == 2 and settings.config["trainer"]["log_every_n_steps"] == 10
        assert settings.argv == argv


@pytest.mark.parametrize("argv, content", [
    (["--config", "run.yaml"], "trainer:\n  max_steps: &n 4\n  val_check_interval: *n\n"),
    (["--config", str(DEMO), "--trainer=run.yaml"], "max_steps: &n 4\nval_check_interval: *n\n"),
    (["--config", "run.yaml"], "trainer:\n  max_steps: 4\ntrainer:\n  max_steps: 5\n"),
    (["--config", str(DEMO), "--trainer", "{max_steps: &n 4, val_check_interval: *n}"], ""),
    (["--config", "nope.yaml"], ""),
])
def test_live_refuses_what_fit_refuses_with_the_same_line(tmp_path, capsys, argv, content):
    # It read the files with yaml.safe_load: an alias expanded, a duplicate key merged, and the
    # segment's fit refused the run only once live had started.
    if content:
        (tmp_path / "run.yaml").write_text(content)
    with pytest.raises(UserError) as e:
        read_settings(argv)
    assert cli_error(capsys, "live", *argv) == cli_error(capsys, "fit", *argv) == str(e.value)
    assert not (tmp_path / "runs").exists()


def test_the_checkpoint_interval_defaults_to_checkpoints_own(tmp_path):
    (tmp_path / "run.yaml").write_text("trainer: {max_steps: 10}\nlive: {release_every_n_steps: 300}\n")
    with pytest.raises(UserError) as e:
        read_settings(["--config", "run.yaml"])
    assert str(e.value) == ("live.release_every_n_steps=300: expected a multiple of checkpoint.every_n_steps=500, "
                            "so that a checkpoint is written at every release step")


@pytest.mark.parametrize("argv, message", [
    (["--config", "run.yaml", "--ckpt_path", "last"],
     "live: --ckpt_path is not an option of live: live resumes each segment from the run's own checkpoints"),
    (["--config", "run.yaml", "--trainer", "fast"], "trainer: expected a mapping of trainer.* keys, got 'fast'"),
    (["run.yaml"], "unexpected argument 'run.yaml'; expected --config FILE and --key value options"),
])
def test_live_arguments_it_cannot_take(tmp_path, argv, message):
    (tmp_path / "run.yaml").write_text("trainer: {max_steps: 10}\n")
    with pytest.raises(UserError) as e:
        read_settings(argv)
    assert str(e.value) == message
