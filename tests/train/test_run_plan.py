"""The RunPlan: what a run starts from is worked out once, before any class is built. The
starting checkpoint is read once by cpm-lightning and once by Lightning's restore, not also by
LightningCLI's hyperparameter merge or the architecture check."""

from __future__ import annotations

import sys
from pathlib import Path

import conftest
import pytest
import torch

from cpm_lightning.cli.main import main


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])  # LightningCLI warns about pytest's own


def test_the_starting_checkpoint_is_opened_once_before_lightning_restores_it(tmp_path, corpus, monkeypatch):
    cfg = conftest.write_config(tmp_path / "run.yaml", corpus, **{
        "trainer.default_root_dir": str(tmp_path / "run"), "trainer.max_steps": 2, "checkpoint.every_n_steps": 2,
        "registry.path": None, "trainer.logger": False})
    main(["fit", "--config", str(cfg)])
    ckpt = (tmp_path / "run" / "checkpoints" / "last.ckpt").resolve()
    loads, load = [], torch.load

    def counted(f, *args, **kwargs):
        name = getattr(f, "path", f)  # Lightning's restore passes an fsspec file
        if isinstance(name, str | Path) and Path(name).resolve() == ckpt:
            loads.append(kwargs.get("mmap", False))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps=3"])
    assert loads == [True, False]  # read_checkpoint (memory-mapped: no tensor read), then Lightning's restore
    assert torch.load(ckpt.parent / "step-00000003.ckpt", weights_only=True)["global_step"] == 3
