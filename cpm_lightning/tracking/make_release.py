"""Making a release (`cpm-lightning release`; docs/ARCHITECTURE.md, "Releases"): a checkpoint,
evaluated and its prompt book completed, written as a model directory with its card, logged as
a sealed MLflow model from code and registered as a version with tags and an alias."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cpm_lightning.checkpoint import modeldir
from cpm_lightning.checkpoint.store import TrainedModel, trained_model
from cpm_lightning.core.errors import UserError
from cpm_lightning.inference.book import COMPLETIONS_ARTIFACT, PROMPTS_FILE, completions_json, load_prompts
from cpm_lightning.inference.evaluation import flat, runnable_tasks
from cpm_lightning.inference.generate import complete_book
from cpm_lightning.model import CPMAnt
from cpm_lightning.model.migrate import migration_text
from cpm_lightning.tracking import integrity
from cpm_lightning.tracking.integrity import MODEL_DIR
from cpm_lightning.tracking.releases import HF_DIR, RUN_TAG, applied_proposals, check_alias
from cpm_lightning.train.run_config import evaluate_model
from datamodules.config import DataConfig

VAL_METRICS = ("val/loss", "val/ppl", "val/acc")
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PROCESS_TAG = "cpm.release.process"
"""On a release run: "host:pid" of the `release` that runs it, so that a later release can tell
one whose process is gone (a SIGKILL cannot end its own run)."""


def _val_metrics(client: MlflowClient, run_id: str | None, step: int) -> dict[str, float]:
    """The latest validation metrics of the run at or before `step`."""
    out = {}
    for key in VAL_METRICS if run_id else ():
        history = [m for m in client.get_metric_history(run_id, key) if m.step <= step]
        if history:
            out[key] = max(history, key=lambda m: (m.step, m.timestamp)).value
    return out


def _hf_layout(trained: TrainedModel, name: str) -> tuple[Callable[[Path], list[Path]] | None, str]:
    """(what writes the release's Hugging Face layout into its hf/ folder, or None; the card's
    line about it, with the folder's path after the card's `pull` line)."""
    from cpm_lightning.inference.hf.convert import hf_target, require_transformers, write_hf

    try:
        require_transformers()
        target = hf_target(trained.arch)
    except UserError as e:
        print(f"warning: the release has no Hugging Face layout: {e}", file=sys.stderr)
        return None, f"No Hugging Face layout: {e}."

    def write(directory: Path) -> list[Path]:
        (directory / HF_DIR).mkdir()
        return write_hf(trained.model, directory / HF_DIR)
    pulled = f"{name}/{MODEL_DIR.as_posix()}/{HF_DIR}"  # `pull` writes the MLflow model, the model directory in it
    return write, (f"`{HF_DIR}/` is the model as `{target.architecture}`; after the `pull` above it is `{pulled}`: "
                   f"`transformers.AutoModelForCausalLM.from_pretrained(\"{pulled}\")` and `AutoTokenizer` open it.")


def _model(trained: TrainedModel, needed: bool) -> CPMAnt | None:
    """The model, for the release's evaluation and prompt book (on a GPU when there is one)."""
    if not needed:
        return None
    import torch

    return trained.model.build("cuda" if torch.cuda.is_available() else "cpu")


