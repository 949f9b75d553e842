"""`fit` applies the registry: MLflow provenance of a real run, and refusal on a bad registry."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from cpm_lightning.cli.main import main
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.limits import Limits
from cpm_lightning.registry.resolve import load_registry, resolve
from cpm_lightning.train.run_config import GROUPS

SEED = Path(__file__).resolve().parents[2] / "proposals"


def run_config(tmp_path: Path, registry: dict) -> Path:
    words = "a live run folds accepted proposals into the model while it trains".split()
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(500)))
    config = {
        "model": {"arch": {"preset": "tiny"}},
        "data": {"sources": {"text": {"url": str(tmp_path / "corpus.txt")}}, "tokenizer_vocab_size": 300,
                 "seq_len": 32, "batch_size": 4, "val_windows": 2, "cache_dir": str(tmp_path / "cache")},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "registry"},
        "registry": registry,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_records_exactly_the_applied_proposals(tmp_path):
    from mlflow import MlflowClient

    # The seed registry, with the English data proposal pointed at a local file so that the run
    # applies every kind.
    registry = tmp_path / "proposals"
    shutil.copytree(SEED, registry)
    english = registry / "0003-english-data.yaml"
    english.write_text(english.read_text().replace("s3://cpm-lightning-data/english/*.jsonl.gz",
                                                   str(tmp_path / "english.jsonl")))
    (tmp_path / "english.jsonl").write_text("".join(json.dumps({"text": f"An English line, number {i}."}) + "\n"
                                                    for i in range(300)))
    # The operator lets proposals read this directory (registry.allowed_sources).
    config = run_config(tmp_path, {"path": str(registry), "allowed_sources": [f"{tmp_path}/"]})
    main(["fit", "--config", str(config), "--model.arch.max_len=512"])

    expected = resolve(load_registry(registry, ConfigSchema(GROUPS), Limits(allowed_sources=[f"{tmp_path}/"])))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("registry").experiment_id])
    tags = run.data.tags
    assert tags["cpm.proposals"] == expected.ids == "0002,0003,0004,0005,0006,0007,0008"
    assert tags["cpm.overrides"] == "model.arch.max_len=512 (proposal 0002: 1024)"
    lock = json.loads(Path(client.download_artifacts(run.info.run_id, "proposals.lock", str(tmp_path))).read_text())
    assert sorted(lock) == expected.ids.split(",")
    for label, entry in lock.items():
        assert entry["sha256"] == hashlib.sha256((registry / entry["file"]).read_bytes()).hexdigest()
        assert entry["file"].startswith(label + "-")
    text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "position: rotary  # from proposal 0005" in lines
    assert "z_loss: 0.0001  # from proposal 0007" in lines
    assert "max_len: 512  # command line; diverges from proposal 0002 (1024)" in lines
    assert "weight: 0.3  # from proposal 0003" in lines
    resolved = yaml.safe_load(text)
    assert resolved["model"]["arch"]["ffn"] == "swiglu"
    assert resolved["data"]["sources"]["english"]["format"] == "jsonl"
    shards = [json.loads(m.read_text()) for m in (tmp_path / "cache").rglob("meta.json")]
    assert sorted(m["source"] for m in shards) == ["english", "text"]  # the data proposal's source was read


@pytest.mark.parametrize("registry, message", [
    ({}, "proposals: registry: no such directory; set registry.path to the proposal registry, or null"),
    ({"path": "reg"}, "reg/0001-bad.yaml:1: yaml: YAML tag !!python/object/apply:os.system is not allowed"),
])
def test_fit_refuses_to_start_on_a_bad_registry(tmp_path, capsys, registry, message):
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "0001-bad.yaml").write_text("!!python/object/apply:os.system [\"exit 3\"]\n")
    config = run_config(tmp_path, registry)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: 1 problem(s) in the proposal registry")
    assert message in err.splitlines()[1]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


def test_fit_refuses_a_negative_registry_step(tmp_path, capsys):
    config = run_config(tmp_path, {"path": str(SEED)})
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(config), "--registry.at_step=-1"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: registry.at_step must be >= 0, got -1\n"


def test_a_resumed_run_applies_the_proposals_in_effect_at_its_step(tmp_path):
    """A proposal effective from step 2 is not in the first 2 steps; the run resumed at step 2
    applies it (registry.at_step unset: the checkpoint's step)."""
    from mlflow import MlflowClient

    registry = tmp_path / "proposals"
    registry.mkdir()
    z_loss = (SEED / "0007-z-loss.yaml").read_text()
    assert "effective_from_step: 0\n" in z_loss
    (registry / "0007-z-loss.yaml").write_text(z_loss.replace("effective_from_step: 0\n", "effective_from_step: 2\n"))
    config = run_config(tmp_path, {"path": str(registry)})
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    main(["fit", "--config", str(config)])
    (run,) = client.search_runs([client.get_experiment_by_name("registry").experiment_id])
    assert run.data.tags.get("cpm.proposals", "") == ""
    main(["fit", "--config", str(config), "--ckpt_path=last", "--trainer.max_steps=4"])
    (run,) = client.search_runs([client.get_experiment_by_name("registry").experiment_id])
    assert run.data.tags["cpm.proposals"] == "0007"
    text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "z_loss: 0.0001  # from proposal 0007" in [line.strip() for line in text.splitlines()]
