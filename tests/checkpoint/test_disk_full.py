"""A full disk under a checkpoint save (checkpoint/store.py `Checkpoints.save`): one line naming
the checkpoint, the half-written one removed, the last good one intact, and the run resumes from it."""

from __future__ import annotations

import errno

import lightning.pytorch as L
from conftest import cli_error
from torch.distributed.checkpoint.api import CheckpointException

from cpm_lightning.checkpoint.directory import complete_checkpoints, step_of
from cpm_lightning.checkpoint.store import write_error
from cpm_lightning.cli.main import main


def test_a_full_disk_under_a_checkpoint_save_is_one_line_and_the_last_checkpoint_resumes(tiny_config, tmp_path,
                                                                                          capsys, monkeypatch):
    save = L.Trainer.save_checkpoint

    def full_at_step_6(self, filepath, *args, **kwargs):
        if "step-00000006" in str(filepath):
            with open(filepath, "wb") as f:
                f.write(b"PK\x03\x04 half of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full_at_step_6)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert cli_error(capsys, "fit", "--config", str(tiny_config), "--trainer.logger", "false") == (
        f"checkpoint {checkpoints / 'step-00000006.ckpt'} could not be written (No space left on device); nothing "
        f"of it is kept, and the run can resume from {checkpoints / 'step-00000003.ckpt'} once there is room")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-00000003.ckpt"]
    monkeypatch.setattr(L.Trainer, "save_checkpoint", save)
    main(["fit", "--config", str(tiny_config), "--trainer.logger", "false", "--ckpt_path", "last"])
    assert [step_of(p) for p in complete_checkpoints(checkpoints)] == [3, 6]


def test_a_sharded_save_s_disk_error_is_found_inside_dcp_s_exception():
    """DCP's save raises a CheckpointException on every rank, holding each failed rank's error:
    a rank's full disk is the same one line as a single file's; any other failure is not."""
    full = OSError(errno.ENOSPC, "No space left on device")
    assert write_error(full) is full
    assert write_error(CheckpointException("save", {1: (full, None)})) is full
    assert write_error(CheckpointException("save", {0: (ValueError("bad"), None)})) is None