def _card(name: str, trained: TrainedModel, val: dict[str, float], scores: dict, limit: int | None, proposals: list[dict],
          hf_line: str, book: dict | None, registry_dir: Path) -> str:
    lines = [f"# {name} at step {trained.step}", "",
             "A CPM-Ant-style base language model trained in public with cpm-lightning: it continues "
             "text, it is not a chat model.", "",
             f"- step: {trained.step}", f"- tokens seen: {trained.tokens_seen:,}",
             f"- preset: {trained.arch.get('preset')}", f"- checkpoint: {trained.path.name}",
             f"- MLflow training run: {trained.run_id or 'not recorded'}", "", "## Validation", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in val.items()] or ["No validation metrics were recorded."]
    evaluated = [f"- {key.removeprefix('eval/')}: {v:.4f}" for key, v in flat(scores, "eval").items()]
    if evaluated:
        evaluated = [f"`cpm-lightning evaluate` on {f'the first {limit}' if limit else 'all'} examples of each task "
                     "(validation windows of each source, for heldout; docs/ARCHITECTURE.md, \"Evaluation\"):", "",
                     *evaluated]
    lines += ["", "## Evaluation", "", *(evaluated or ["Not evaluated."])]
    lines += ["", "## Applied proposals", ""]
    lines += [f"- {p['id']} {p['title']} {p['discussion']}".rstrip() for p in proposals] or ["None."]
    lines += ["", "## Migrations", "", "Architecture changes folded into the model while it trained (docs/ARCHITECTURE.md, "
              "\"Migrations\").", ""]
    lines += [f"- step {m['step']}: {migration_text(m)}" for m in trained.model.migrations] or ["None."]
    lines += ["", "## Prompt book", ""]
    if book is None:
        lines.append(f"No prompt book: the registry {registry_dir} has no {PROMPTS_FILE}.")
    else:
        lines += [f"Greedy completions of the community's prompts ({PROMPTS_FILE} of the registry; at most max_tokens new "
                  f"tokens each), also `{COMPLETIONS_ARTIFACT}` on the release's MLflow run:", ""]
        lines += [f"- `{c['id']}` ({c['author']}): {json.dumps(c['text'], ensure_ascii=False)} → "
                  f"{json.dumps(c['completion'], ensure_ascii=False)}" for c in book["completions"]] or ["No prompts."]
    lines += ["", "## Use", "", "```", f"cpm-lightning pull models:/{name}@stable --dst {name}",
              f"cpm-lightning generate {name} --prompt \"...\"", "```", "", "## Hugging Face", "", hf_line]
    return "\n".join(lines)


