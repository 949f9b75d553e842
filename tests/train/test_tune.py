"""`tune` and `--adapter`: LoRA save/load/merge equal to the unmerged model, prompt tuning that
changes only its task's rows, the refusals, and a real tiny tuning run through `fit`."""

from __future__ import annotations

import json
import os
import signal

import conftest
import lightning as L
import pytest
import torch
import yaml

from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.train import adapters
from cpm_lightning.train.adapters import AdapterConfig, apply_adapter, attach, save_adapter

BASE = {"sha256": "b" * 64, "source": "test"}


def tiny(seed=0) -> CPMAnt:
    torch.manual_seed(seed)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=120, num_tasks=6, prompt_len=4))
    model.init_weights()
    return model


def ids():
    return torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))


def trained_lora(cfg) -> CPMAnt:
    model = tiny()
    attach(model, cfg)
    with torch.no_grad():  # B starts at zero; a trained adapter has not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model


def test_lora_saved_loaded_and_merged_equals_the_unmerged_model(tmp_path):
    cfg = AdapterConfig(rank=4)
    model = trained_lora(cfg).eval()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if "lora_" in n}
    x = ids()
    with torch.no_grad():
        expected = model(x)
        assert (expected - tiny().eval()(x)).abs().max() > 1e-3  # the adapter does something
    save_adapter(tmp_path, model, cfg, BASE, "card")
    for merge in (False, True):
        loaded = tiny()
        apply_adapter(loaded, tmp_path, BASE["sha256"], merge)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)
        assert any("lora_" in n for n, _ in loaded.named_parameters()) != merge
    assert set(loaded.state_dict()) == set(tiny().state_dict())  # merged: a plain CPMAnt


def test_prompt_tuning_changes_only_its_tasks_rows():
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cfg = AdapterConfig(method="prompt", tasks=("qa",)).for_tasks({"qa": 3})
    attach(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        model(ids(), task=torch.tensor([3, 3])).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    adapters.METHODS["prompt"].merge(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in after.items():
        if name != "prompt_embedding":
            assert torch.equal(value, before[name]), name
    changed = (after["prompt_embedding"] != before["prompt_embedding"]).any(-1).nonzero().flatten().tolist()
    assert changed == list(range(3 * 4, 4 * 4))  # qa's 4 rows, and only them


def test_an_adapter_for_another_base_or_shape_is_one_line(tmp_path):
    cfg = AdapterConfig(rank=4)
    save_adapter(tmp_path, trained_lora(cfg), cfg, BASE, "card")
    with pytest.raises(UserError, match=f"tuned on the base with weights sha256 {'b' * 64}, not on this one"):
        apply_adapter(tiny(), tmp_path, "c" * 64)
    record = json.loads((tmp_path / "adapter.json").read_text())
    (tmp_path / "adapter.json").write_text(json.dumps({**record, "rank": 2}))
    with pytest.raises(UserError, match="do not fit a lora adapter of rank 2 on this model: .* is \\[4, 64\\], expected \\[2, 64\\]"):
        apply_adapter(tiny(), tmp_path, BASE["sha256"])


def test_unknown_targets_method_and_missing_prompt_rows_are_refused():
    with pytest.raises(UserError, match="no projection named w_gate; its projections: attention_out"):
        adapters.check(tiny().cfg, AdapterConfig(targets=("project_q", "w_gate")))
    with pytest.raises(UserError, match="unknown --method 'ia3'; expected one of: lora, prompt"):
        AdapterConfig(method="ia3")
    no_tasks = CPMAnt(ArchConfig(preset="tiny", vocab_size=120, num_tasks=3)).cfg
    with pytest.raises(UserError, match=r"the model has 3 task prompts \(model.arch.num_tasks\), none for qa \(row 3\)"):
        adapters.check(no_tasks, AdapterConfig(method="prompt").for_tasks({"qa": 3}))


def write_base(tmp_path, corpus, seed=0):
    """A model directory of the tiny preset (num_tasks 6), its weights drawn from `seed`, with a
    tokenizer trained on `corpus`."""
    from cpm_lightning.checkpoint.modeldir import write_model_dir
    from cpm_lightning.core.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([conftest.english_text(60)], 300)
    torch.manual_seed(seed)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=tokenizer.vocab_size, num_tasks=6, prompt_len=4))
    model.init_weights()
    write_model_dir(tmp_path / "base", model.state_dict(), model.cfg.to_dict(), tokenizer)
    return tmp_path / "base"


