"""Adapters as releases and the applications that follow the run (issue 24, items 3 and 5):
`release --adapter` against a real `mlflow server` registers an adapter (made by
train/adapters.py's save function on the base release, no tuning run) as a version of its own
linked to its base; `pull` verifies it and `generate --adapter models:/...` runs it; a later
release with `--apps-limit` (what the nightly releases of `live` pass) re-scores every
application's adapter on the new weights, and the site's applications page shows it; and the
bad inputs, each one line with nothing registered.

One tiny run (checkpoints at steps 3 and 6) and its releases (module fixtures) serve every test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import cli_error, write_config, write_corpus
from mlflow import MlflowClient

from cpm_lightning.checkpoint.modeldir import open_model_dir
from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.inference.book import App
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.tracking import integrity
from cpm_lightning.tracking.make_release import score_apps
from cpm_lightning.tracking.site_data import Release, app_history
from cpm_lightning.train.adapters import AdapterConfig, attach, base_sha256, save_adapter

QUESTION, PASSAGE = "Who is in want of a wife?", "A single man in possession of a good fortune is in want of a wife."


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])  # LightningCLI warns at pytest's own arguments
    yield
    mlflow.set_tracking_uri(None)  # the verbs set it process-wide


@pytest.fixture
def on_server(store, monkeypatch):
    """$MLFLOW_TRACKING_URI of the module's server (models:/ sources and adapters read it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])


def write_lora(out: Path, base: Path, sha256: str | None = None) -> Path:
    """A LoRA adapter of rank 2 on the model directory `base`, as `tune` saves one, its B
    matrices drawn (a trained adapter's are not zero); named as tuned on `sha256` (default:
    `base`'s own weights)."""
    stored = open_model_dir(base)
    model, cfg = stored.build(), AdapterConfig(rank=2)
    attach(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    out.mkdir()
    save_adapter(out, model, cfg, {"sha256": sha256 or base_sha256(stored), "source": str(base)},
                 "# Adapter\n\nSaved by the test, not tuned.\n")
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_server):
    """The run (experiment apps), apps-lm/1 (step 3), its adapter apps-qa/1, then apps.yaml with
    that adapter and one that does not exist, and apps-lm/2 (step 6) released with --apps-limit."""
    root = tmp_path_factory.mktemp("apps")
    registry = root / "registry"
    registry.mkdir()
    config = write_config(root / "config.yaml", write_corpus(root), **{
        "data.cache_dir": str(root / "cache"), "tracking.uri": mlflow_server.uri, "tracking.experiment": "apps"})
    ckpts = root / "run" / "checkpoints"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mp.setattr(sys, "argv", ["cpm-lightning"])
        main(["fit", "--config", str(config)])
        main(["release", str(ckpts / "step-00000003.ckpt"), "--name", "apps-lm", "--eval-tasks", "none",
              "--proposals", str(registry)])
        base = root / "base"
        main(["pull", "models:/apps-lm/1", "--dst", str(base)])
        adapter = write_lora(root / "adapter", base / integrity.MODEL_DIR)
        main(["release", "--adapter", str(adapter), "--base", "models:/apps-lm@candidate", "--name", "apps-qa"])
        (registry / "apps.yaml").write_text(yaml.safe_dump({"apps": [
            {"name": "QA helper", "authors": ["@cy"], "link": "https://example.org/qa", "release": "models:/apps-lm/1",
             "adapter": "models:/apps-qa/1"},
            {"name": "Gone", "authors": ["@dee"], "link": "https://example.org/gone", "release": "models:/apps-lm/1",
             "adapter": "models:/apps-qa/7"}]}))
        main(["release", str(ckpts / "step-00000006.ckpt"), "--name", "apps-lm", "--eval-tasks", "none",
              "--proposals", str(registry), "--apps-limit", "2"])
        out = root / "public"
        main(["report", "site", "--experiment", "apps", "--registry", str(registry), "--out", str(out)])
    return {"root": root, "uri": mlflow_server.uri, "registry": registry, "base": base, "adapter": adapter,
            "site": out, "ckpts": ckpts}


