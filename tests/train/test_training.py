"""The trainer core end to end: components train, loss falls, resume is exact."""

from __future__ import annotations

import itertools
import math

import conftest
import lightning as L
import pytest
import torch
import yaml

from cpm_lightning.cli.main import main
from cpm_lightning.model import COMPONENTS, ArchConfig
from cpm_lightning.train.config import OptimConfig
from cpm_lightning.train.module import CausalLM
from datamodules.pretrain import PretrainDataModule
from datamodules.sources import SourceConfig


def tiny_data(corpus, **kw) -> PretrainDataModule:
    sources = {"en": SourceConfig(url=str(corpus["en"]), weight=0.7),
               "zh": SourceConfig(url=str(corpus["zh"]), weight=0.3, format="jsonl")}
    return PretrainDataModule(sources, tokenizer_vocab_size=400, **{"seq_len": 32, "batch_size": 4, **kw})


def fit(module, dm, steps, **trainer_kw):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_kw)
    trainer.fit(module, dm)
    return trainer


COMBOS = [dict(norm=n, position=p, ffn=f, attention=a)
          for n, p, f, a in itertools.product(*(sorted(COMPONENTS[k]) for k in ("norm", "position", "ffn", "attention")))]


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("components", COMBOS, ids=lambda c: "-".join(c.values()))
def test_every_component_choice_trains(corpus, components, num_kv_heads):
    dm = tiny_data(corpus)
    module = CausalLM(ArchConfig(preset="tiny", vocab_size=dm.vocab_size, num_kv_heads=num_kv_heads, **components))
    losses = []
    cb = L.Callback()
    cb.on_train_batch_end = lambda trainer, pl, out, batch, i: losses.append(float(out["loss"]))
    fit(module, dm, 3, callbacks=[cb], limit_val_batches=0)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    blocks = module.model.blocks
    assert type(blocks[0].attn_norm).__name__.lower() == components["norm"]
    assert blocks[0].attn.project_k.weight.shape[0] == num_kv_heads * 16
    assert isinstance(blocks[0].ffn, COMPONENTS["ffn"][components["ffn"]])


def test_prefix_lm_context_sees_ahead_and_targets_do_not():
    """A context token's output depends on later context tokens; a target's never on later ones."""
    from cpm_lightning.model import CPMAnt

    torch.manual_seed(0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=50))
    model.init_weights()
    ids = torch.randint(0, 50, (1, 8))
    context = torch.tensor([[True] * 4 + [False] * 4])
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 50  # last context token
    a, b = model(ids, context=context), model(changed, context=context)
    assert not torch.allclose(a[0, 0], b[0, 0])  # context position 0 sees position 3
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 50  # a target token
    a, b = model(ids, context=context), model(changed, context=context)
    assert torch.allclose(a[0, :6], b[0, :6]) and not torch.allclose(a[0, 6], b[0, 6])


@pytest.mark.slow
def test_validation_loss_falls_30_percent_in_200_steps(corpus):
    torch.manual_seed(0)
    dm = tiny_data(corpus)
    module = CausalLM(ArchConfig(preset="tiny", vocab_size=dm.vocab_size), optim=OptimConfig(lr=0.02))
    trainer = L.Trainer(max_steps=200, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=200, limit_val_batches=4,
                        inference_mode=False)  # validate() then fit(): metric states made under inference mode
    before = trainer.validate(module, dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, dm)
    after = trainer.callback_metrics["val/loss"].item()
    assert after <= 0.7 * before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "tolerance"), [("32-true", 1e-6), ("bf16-mixed", 1e-2)])
def test_resume_continues_with_the_next_batch_and_the_same_loss(tmp_path, corpus, precision, tolerance):
    """Under bf16-mixed too (issue 25 item 2): the same samples, the losses to bf16's tolerance."""
    record = {"trainer": {"callbacks": [{"class_path": "conftest.RecordBatches"}], "max_steps": 6,
                          "precision": precision}}

    def run(name, *extra):
        cfg = conftest.write_config(tmp_path / f"{name}.yaml", corpus, **{"trainer.default_root_dir": str(tmp_path / name),
                                                                          "registry.path": None})
        data = yaml.safe_load(cfg.read_text())
        data["trainer"].update(record["trainer"])
        cfg.write_text(yaml.safe_dump(data))
        conftest.RECORDED.clear()
        main(["fit", "--config", str(cfg), *extra])
        return list(conftest.RECORDED)

    straight = run("straight")
    first = run("resumed", "--trainer.max_steps=3")
    second = run("resumed", "--ckpt_path=last")
    assert [s for s, _, _ in straight] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _, _ in first + second] == [1, 2, 3, 4, 5, 6]
    for (_, a, loss_a), (_, b, loss_b) in zip(straight, first + second, strict=True):
        assert torch.equal(a, b)
        assert loss_a == pytest.approx(loss_b, abs=tolerance)


def test_validation_loss_is_the_log_of_perplexity_even_with_z_loss(corpus):
    """z-loss shapes training only: val/loss stays the cross entropy, exp(val/loss) = val/ppl."""
    from cpm_lightning.train.config import LossConfig

    dm = tiny_data(corpus)
    module = CausalLM(ArchConfig(preset="tiny", vocab_size=dm.vocab_size), loss=LossConfig(z_loss=1.0))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    metrics = trainer.validate(module, dm, verbose=False)[0]
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
