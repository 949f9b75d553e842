"""Shared fixtures: small real corpora written to tmp, and a tiny run config."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import textwrap
from datetime import date
from pathlib import Path

import lightning as L
import pytest
import yaml

# Real text, public domain: the opening of the Analects and of Pride and Prejudice, repeated
# with variations so a tokenizer and a tiny model have something to learn.
ZH = ["子曰：「學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？人不知而不慍，不亦君子乎？」",
      "有子曰：「其為人也孝弟，而好犯上者，鮮矣；不好犯上，而好作亂者，未之有也。」",
      "曾子曰：「吾日三省吾身：為人謀而不忠乎？與朋友交而不信乎？傳不習乎？」"]
EN = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
      "must be in want of a wife.",
      "However little known the feelings or views of such a man may be on his first entering a "
      "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
      "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at last?"]


def cli_error(capsys, *argv: str) -> str:
    """The one-line error `cpm-lightning ARGV` exits with (status 2, no traceback), in this
    process, without its `error: `."""
    from cpm_lightning.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0].removeprefix("error: ")


def english_text(paragraphs: int = 400) -> str:
    return "\n\n".join(f"{EN[i % 3]} ({i})\n\t{EN[(i * 7) % 3]}" for i in range(paragraphs))


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Every test gets its own cache and tracking store, and runs in its tmp dir."""
    monkeypatch.setenv("CPM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def corpus(tmp_path) -> dict[str, Path]:
    return write_corpus(tmp_path)


def write_corpus(root: Path) -> dict[str, Path]:
    """An English text file and a Chinese JSONL file in `root`."""
    en = root / "en.txt"
    en.write_text(english_text())
    zh = root / "zh.jsonl"
    zh.write_text("\n".join(json.dumps({"text": ZH[i % 3] * (1 + i % 4), "n": i}, ensure_ascii=False)
                            for i in range(200)))
    return {"en": en, "zh": zh}


def write_config(path: Path, corpus: dict[str, Path], **overrides) -> Path:
    """A run config for the tiny preset on `corpus`; dotted overrides like `trainer.max_steps=5`."""
    cfg = yaml.safe_load(textwrap.dedent(f"""
        model:
          arch: {{preset: tiny}}
        data:
          sources:
            en: {{url: {corpus['en']}, weight: 0.7}}
            zh: {{url: {corpus['zh']}, weight: 0.3, format: jsonl}}
          tokenizer_vocab_size: 400
          seq_len: 32
          batch_size: 4
          val_windows: 4
        trainer:
          max_steps: 6
          default_root_dir: {path.parent / 'run'}
          log_every_n_steps: 1
          val_check_interval: 3
          limit_val_batches: 2
          enable_progress_bar: false
          enable_model_summary: false
        checkpoint:
          every_n_steps: 3
        registry:
          path: null  # tests run in tmp dirs; registry tests point it at their own
    """))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_proposal(directory: Path, pid: int, changes: dict | None = None, status: str = "accepted",
                   kind: str = "architecture", **fields) -> Path:
    """Proposal `pid` of `kind` with `changes`, written to `directory` as YAML; `fields`
    replace the others."""
    decided = status in ("accepted", "rejected", "superseded", "retired")
    data = {"id": pid, "title": f"Proposal {pid}", "kind": kind, "status": status, "authors": ["@someone"],
            "discussion": f"https://github.com/cpm-lightning/cpm-lightning/discussions/{pid}",
            "created": date(2026, 11, 1), "decided": date(2026, 11, 2) if decided else None,
            "summary": "What changes.", **fields, "changes": changes or {}}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pid:04d}-proposal-{pid}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def build_tiny(values: dict, data: dict):
    """(CausalLM, PretrainDataModule) of the run config {model.arch.preset: tiny, data: `data`}
    with the proposal `values` set, built as `fit` builds them: the vocabulary is the
    tokenizer's (the CLI links data.vocab_size to model.arch.vocab_size)."""
    from cpm_lightning.model.config import ArchConfig
    from cpm_lightning.registry.keys import ConfigSchema
    from cpm_lightning.registry.resolve import set_key
    from cpm_lightning.registry.typecheck import as_hinted
    from cpm_lightning.train.config import LossConfig, OptimConfig, ScheduleConfig
    from cpm_lightning.train.module import CausalLM
    from cpm_lightning.train.run_config import GROUPS
    from datamodules.pretrain import PretrainDataModule

    schema = ConfigSchema(GROUPS)
    config = {"model": {"arch": {"preset": "tiny"}, "optim": {}, "schedule": {}, "loss": {}},
              "data": copy.deepcopy(data)}
    for key, value in values.items():
        set_key(config, key, as_hinted(value, schema.lookup(key)[0]))  # as the registry sets it
    dm = PretrainDataModule(**config["data"])
    m = config["model"]
    model = CausalLM(ArchConfig(**{**m["arch"], "vocab_size": dm.vocab_size}), OptimConfig(**m["optim"]),
                     ScheduleConfig(**m["schedule"]), LossConfig(**m["loss"]))
    return model, dm