@pytest.mark.slow  # a real mlflow server, a training run, releases
def test_an_adapter_is_a_version_linked_to_its_base(store, capsys):
    client = MlflowClient(store["uri"])
    base = client.get_model_version("apps-lm", "1").tags
    tags = client.get_model_version("apps-qa", "1").tags
    assert tags["adapter_of"] == "models:/apps-lm/1"  # the alias resolved: the version it was tuned on
    assert tags["base_sha256"] == base_sha256(open_model_dir(store["base"] / integrity.MODEL_DIR))
    assert (tags["method"], tags["rank"], tags["tasks"]) == ("lora", "2", "qa")
    assert client.get_registered_model("apps-qa").aliases == {"candidate": "1"}
    assert integrity.MANIFEST_TAG in tags and base[integrity.MANIFEST_TAG] != tags[integrity.MANIFEST_TAG]

    pulled = store["root"] / "pulled-adapter"
    main(["pull", "models:/apps-qa/1", "--dst", str(pulled), "--tracking-uri", store["uri"]])
    assert "every file verified" in capsys.readouterr().out
    assert {p.name for p in pulled.iterdir()} == {"adapter.json", "adapter.safetensors", "README.md", "MANIFEST.json"}
    for name in ("adapter.json", "adapter.safetensors"):
        assert (pulled / name).read_bytes() == (store["adapter"] / name).read_bytes()
    card = (pulled / "README.md").read_text()
    assert card.startswith("# apps-qa: an adapter of models:/apps-lm/1\n") and "Saved by the test, not tuned." in card


@pytest.mark.slow  # a real mlflow server, a training run, releases
def test_generate_runs_an_adapter_version_on_its_base(store, on_server, capsys):
    base = str(store["base"])
    x = torch.tensor([[5, 9, 11, 4, 7]])
    with torch.no_grad():
        by_uri = load_model(base, adapter="models:/apps-qa/1")[0](x)
        by_dir = load_model(base, adapter=str(store["adapter"]))[0](x)
        plain = load_model(base)[0](x)
    torch.testing.assert_close(by_uri, by_dir, atol=0, rtol=0)
    assert (by_uri - plain).abs().max() > 1e-3  # the adapter was applied
    argv = ["generate", base, "--task", "qa", "--context", PASSAGE, "--prompt", QUESTION, "--max-new-tokens", "6",
            "--temperature", "0"]
    main([*argv, "--adapter", "models:/apps-qa/1"])
    main([*argv, "--adapter", str(store["adapter"])])
    first, second = capsys.readouterr().out.splitlines()[-2:]
    assert first == second
    # A base release is no adapter, refused before anything is downloaded.
    assert cli_error(capsys, *argv, "--adapter", "models:/apps-lm/1") == (
        "--adapter models:/apps-lm/1: models:/apps-lm/1 is not an adapter version (no tag adapter_of); expected one "
        "`cpm-lightning release --adapter` registered")


@pytest.mark.slow  # a real mlflow server, a training run, releases
def test_a_release_rescores_the_applications_adapters(store):
    tags = MlflowClient(store["uri"]).get_model_version("apps-lm", "2").tags
    assert tags["app/QA helper/status"] == "ok"  # tuned on version 1, applied to version 2 all the same
    scores = {k: float(v) for k, v in tags.items() if k.startswith("app/QA helper/qa/")}
    assert set(scores) == {"app/QA helper/qa/exact_match", "app/QA helper/qa/f1"}
    assert all(0 <= v <= 1 for v in scores.values())
    assert tags["app/Gone/status"].startswith("broken: models:/apps-qa/7: model 'apps-qa' has no version '7'")
    assert not [k for k in MlflowClient(store["uri"]).get_model_version("apps-lm", "1").tags if k.startswith("app/")]


@pytest.mark.slow  # a real mlflow server, a training run, releases
def test_the_applications_page_shows_each_release_of_each_adapter(store):
    apps = (store["site"] / "apps.html").read_text()
    assert "<td>models:/apps-qa/1</td>" in apps and "<h2>QA helper</h2>" in apps
    assert "fell by more than 10% of its value and more than 0.01" in apps
    helper = apps[apps.index("<h2>QA helper</h2>"):apps.index("<h2>Gone</h2>")]
    assert "<th>qa/exact_match</th><th>qa/f1</th>" in helper
    assert '<a href="releases.html#v-apps-lm-2">models:/apps-lm/2</a></td><td>6</td>' in helper
    assert "<b>first</b>" in helper and "models:/apps-lm/1</a></td><td>3</td>" not in helper  # v1 did not score it
    gone = apps[apps.index("<h2>Gone</h2>"):]
    assert "<b>broken</b>: models:/apps-qa/7: model &#x27;apps-qa&#x27; has no version &#x27;7&#x27;" in gone


@pytest.mark.slow  # a real mlflow server, a training run, releases
def test_an_adapter_of_another_architecture_is_broken_not_a_crash(store, on_server):
    stored = open_model_dir(store["base"] / integrity.MODEL_DIR)
    other = CPMAnt(ArchConfig(**{**stored.arch, "dim": 32, "head_dim": 8}))
    tags = score_apps([App("QA helper", ["@cy"], "https://example.org/qa", "models:/apps-lm/1", "models:/apps-qa/1")],
                      lambda: other, "0" * 64, stored.require_tokenizer(), 2)
    assert tags == {"app/QA helper/status": tags["app/QA helper/status"]}
    assert tags["app/QA helper/status"].startswith("broken: --adapter ") and "do not fit a lora adapter of rank 2" \
        in tags["app/QA helper/status"]


