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



def test_the_command_line_is_read_once_and_its_keys_reach_the_registry(tmp_path, corpus, monkeypatch):
    """run_args reads fit's command line once (the strict pre-check), and the registry takes the
    keys it set from that reading: a command-line value stays over a proposal's."""
    import cpm_lightning.cli.fit as fit
    import cpm_lightning.registry.run_args as run_args

    registry = tmp_path / "proposals"
    conftest.write_proposal(registry, 1, {"model.optim.lr": 0.5}, kind="training")
    cfg = conftest.write_config(tmp_path / "run.yaml", corpus, **{
        "trainer.default_root_dir": str(tmp_path / "run"), "trainer.max_steps": 1, "registry.path": str(registry),
        "trainer.logger": False})
    reads, read, planned, plan_run = [], run_args.read_run_args, [], fit.plan_run
    monkeypatch.setattr(run_args, "read_run_args", lambda argv: reads.append(argv) or read(argv))
    monkeypatch.setattr(fit, "plan_run", lambda cfg, sub, keys: planned.append((cfg, keys)) or plan_run(cfg, sub, keys))
    main(["fit", "--config", str(cfg), "--model.optim.lr=0.1"])
    assert reads == [["--config", str(cfg), "--model.optim.lr=0.1"]]
    (namespace, keys), = planned
    assert keys == {"model.optim.lr"} and namespace.model.optim.lr == 0.1  # the proposal's 0.5 is a divergence