def release(ckpt: str, name: str, alias: str, out: Path | None, registry_dir: Path, sign_key: Path | None = None,
            eval_tasks: list[str] = (), eval_limit: int | None = None, eval_data: DataConfig | None = None) -> int:
    """Checkpoint -> its scores on `eval_tasks` (evaluation.py; heldout on the sources of
    `eval_data`; the default list without the tasks whose data is not installed, with a warning)
    -> model directory -> pyfunc model from code, sealed by its manifest (and
    signed with `sign_key`) -> a new registered version with tags, the manifest's sha256 and the
    scores (eval/<task>/<metric>) among them, and `alias` pointing at it. Returns the version."""
    check_alias(alias)
    if eval_tasks:
        eval_tasks, skipped = runnable_tasks(list(eval_tasks), "--eval-tasks", eval_data is not None)
        if skipped:
            print(f"warning: {skipped}", file=sys.stderr)
    if sign_key is not None:
        integrity.check_key(sign_key, "--sign-key", private=True)
    has_book, prompts = (registry_dir / PROMPTS_FILE).exists(), load_prompts(registry_dir)
    trained = trained_model(ckpt)
    tokenizer = trained.model.require_tokenizer()
    client = MlflowClient()
    run_id = trained.run_id if trained.run_id and _run_exists(client, trained.run_id) else None
    val = _val_metrics(client, run_id, trained.step)
    model = _model(trained, bool(eval_tasks) or has_book)
    scores = evaluate_model(model, tokenizer, eval_tasks, eval_limit, eval_data) if eval_tasks else {}
    book = complete_book(model, tokenizer, prompts, trained.step) if has_book else None
    del model  # before the model directory is written
    proposals = applied_proposals(client, run_id, registry_dir, trained.proposals)
    write_hf_layout, hf_line = _hf_layout(trained, name)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / MODEL_DIR.name  # MLflow names the artifact after it: MODEL_DIR in the release
        modeldir.write_model_dir(directory, trained.model, trained.arch, tokenizer,
                                 _card(name, trained, val, scores, eval_limit, proposals, hf_line, book, registry_dir),
                                 write_hf_layout)
        if out is not None:
            try:
                shutil.copytree(directory, out, dirs_exist_ok=True)
            except OSError as e:
                raise UserError(f"--out {out}: cannot write the model directory ({e.strerror or e})") from None
        version, manifest_sha256 = _log_and_register(client, name, directory, trained, run_id, sign_key, book)
    tags = {"step": trained.step, "tokens": trained.tokens_seen, "proposals": ",".join(p["id"] for p in proposals) or "none",
            "val_loss": f"{val['val/loss']:.4f}" if "val/loss" in val else "none", RUN_TAG: run_id or "none",
            integrity.MANIFEST_TAG: manifest_sha256, **{k: f"{v:.4f}" for k, v in flat(scores, "eval").items()}}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    client.set_registered_model_alias(name, alias, str(version))
    return version


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def fail_abandoned(client: MlflowClient, experiment_id: str) -> None:
    """Mark FAILED the release runs of the experiment left RUNNING by a `release` of this host
    whose process is gone (killed while it uploaded: nothing else would ever end them). Those of
    other hosts are left as they are: whether their process lives cannot be told from here."""
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                 f"tags.`{PROCESS_TAG}` LIKE '{host}:%'"):
        where, _, pid = run.data.tags[PROCESS_TAG].rpartition(":")
        if where == host and pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, "FAILED")
            print(f"release: MLflow run {run.info.run_id} ({run.info.run_name}) was left running by a release that "
                  f"was killed (pid {pid}); marked FAILED", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _SealedPyfunc:
    """mlflow.pyfunc as the flavor `Model.log` saves with, then the manifest (and signature)
    written into the saved model before MLflow uploads it, so they cover MLflow's own files
    (MLmodel, the model code, the environment) as well as the model directory."""

    def __init__(self, sign_key: Path | None):
        self.__name__ = mlflow.pyfunc.__name__  # Model.log records the flavor's name on the logged model
        self.sign_key, self.manifest_sha256 = sign_key, ""

    def save_model(self, path: str, mlflow_model, **kwargs) -> None:
        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        root = Path(path)
        for cache in root.rglob("__pycache__"):  # Model.log deletes these before the upload
            shutil.rmtree(cache)
        self.manifest_sha256 = integrity.write_manifest(root)
        if self.sign_key is not None:
            integrity.sign(root, self.sign_key)


def _log_and_register(client: MlflowClient, name: str, directory: Path, trained: TrainedModel, run_id: str | None,
                      sign_key: Path | None, book: dict | None) -> tuple[int, str]:
    """Log the sealed model from code in a release run (beside the training run, which may
    still be running and must keep its status), register it under `name`, and log the prompt
    book's completions (`book`, when the registry has one) on the release run with the version
    they are of. Returns the version and the manifest's sha256."""
    from importlib.metadata import version

    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from cpm_lightning.tracking.mlflow_model import PARAMS

    experiment_id = client.get_run(run_id).info.experiment_id if run_id else None
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec(k, {int: "long", float: "double"}[type(v)], v)
                                                   for k, v in PARAMS.items()]))
    flavor = _SealedPyfunc(sign_key)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"release {name} step {trained.step}",
                          tags={RUN_TAG: run_id or "none", PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"}) as run:
        fail_abandoned(client, run.info.experiment_id)
        # Model.log is what mlflow.pyfunc.log_model calls, with mlflow.pyfunc as the flavor.
        info = Model.log(artifact_path=None, name="model", flavor=flavor, python_model=str(MODEL_CODE),
                         artifacts={"model_dir": str(directory)}, signature=signature,
                         pip_requirements=[f"cpm-lightning=={version('cpm-lightning')}"], registered_model_name=name)
        if book is not None:
            release = f"models:/{name}/{info.registered_model_version}"
            mlflow.log_text(completions_json({**book, "model": release}), COMPLETIONS_ARTIFACT)
    return int(info.registered_model_version), flavor.manifest_sha256