def release_of(version: int, tags: dict) -> Release:
    return Release("lm", str(version), [], tags, created_ms=version, run_id=None)


def test_the_verdicts_follow_the_stated_rule():
    app = App("A", ["@a"], "https://example.org", "models:/lm/1", "models:/a/1")
    f1 = "app/A/qa/f1"
    history = app_history(app, [release_of(v, t) for v, t in [
        (6, {"app/A/status": "ok", f1: "0.45"}),  # runs again after 5
        (1, {"app/A/status": "ok", f1: "0.50"}),
        (2, {}),  # did not score it
        (3, {"app/A/status": "ok", f1: "0.60"}),
        (4, {"app/A/status": "ok", f1: "0.50"}),
        (5, {"app/A/status": "broken: its tensors do not fit"}),
        (7, {"app/A/status": "ok", f1: "0.40"}),  # fell by 0.05, more than 10% of 0.45
        (8, {"app/A/status": "ok", f1: "0.405"})]])  # within NOISE
    assert [(r.release.version, r.verdict) for r in history] == [
        ("1", "first"), ("3", "better"), ("4", "worse"), ("5", "broken"), ("6", "fixed"), ("7", "worse"), ("8", "same")]


@pytest.mark.slow  # a real mlflow server, a training run, releases
def test_bad_input_is_one_line_and_registers_nothing(store, capsys, tmp_path):
    client = MlflowClient(store["uri"])
    before = {m.name: len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()}
    uri = ["--tracking-uri", store["uri"]]
    assert cli_error(capsys, "release", "--adapter", str(tmp_path), "--base", "models:/apps-lm/1", "--name", "apps-x",
                     *uri) == (f"--adapter {tmp_path}: not an adapter directory (expected adapter.json and "
                               "adapter.safetensors, as `cpm-lightning tune` writes them)")
    other = write_lora(tmp_path / "other", store["base"] / integrity.MODEL_DIR, sha256="c" * 64)
    assert cli_error(capsys, "release", "--adapter", str(other), "--base", "models:/apps-lm/2", "--name", "apps-x",
                     *uri).startswith(f"--adapter {other} was tuned on the base with weights sha256 {'c' * 64}, not on "
                                      "models:/apps-lm/2 (weights sha256 ")
    assert cli_error(capsys, "release", "--adapter", str(store["adapter"]), "--base", "models:/apps-qa/1",
                     "--name", "apps-x", *uri) == ("--base models:/apps-qa/1: an adapter version, not a base release; "
                                                   "expected the release the adapter was tuned on")
    assert cli_error(capsys, "release", "--adapter", str(store["adapter"]), "--name", "apps-x", *uri) == (
        f"--adapter {store['adapter']}: give --base models:/NAME/VERSION, the release it was tuned on")
    assert cli_error(capsys, "release", "--adapter", str(store["adapter"]), "--base", "models:/apps-lm/1",
                     "--quantize", "int8", "--name", "apps-x", *uri) == (
        "--quantize: not with --adapter, which registers the adapter as it is (they are about a checkpoint's release)")
    assert cli_error(capsys, "release", "--name", "apps-x", *uri) == (
        "release: give a checkpoint written by fit, or --adapter DIR --base models:/NAME/VERSION")
    after = {m.name: len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()}
    assert after == before
    # An apps.yaml adapter that is not a models:/ URI: the release refuses it before any work.
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "apps.yaml").write_text(yaml.safe_dump({"apps": [
        {"name": "Bad", "authors": ["@e"], "link": "https://example.org", "release": "models:/apps-lm/1",
         "adapter": str(store["adapter"])}]}))
    assert cli_error(capsys, "release", str(store["ckpts"] / "step-00000006.ckpt"), "--name", "apps-lm",
                     "--eval-tasks", "none", "--proposals", str(registry), "--apps-limit", "2", *uri) == (
        f"{registry / 'apps.yaml'}:2: apps[0] (name Bad): adapter: expected an adapter version (`cpm-lightning release "
        f"--adapter`), models:/NAME/VERSION or models:/NAME@ALIAS, got {str(store['adapter'])!r}")
    assert cli_error(capsys, "release", str(store["ckpts"] / "step-00000006.ckpt"), "--name", "apps-lm",
                     "--apps-limit", "0", *uri) == "--apps-limit must be at least 1, got 0"
    assert len(client.search_model_versions("name='apps-lm'")) == before["apps-lm"]
