"""Tasks through the registry (issue 24 item 2): a data proposal adds a `task` source and the
prompt rows of its task (model.arch.num_tasks) from a step, as CPM-Ant+ added question answering
to its live run; the model migrates (grow_num_tasks), the ledger says so, and the site charts the
QA score before and after. A task proposal that reads outside registry.allowed_sources is refused
before anything trains. The config pair of `make demo-tasks` passes the registry's checks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_config, write_corpus
from live_support import git_registry, history, live_config, one, proposal, records

from cpm_lightning.checkpoint.directory import latest
from cpm_lightning.checkpoint.store import read_meta
from cpm_lightning.cli.main import main
from cpm_lightning.live.settings import read_settings

REPO = Path(__file__).resolve().parents[2]
SQUAD = REPO / "cpm_lightning" / "inference" / "task_data" / "squad.jsonl"
DEMO = ["--config", "configs/demo.yaml", "--config", "configs/demo-tasks.yaml"]


def qa_source(root: Path, n: int = 40) -> Path:
    """Real SQuAD lines (the evaluation's shipped file) in the `task` format, those with short
    answers (a sample's output must fit the tiny run's seq_len of 32)."""
    path = root / "qa.jsonl"
    lines = [r for r in map(json.loads, SQUAD.read_text().splitlines()) if len(r["answers"][0]) <= 12][:n]
    path.write_text("".join(json.dumps({"task": "qa", "context": r["context"][:200], "input": r["question"],
                                        "output": r["answers"][0]}) + "\n" for r in lines))
    return path


def qa_proposal(url: Path, step: int) -> tuple[str, str]:
    return proposal(1, "data", {"data.sources.qa": {"url": str(url), "weight": 0.5, "format": "task"},
                                "model.arch.num_tasks": 4}, step=step)


@pytest.mark.slow
def test_a_task_proposal_mid_run_grows_the_prompt_table_and_the_site_charts_qa_before_and_after(
        tmp_path, live_env, capsys):
    live_env.chdir(tmp_path)
    corpus = write_corpus(tmp_path)
    registry, _ = git_registry(tmp_path, dict([qa_proposal(qa_source(tmp_path), step=4)]))
    cfg = live_config(tmp_path, corpus, [], **{
        "trainer.max_steps": 6, "registry.path": str(registry), "model.arch.prompt_len": 4,  # a sample fits seq_len 32
        "eval.every_n_steps": 2, "eval.tasks": ["qa"], "eval.limit": 2,  # as configs/demo-tasks.yaml, shortened
        "live.site_dir": str(tmp_path / "site"), "live.site_every_minutes": 60})
    main(["live", "--config", str(cfg)])
    recs = records(tmp_path)
    assert recs[0]["in_effect"] == [] and recs[-1]["kind"] == "stop" and recs[-1]["exit"] == 0
    applied = one(recs, "applied", proposals=[1])
    assert f"live: {json.dumps(applied)}\n" in capsys.readouterr().out  # printed when it happens
    assert applied["step"] == 4 and applied["reason"] == (
        "0001 effective from step 4; the model migrated: grow_num_tasks (model.arch.num_tasks 0 -> 4)")
    assert [(m["name"], m["old"], m["new"], m["exact"]) for m in applied["migrations"]] == [
        ("grow_num_tasks", 0, 4, True)]
    assert applied["changes"]["model.arch.num_tasks"] == {"old": 0, "new": 4}
    qa = {m.step: m.value for m in history(tmp_path, "data/samples/qa")}
    assert min(qa) > 4 and qa[max(qa)] > 0  # trained on from the step it took effect at, not before
    cpm = read_meta(latest(tmp_path / "run" / "checkpoints"))["cpm"]
    assert cpm["arch"]["num_tasks"] == 4
    assert [(m["name"], m["step"]) for m in cpm["migrations"]] == [("grow_num_tasks", 4)]
    # The QA score before the proposal (step 2, no qa prompt rows) and after (step 6) is in the
    # MLflow run, and the site built when `live` ended charts each of those points.
    for metric in ("exact_match", "f1"):
        assert [m.step for m in history(tmp_path, f"eval/qa/{metric}")] == [2, 4, 6]
    qa = (tmp_path / "site" / "metrics.html").read_text().split("<h2>Evaluation: qa</h2>")[1].split("<h2>")[0]
    by_step = qa.split("</svg>")[0]
    charted = re.findall(r'points="([^"]*)"><title>[^<]* (eval/qa/\w+)</title>', by_step)
    assert [(key, len(points.split())) for points, key in charted] == [("eval/qa/exact_match", 3), ("eval/qa/f1", 3)]


def test_a_task_proposal_reading_outside_the_allowed_sources_is_refused_before_anything(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    url = qa_source(outside)
    (tmp_path / "reg").mkdir()
    name, text = qa_proposal(url, step=0)
    (tmp_path / "reg" / name).write_text(text)
    cfg = write_config(tmp_path / "config.yaml", corpus, registry={
        "path": "reg", "allowed_sources": [f"{tmp_path / 'allowed'}/"]})
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[0] == "error: 1 problem(s) in the proposal registry reg; nothing is applied:"
    assert err[1].endswith(f"changes.data.sources.qa.url: {str(url)!r} is not under an allowed prefix; a proposal "
                           f"may name only locations under registry.allowed_sources ({tmp_path / 'allowed'}/)")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_the_demo_tasks_config_pair_adds_qa_mid_run_from_an_allowed_source(tmp_path, monkeypatch, capsys):
    """`make demo-tasks` (configs/demo-tasks.yaml, its proposal configs/demo-task-proposal.yaml):
    the registry it assembles passes the checks `live` applies, with the pair's
    registry.allowed_sources, from the repository's root as make runs it; the proposal takes
    effect at an evaluation step in the middle of the run, which scores qa."""
    monkeypatch.chdir(REPO)
    settings = read_settings(DEMO)
    registry = tmp_path / "registry"
    registry.mkdir()
    for seed in (REPO / "proposals").glob("*.yaml"):
        shutil.copy(seed, registry)
    shutil.copy(REPO / "configs" / "demo-task-proposal.yaml", registry / "0012-train-question-answering.yaml")
    main(["proposals", "check", "--allowed-sources", *settings.registry.allowed_sources, "--", str(registry)])
    assert capsys.readouterr().out.splitlines()[-1] == "10 proposal file(s) and 2 prompt book and applications file(s) OK"
    task = yaml.safe_load((REPO / "configs" / "demo-task-proposal.yaml").read_text())
    step, every = task["effective_from_step"], settings.eval.every_n_steps
    assert 0 < step < settings.max_steps and step % every == 0 and settings.max_steps - step >= 2 * every
    assert "qa" in settings.eval.tasks and "data" in settings.registry.kinds and 12 not in settings.registry.exclude
    assert (REPO / task["changes"]["data.sources.squad"]["url"]).is_file()
