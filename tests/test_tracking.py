"""MLflow against a real `mlflow server`: live metrics, a server outage, resume into the same
run, the daily report, release -> pull -> generate, and the bad inputs of issue 5.

One training job (module fixture `live`) is watched while it runs: its server is killed and
started again mid-run, then the job is resumed from an earlier checkpoint, released, and
reported on. The later tests build on it, in order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import write_config, write_corpus
from mlflow import MlflowClient

from cpm_lightning import modeldir
from cpm_lightning.checkpoint import trained_model
from cpm_lightning.cli import main
from cpm_lightning.generate import prompt_inputs, sample
from cpm_lightning.loader import load_model
from cpm_lightning.tracking.logger import START_STEP, Sender

STEP = re.compile(r"step-?(\d+)\.ckpt$")
PROMPT = "It is a truth"
HANG_GUARD_S = 600  # a wait that lasts this long means the code under test hangs


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    """The verbs set MLflow's process-wide tracking URI (right for a one-shot CLI); later tests
    must not inherit this module's server."""
    yield
    mlflow.set_tracking_uri(None)


def checkpoints(root: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in (root / "run" / "checkpoints").glob("*.ckpt") if (m := STEP.search(p.name))}


def wait_for(what: str, predicate, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + HANG_GUARD_S
    while not (value := predicate()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"fit exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {HANG_GUARD_S} s")
        time.sleep(0.3)
    return value


def steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def cli(*argv: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """`cpm-lightning ARGV` in a new process."""
    proc = subprocess.run([sys.executable, "-m", "cpm_lightning.cli", *argv], env=env, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"cpm-lightning {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def cli_error(capsys, *argv: str) -> str:
    """The one-line error `cpm-lightning ARGV` exits with (status 2), in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def greedy(source: str, n: int = 12) -> list[int]:
    model, tokenizer = load_model(source)
    return sample(model, tokenizer.encode(PROMPT), n, temperature=0, eos_id=tokenizer.eos_id)


@dataclass
class Live:
    root: Path
    config: Path
    env: dict
    run_id: str
    readable_while_running: list[int]
    """train/loss steps read from the server while fit was running."""
    outage_checkpoint: int
    """Step of a checkpoint written while the server was down."""
    log: str


@pytest.fixture(scope="module")
def live(tmp_path_factory, mlflow_server) -> Live:
    root = tmp_path_factory.mktemp("live")
    config = write_config(root / "config.yaml", write_corpus(root), **{
        "trainer.max_steps": 1_000_000, "trainer.val_check_interval": 10, "trainer.limit_val_batches": 1,
        "checkpoint.every_n_steps": 5, "checkpoint.keep_last": 10_000, "registry.path": None,
        "data.cache_dir": str(root / "cache"), "tracking.experiment": "live", "tracking.flush_timeout": 300})
    # No HTTP retries inside MLflow: the logger's own retry loop is what is under test.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "CPM_LIGHTNING_CACHE": str(root / "cache")}
    log = root / "fit.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cpm_lightning.cli", "fit", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    client = MlflowClient(mlflow_server.uri)

    def run_with_metrics():
        exp = client.get_experiment_by_name("live")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs and steps(client, runs[0].info.run_id) and runs[0].info.run_id

    try:
        run_id = wait_for("the first metrics", run_with_metrics, proc, log)
        readable = steps(client, run_id) if proc.poll() is None else []
        mlflow_server.stop()
        before = max(checkpoints(root), default=0)
        outage = wait_for("a checkpoint written while the server is down",
                          lambda: max((s for s in checkpoints(root) if s >= before + 10), default=None), proc, log)
        mlflow_server.start()
        wait_for("the metrics buffered during the outage", lambda: max(steps(client, run_id)) > outage, proc, log)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the job stops as an operator would stop it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    return Live(root, config, env, run_id, readable, outage, log.read_text())


def test_metrics_are_readable_while_fit_runs(live):
    assert live.readable_while_running and live.readable_while_running[0] == 0


def test_server_outage_loses_no_metric_step_and_no_checkpoint(live, mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    logged = steps(client, live.run_id)
    assert logged == list(range(max(logged) + 1))  # every step, none twice
    assert max(logged) > live.outage_checkpoint
    assert live.outage_checkpoint in checkpoints(live.root)
    assert "tracking store unreachable" in live.log and "the tracking store is back" in live.log


def test_run_carries_tags_and_system_metrics(live, mlflow_server):
    run = MlflowClient(mlflow_server.uri).get_run(live.run_id)
    tags = run.data.tags
    assert tags["cpm.preset"] == "tiny" and tags["cpm.world_size"] == "1"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert float(tags["cpm.bytes_per_token"]) > 1
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)


@pytest.fixture(scope="module")
def resumed(live, mlflow_server) -> tuple[int, int, Path]:
    """Resume from the newest checkpoint older than the last logged step, so some steps are
    trained and logged again. Returns (resume step, last step before, final checkpoint)."""
    last = max(steps(MlflowClient(mlflow_server.uri), live.run_id))
    start = max(s for s in checkpoints(live.root) if s < last)
    cli("fit", "--config", str(live.config), "--ckpt_path", str(checkpoints(live.root)[start]),
        "--trainer.max_steps", str(last + 3), env=live.env)
    return start, last, checkpoints(live.root)[last + 3]


def test_resumed_job_continues_the_same_run(live, resumed, mlflow_server):
    start, last, _ = resumed
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("live").experiment_id])
    assert [r.info.run_id for r in runs] == [live.run_id]
    starts = sorted(client.get_metric_history(live.run_id, START_STEP), key=lambda m: m.timestamp)
    assert [m.value for m in starts] == [0, start]
    logged = steps(client, live.run_id)  # step s is the (s+1)-th optimizer step
    assert sorted(set(logged)) == list(range(last + 3))
    assert len(logged) - len(set(logged)) == last - start + 1  # steps start..last were trained again
    assert runs[0].info.status == "FINISHED"


@pytest.fixture(scope="module")
def released(resumed, live, mlflow_server) -> str:
    ckpt = resumed[2]
    main(["release", str(ckpt), "--name", "live-lm", "--tracking-uri", mlflow_server.uri])
    main(["promote", "live-lm", "1", "--alias", "stable", "--tracking-uri", mlflow_server.uri])
    return str(ckpt)


def test_release_pull_in_new_process_generates_like_the_checkpoint(released, live, mlflow_server, tmp_path):
    version = MlflowClient(mlflow_server.uri).get_model_version("live-lm", "1")
    ckpt_meta = torch.load(released, map_location="cpu", weights_only=False)
    assert version.tags["step"] == str(ckpt_meta["global_step"])
    assert version.tags["tokens"] == str(ckpt_meta["cpm"]["tokens_seen"])
    assert version.tags["proposals"] == "none" and float(version.tags["val_loss"]) > 0
    cli("pull", "models:/live-lm@candidate", "--dst", str(tmp_path / "pulled"), env=live.env)
    card = (tmp_path / "pulled" / "MODEL_CARD.md").read_text()
    assert f"- step: {ckpt_meta['global_step']}" in card and "val/loss" in card
    hashed = {name for _, name in modeldir.HASH_LINE.findall(card)}
    assert {"model.safetensors", "config.json", "tokenizer.model", "hf/model.safetensors", "hf/config.json",
            "hf/tokenizer.json"} <= hashed
    assert greedy(str(tmp_path / "pulled")) == greedy(released)

    # The release's Hugging Face layout opens in transformers and computes the same logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_model(str(tmp_path / "pulled"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pulled" / "hf").eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "pulled" / "hf")(PROMPT).input_ids])
    assert ids[0].tolist() == tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids, **prompt_inputs(model, ids, "cpm-ant"))
    assert (got - expected).abs().max() <= 1e-4

    listing = cli("models", "list", "live-lm", env=live.env).stdout.splitlines()
    assert listing[1].split()[:3] == ["live-lm", "1", "candidate,stable"]


def test_pyfunc_model_loads_by_alias_in_a_fresh_process(released, live):
    code = ("import json, mlflow; m = mlflow.pyfunc.load_model('models:/live-lm@stable'); "
            f"print(json.dumps(m.predict([{PROMPT!r}], params={{'temperature': 0.0, 'max_new_tokens': 12}})))")
    proc = subprocess.run([sys.executable, "-c", code], env=live.env, capture_output=True, text=True, cwd=live.root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, tokenizer = load_model(released)
    assert json.loads(proc.stdout.splitlines()[-1]) == [tokenizer.decode(greedy(released))]


def test_daily_report_of_a_day_with_a_restart(released, resumed, live, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    first = client.get_metric_history(live.run_id, START_STEP)[0]
    day = time.strftime("%Y-%m-%d", time.gmtime(first.timestamp / 1000))
    main(["report", "daily", "--date", day, "--experiment", "live", "--out", str(tmp_path), "--tracking-uri", mlflow_server.uri])
    text = (tmp_path / f"{day}.md").read_text()
    start, last, final = resumed
    tokens = torch.load(final, map_location="cpu", weights_only=False)["cpm"]["tokens_seen"]
    assert f"- tokens seen in total: {tokens:,}" in text
    assert f"- restarts: 1 (resumed at steps {start})" in text
    assert f"- steps trained again after a restart (counted once): {last - start + 1}" in text
    assert "- skipped or NaN steps: 0" in text
    assert "- releases: models:/live-lm/1" in text
    for field in ("loss at the start of the day", "loss at the end of the day", "average grad norm", "progress",
                  "throughput", "proposals that took effect", "of text"):
        assert field in text
    assert (tmp_path / f"{day}.png").stat().st_size > 0
    assert {Path(a.path).name for a in client.list_artifacts(live.run_id, "daily")} == {f"{day}.md", f"{day}.png"}

    main(["report", "daily", "--date", "2001-01-01", "--experiment", "live", "--out", str(tmp_path),
          "--tracking-uri", mlflow_server.uri])
    assert "No training on 2001-01-01" in (tmp_path / "2001-01-01.md").read_text()


# -- bad input ----------------------------------------------------------------------------------
def test_unknown_model_name_alias_or_version_lists_what_exists(released, mlflow_server, capsys):
    uri = ["--tracking-uri", mlflow_server.uri]
    assert "no registered model 'nope'; the registry has: live-lm" in cli_error(capsys, "pull", "models:/nope@stable", "--dst", "x", *uri)
    assert "has no alias 'gold'; its aliases: candidate -> 1, stable -> 1" in cli_error(
        capsys, "pull", "models:/live-lm@gold", "--dst", "x", *uri)
    assert "has no version '7'; its versions: 1" in cli_error(capsys, "promote", "live-lm", "7", "--alias", "stable", *uri)
    assert "--alias 'latest' is reserved by MLflow" in cli_error(capsys, "promote", "live-lm", "1", "--alias", "latest", *uri)


def test_unreachable_server_at_start_fails_before_any_work(tiny_config, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = cli_error(capsys, "fit", "--config", str(tiny_config), "--registry.path", "null",
                      "--tracking.uri", f"http://127.0.0.1:{port}")
    assert error.startswith(f"error: tracking server http://127.0.0.1:{port} is unreachable (ConnectionError)")
    assert not (tmp_path / "cache").exists()  # no tokenizer trained, no shards


@pytest.mark.parametrize("verb", [["release", "--name", "x"], ["generate", "--prompt", "x"]], ids=lambda v: v[0])
def test_release_or_generate_of_a_checkpoint_without_tokenizer(released, tmp_path, capsys, verb):
    ckpt = torch.load(released, map_location="cpu", weights_only=False)
    del ckpt["cpm"]["tokenizer"]
    torch.save(ckpt, tmp_path / "no-tokenizer.ckpt")
    assert cli_error(capsys, verb[0], str(tmp_path / "no-tokenizer.ckpt"), *verb[1:]) == (
        f"error: {tmp_path / 'no-tokenizer.ckpt'}: the checkpoint carries no tokenizer; expected one saved by "
        "`fit` (checkpoint['cpm']['tokenizer'])")


@pytest.fixture
def model_dir(released, tmp_path) -> Path:
    out = tmp_path / "model"
    trained = trained_model(released)
    modeldir.write_model_dir(out, trained.model, trained.arch, trained.model.tokenizer, "# a release")
    return out


def test_file_not_matching_its_sha256_is_refused_at_load(model_dir, capsys):
    with (model_dir / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    error = cli_error(capsys, "generate", str(model_dir), "--prompt", PROMPT)
    assert re.fullmatch(rf"error: {model_dir}/model.safetensors: sha256 [0-9a-f]{{16}}\.\.\. does not match "
                        r"[0-9a-f]{16}\.\.\. recorded in MODEL_CARD.md; the file is damaged or was changed", error)


def test_weights_whose_shapes_disagree_with_config_json(model_dir, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    config["ff_dim"] *= 2
    (model_dir / "config.json").write_text(json.dumps(config))
    card = model_dir / "MODEL_CARD.md"  # re-record the hash: the shapes are what is under test
    card.write_text(re.sub(r"[0-9a-f]{64}(?=  config.json)", modeldir.sha256(model_dir / "config.json"), card.read_text()))
    error = cli_error(capsys, "generate", str(model_dir), "--prompt", PROMPT)
    assert re.fullmatch(rf"error: {model_dir}/model.safetensors: \S+ has shape \[\d+, \d+\], but config.json "
                        r"expects \[\d+, \d+\]", error)


# -- the sender on its own ----------------------------------------------------------------------
class FlakyClient:
    """An MLflow client whose log_batch fails while `down`."""

    def __init__(self, down: bool):
        self.down, self.requests = down, []

    def log_batch(self, run_id, metrics, params, tags):
        if self.down:
            raise ConnectionError("connection refused")
        self.requests.append(metrics)

    @property
    def metrics(self):
        return [m for request in self.requests for m in request]


def test_unsent_metrics_go_to_a_local_file_and_are_sent_by_the_next_start(tmp_path, capsys):
    from mlflow.entities import Metric

    fallback = tmp_path / "mlflow-unsent-run.jsonl"
    sender = Sender(FlakyClient(down=True), "run", fallback, retry_s=0.05)
    sender.put([Metric("train/loss", 2.5, 1000, 7)])
    assert not sender.close(timeout=0.2)
    assert "1 metrics/params/tags written to" in capsys.readouterr().err
    client = FlakyClient(down=False)
    assert Sender(client, "run", fallback).close(timeout=HANG_GUARD_S)
    assert [(m.key, m.value, m.timestamp, m.step) for m in client.metrics] == [("train/loss", 2.5, 1000, 7)]
    assert not fallback.exists()


def test_the_sender_sends_one_request_per_interval_and_the_rest_on_close(tmp_path):
    from mlflow.entities import Metric

    client = FlakyClient(down=False)
    sender = Sender(client, "run", tmp_path / "mlflow-unsent-run.jsonl", interval=3600)
    sender.put([Metric("train/loss", 2.5, 1000, 0)])
    wait_for("the first request", lambda: client.requests)
    for step in (1, 2, 3):  # within the interval: kept for one later request
        sender.put([Metric("train/loss", 2.5, 1000, step)])
    assert sender.close(timeout=HANG_GUARD_S)
    assert [[m.step for m in request] for request in client.requests] == [[0], [1, 2, 3]]


def test_fit_logs_to_the_default_sqlite_store(tiny_config, tmp_path):
    main(["fit", "--config", str(tiny_config), "--registry.path", "null"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cpm-lightning").experiment_id])
    assert steps(client, run.info.run_id) == list(range(6))
    assert run.info.status == "FINISHED" and run.data.tags["cpm.preset"] == "tiny"