def task_config(tmp_path, corpus, **overrides):
    lines = [{"task": "qa", "context": conftest.EN[i % 3][:60], "input": "Who?", "output": conftest.EN[i % 3][:12]}
             for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return conftest.write_config(tmp_path / "tune.yaml", corpus, **{
        "data.sources": {"qa": {"url": str(tmp_path / "qa.jsonl"), "format": "task"}}, "data.seq_len": 64,
        "trainer.max_steps": 12, "trainer.val_check_interval": 12, "checkpoint.every_n_steps": 12,
        "model.optim.lr": 0.01, "model.arch": {}, **overrides})


def test_an_adapter_for_another_base_or_rank_is_one_line_through_the_verbs(tmp_path, corpus, capsys):
    from cpm_lightning.checkpoint.modeldir import open_model_dir
    from cpm_lightning.train.adapters import base_sha256

    base = write_base(tmp_path, corpus)
    stored = open_model_dir(base)
    model = stored.build()
    cfg = AdapterConfig(rank=4)
    attach(model, cfg)
    for name in ("other", "rank"):
        (tmp_path / name).mkdir()
    save_adapter(tmp_path / "other", model, cfg, BASE, "card")
    save_adapter(tmp_path / "rank", model, cfg, {**BASE, "sha256": base_sha256(stored)}, "card")
    record = json.loads((tmp_path / "rank" / "adapter.json").read_text())
    (tmp_path / "rank" / "adapter.json").write_text(json.dumps({**record, "rank": 8}))
    generate = ("generate", str(base), "--prompt", "It is", "--max-new-tokens", "2", "--adapter")
    error = conftest.cli_error(capsys, *generate, str(tmp_path / "other"))
    assert error == (f"--adapter {tmp_path / 'other'} was tuned on the base with weights sha256 {'b' * 64}, "
                     f"not on this one ({base_sha256(stored)})")
    error = conftest.cli_error(capsys, *generate, str(tmp_path / "rank"), "--merge")
    assert error.startswith(f"--adapter {tmp_path / 'rank'}: its tensors do not fit a lora adapter of rank 8 on this "
                            "model: ") and error.endswith(", expected [8, 64]")
    config = task_config(tmp_path, corpus)
    assert conftest.cli_error(capsys, "tune", str(base), "--config", str(config), "--rank", "0",
                              "--out", str(tmp_path / "a")) == "--rank must be at least 1, got 0"
    assert not (tmp_path / "a").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tune_trains_only_the_adapter_and_its_loss_falls(tmp_path, corpus, capsys):
    base = write_base(tmp_path, corpus)
    config = task_config(tmp_path, corpus)
    main(["tune", str(base), "--config", str(config), "--rank", "4", "--out", str(tmp_path / "adapter")])
    out = capsys.readouterr().out
    assert "lora adapter" in out
    files = {p.name: p.stat().st_size for p in (tmp_path / "adapter").iterdir()}
    assert set(files) == {"adapter.json", "adapter.safetensors", "README.md"}
    assert files["adapter.safetensors"] < 200_000
    from mlflow import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss falls
    main(["generate", str(base), "--adapter", str(tmp_path / "adapter"), "--merge", "--prompt", "It is",
          "--max-new-tokens", "3"])


@pytest.mark.slow
def test_tune_refuses_a_projection_the_model_lacks_before_training(tmp_path, corpus, capsys):
    base = write_base(tmp_path, corpus)
    config = task_config(tmp_path, corpus)
    error = conftest.cli_error(capsys, "tune", str(base), "--config", str(config), "--targets", "w_gate",
                               "--out", str(tmp_path / "adapter"))
    assert "no projection named w_gate" in error
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "run").exists()  # no record, no empty run root


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after optimizer step `step`, as a scheduler preempting a job
    does: the checkpoint store saves at the next step boundary and stops the run."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_an_interrupted_tune_resumes_to_the_adapter_of_an_uninterrupted_one(tmp_path, corpus, capsys):
    from safetensors.torch import load_file

    base = write_base(tmp_path, corpus)
    straight = task_config(tmp_path, corpus, **{"trainer.default_root_dir": str(tmp_path / "straight")})
    main(["tune", str(base), "--config", str(straight), "--rank", "4", "--out", str(tmp_path / "a")])
    resumed = task_config(tmp_path, corpus, **{"trainer.default_root_dir": str(tmp_path / "resumed")})
    interrupted = tmp_path / "interrupted.yaml"
    data = yaml.safe_load(resumed.read_text())
    data["trainer"]["callbacks"] = [{"class_path": f"{__name__}.SigtermAt", "init_args": {"step": 5}}]
    interrupted.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    main(["tune", str(base), "--config", str(interrupted), "--rank", "4", "--out", str(tmp_path / "b")])
    assert "tune stopped at step 5 of 12: no adapter written" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())

    # Resuming it with another rank, or on another base, is refused before anything trains.
    error = conftest.cli_error(capsys, "tune", str(base), "--config", str(resumed), "--rank", "8", "--resume",
                               "--out", str(tmp_path / "b"))
    assert error == f"--resume: the tune run in {tmp_path / 'resumed'} trains an adapter of rank 4, not 8; give its options"
    other = write_base(tmp_path / "other", corpus, seed=1)
    error = conftest.cli_error(capsys, "tune", str(other), "--config", str(resumed), "--rank", "4", "--resume",
                               "--out", str(tmp_path / "b"))
    assert error.startswith(f"--resume: the tune run in {tmp_path / 'resumed'} tunes {base} (weights sha256 ")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == checkpoints

    main(["tune", str(base), "--config", str(resumed), "--rank", "4", "--resume", "--out", str(tmp_path / "b")])
    assert "(resumed at step 5" in (tmp_path / "b" / "README.md").read_text()
    a, b = load_file(str(tmp_path / "a" / "adapter.safetensors")), load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert set(a) == set(b) and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "a" / "adapter.json").read_text()) == json.loads(
        (tmp_path / "b" / "adapter.json").read_text())
