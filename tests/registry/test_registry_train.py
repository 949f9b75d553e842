"""Every accepted proposal of the seed registry builds the tiny preset and trains 2 steps on CPU,
alone and all together; data proposals build a valid data module."""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import pytest
from conftest import build_tiny

from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.resolve import load_registry, resolve, set_key
from cpm_lightning.train.run_config import GROUPS
from datamodules.pretrain import PretrainDataModule

SEED = Path(__file__).resolve().parents[2] / "proposals"
REGISTRY = load_registry(SEED, ConfigSchema(GROUPS))
ACCEPTED = sorted((p for p in REGISTRY.proposals.values() if p.status == "accepted"), key=lambda p: p.id)
MODEL_PROPOSALS = [p for p in ACCEPTED if p.kind in ("architecture", "training")]
ALL = resolve(REGISTRY, kinds=["architecture", "training"]).values
CASES = {p.label: p.changes for p in MODEL_PROPOSALS} | {"all": ALL}


@pytest.fixture(scope="module")
def data_config(tmp_path_factory) -> dict:
    """A small generated corpus; the tokenizer and shards are built once for all cases."""
    root = tmp_path_factory.mktemp("registry-train")
    words = ("the community proposes changes to the model and the data while it trains in public, "
             "every accepted proposal is folded into the run").split()
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(14)) for _ in range(600)))
    return {"sources": {"text": {"url": str(root / "corpus.txt")}}, "tokenizer_vocab_size": 300,
            "seq_len": 32, "batch_size": 4, "val_windows": 2, "cache_dir": str(root / "cache")}


def test_seed_has_model_proposals_of_both_kinds():
    assert {p.kind for p in MODEL_PROPOSALS} == {"architecture", "training"} and len(CASES) >= 6


@pytest.mark.parametrize("case", list(CASES))
def test_accepted_proposal_trains_tiny(case, data_config):
    values = CASES[case]
    model, dm = build_tiny(values, data_config)
    for key, value in values.items():  # the proposal's values reached the model
        group, name = key.split(".")[1:]
        assert getattr(getattr(model, group), name) == value
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("proposal", [p for p in ACCEPTED if p.kind == "data"], ids=lambda p: p.label)
def test_accepted_data_proposal_builds_a_data_module(proposal, data_config):
    config = {"data": dict(data_config)}
    for key, value in proposal.changes.items():
        set_key(config, key, value)
    dm = PretrainDataModule(**config["data"])  # reads nothing yet: the seed's sources are remote
    for key, value in proposal.changes.items():
        _, sources, name, field = key.split(".")
        assert sources == "sources" and getattr(dm.sources[name], field) == value