@pytest.fixture
def tiny_config(tmp_path, corpus) -> Path:
    return write_config(tmp_path / "config.yaml", corpus)


class RecordBatches(L.Callback):
    """Records each training step's input ids and loss in RECORDED (referenced by class path
    from run configs, for exact-resume comparisons)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RECORDED.append((trainer.global_step, batch["input_ids"].clone(), float(outputs["loss"])))


RECORDED: list = []


class MlflowServer:
    """A real `mlflow server` process (sqlite backend, artifacts proxied) on a loopback port.
    stop() kills it; start() starts it again on the same port and database."""

    def __init__(self, root: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.uri, self.proc = root, f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = (self.root / "server.log").open("ab")
        # Its own session, so stop() can end the server with the workers it spawns. Without
        # MLflow's job runner: its seven huey consumer processes serve GenAI features no test
        # uses, and each costs seconds of CPU to start.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=self.root, env=env)
        while True:  # startup takes tens of seconds on a loaded 2-core machine
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` for the whole test session (starting one takes tens of seconds)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


# A resumed run's overrides of every optimizer and schedule field class, and what AdamW must use.
RESUME_OVERRIDES = {"model.optim.lr": 0.3, "model.optim.betas": [0.5, 0.6], "model.optim.eps": 2.5e-5,
                    "model.optim.weight_decay": 0.2, "model.schedule.name": "noam", "model.schedule.warmup_steps": 2}


def override_args(overrides: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]


def assert_optimizer_used(optim_jsonl: Path, resumed_at: int, overrides: dict = RESUME_OVERRIDES):
    """Every step from `resumed_at` on used the overridden settings (read back from AdamW, as
    fsdp_probe.RecordOptimizer wrote them), and AdamW's state carried on from the checkpoint."""
    from cpm_lightning.train.config import ScheduleConfig

    records = [json.loads(line) for line in optim_jsonl.read_text().splitlines()]
    resumed = [r for r in records if r["step"] >= resumed_at]
    assert resumed and resumed[0]["step"] == resumed_at, records
    schedule = ScheduleConfig(name=overrides["model.schedule.name"], warmup_steps=overrides["model.schedule.warmup_steps"])
    for r in resumed:
        lr = overrides["model.optim.lr"] * schedule.factor(r["step"], 0)
        for group, decay in zip(r["groups"], (overrides["model.optim.weight_decay"], 0.0), strict=True):
            assert group["lr"] == pytest.approx(lr, rel=1e-6), r
            assert group["betas"] == overrides["model.optim.betas"], r
            assert group["eps"] == overrides["model.optim.eps"], r
            assert group["weight_decay"] == decay, r
            assert group["adam_step"] == r["step"], r  # the moments came from the checkpoint


@pytest.fixture(scope="module")
def live_env():
    """`live` segments find the probes (tests/), and run with one thread each (the machine has two cores)."""
    repo = Path(__file__).resolve().parents[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", f"{repo}{os.pathsep}{repo / 'tests'}")
        mp.setenv("OMP_NUM_THREADS", "1")
        yield mp


@contextlib.contextmanager
def running(app):
    """`app` (inference/server.py) served by uvicorn in a thread on a free port of 127.0.0.1;
    yields the API's base URL."""
    import threading
    import time

    import uvicorn

    from cpm_lightning.cli.serve import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
