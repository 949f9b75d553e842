"""Making a release (`cpm-lightning release`; docs/ARCHITECTURE.md, "Releases"): a checkpoint,
evaluated and its prompt book completed, written as a model directory with its card, logged as
a sealed MLflow model from code and registered as a version with tags and an alias; or an
adapter `tune` wrote (`release --adapter`), checked against the base release it names and
registered, sealed by the same manifest, as a version of its own linked to that base."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cpm_lightning.checkpoint import modeldir
from cpm_lightning.checkpoint.store import TrainedModel, trained_model
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import sha256
from cpm_lightning.core.precision import Precision
from cpm_lightning.inference import fidelity
from cpm_lightning.inference.book import (
    COMPLETIONS_ARTIFACT,
    PROMPTS_FILE,
    App,
    Prompt,
    completions_json,
    load_apps,
    load_prompts,
)
from cpm_lightning.inference.evaluation import flat, runnable_tasks
from cpm_lightning.inference.generate import complete_book, default_prompting
from cpm_lightning.inference.tasks import TASK_EVALS
from cpm_lightning.model import ArchConfig, CPMAnt, quantize
from cpm_lightning.model.migrate import migration_text
from cpm_lightning.tracking import integrity
from cpm_lightning.tracking.integrity import MODEL_DIR, VARIANTS_DIR
from cpm_lightning.tracking.releases import (
    ADAPTER_OF,
    APP_STATUS,
    HF_DIR,
    RUN_TAG,
    VARIANTS_TAG,
    app_tag,
    applied_proposals,
    check_alias,
    pulled,
    pulled_adapter,
    resolve_version,
)
from cpm_lightning.train import adapters
from cpm_lightning.train.run_config import evaluate_model
from datamodules.config import DataConfig

VAL_METRICS = ("val/loss", "val/ppl", "val/acc")
INT4_GROUP_SIZES = (128, 64, 32)  # a variant's, the largest the model takes: fewer scales, the same kernel
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


def _hf_layout(trained: TrainedModel, name: str) -> tuple[Callable[[Path], list[Path]] | None, str, str | None]:
    """(what writes the release's Hugging Face layout into its hf/ folder, or None; the card's
    line about it, with the folder's path after the card's `pull` line; the prompting of
    inference/generate.py that presents an input as the `transformers` model reads it)."""
    from cpm_lightning.inference.hf.convert import hf_target, require_transformers, write_hf
    from cpm_lightning.inference.hf.mapping import CpmAnt

    try:
        require_transformers()
        target = hf_target(trained.arch)
    except UserError as e:
        print(f"warning: the release has no Hugging Face layout: {e}", file=sys.stderr)
        return None, f"No Hugging Face layout: {e}.", None

    def write(directory: Path) -> list[Path]:
        (directory / HF_DIR).mkdir()
        return write_hf(trained.model, directory / HF_DIR)
    pulled = f"{name}/{MODEL_DIR.as_posix()}/{HF_DIR}"  # `pull` writes the MLflow model, the model directory in it
    return write, (f"`{HF_DIR}/` is the model as `{target.architecture}`; after the `pull` above it is `{pulled}`: "
                   f"`transformers.AutoModelForCausalLM.from_pretrained(\"{pulled}\")` and `AutoTokenizer` open it."), \
        "cpm-ant" if isinstance(target, CpmAnt) else "causal"


def variant_precision(variant: str, arch: dict, where: str) -> Precision:
    """The Precision of a release's variant (integrity.VARIANT_NAMES) of the model `arch`: int4
    in groups of the largest of INT4_GROUP_SIZES its linears take; a UserError when none fits."""
    if variant == "int4":
        config = ArchConfig(**arch)
        for group_size in INT4_GROUP_SIZES:
            precision = Precision(quantize=variant, group_size=group_size)
            try:
                quantize.check(precision, config, where)
                return precision
            except UserError as e:
                refused = e
        raise refused
    return Precision(quantize=variant) if variant in quantize.PARTS else Precision(dtype=variant)


@dataclass
class Variant:
    """A variant as the release measured it."""

    precision: Precision
    directory: Path
    scores: dict[str, dict[str, float]]
    """Its heldout scores, when the release scores heldout."""
    measured: fidelity.Fidelity | None
    """Its fidelity to float32 on the prompt book, when the registry has one."""


class Fidelities:
    """The float32 side of the release's fidelity lines (fidelity.py), one Reference per way of
    presenting the input, and the lines measured against it."""

    def __init__(self, model: CPMAnt, paths: list[tuple[list[int], list[int]]], promptings: set[str]):
        self.default = default_prompting(model.cfg)
        self.references = {p: fidelity.reference(fidelity.model_logits(model, p), paths) for p in promptings | {self.default}}
        self.measured: list[fidelity.Fidelity] = []

    def measure(self, name: str, logits: fidelity.Logits, prompting: str | None = None) -> fidelity.Fidelity:
        """The hook of every converted form of the release (a variant, the Hugging Face layout,
        a GGUF file): `logits` compared with float32's, its input presented as `prompting`
        says (unset: as `generate` presents it)."""
        measured = fidelity.measure(name, logits, self.references[prompting or self.default])
        self.measured.append(measured)
        return measured


def _model(trained: TrainedModel, needed: bool) -> CPMAnt | None:
    """The model, for the release's evaluation and prompt book (on a GPU when there is one)."""
    if not needed:
        return None
    import torch

    return trained.model.build("cuda" if torch.cuda.is_available() else "cpu")


def _card(name: str, trained: TrainedModel, val: dict[str, float], scores: dict, limit: int | None, proposals: list[dict],
          hf_line: str, book: dict | None, registry_dir: Path, variants: list[str]) -> str:
    """The card's body; `variants`: its Variants section (`_variants_section`)."""
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
    lines += variants
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
              f"cpm-lightning generate {name} --prompt \"...\"", "```", "", "## Hugging Face and llama.cpp", "", hf_line]
    return "\n".join(lines)


def _variants_section(name: str, weights: Path, variants: list[Variant], scores: dict, fidelities: Fidelities | None,
                      registry_dir: Path) -> list[str]:
    """The card's Variants and Fidelity sections: each variant's size and files, its heldout
    bits per byte beside float32's, and every fidelity line measured (the Hugging Face layout's
    too: `fidelities` is read once the whole release is written)."""
    float32 = weights.stat().st_size
    lines = []
    if variants:
        lines += ["", "## Variants", "", f"The same weights at lower precision, each a model directory of its own "
                  f"(`{VARIANTS_DIR.as_posix()}/NAME/` in the MLflow model). `cpm-lightning pull models:/{name}@stable "
                  f"--variant NAME --dst {name}` downloads one alone, without the float32 weights "
                  f"({float32 / 2**20:.2f} MiB), and `cpm-lightning generate {name}` runs it.", ""]
    for v in variants:
        size = (v.directory / modeldir.WEIGHTS).stat().st_size
        bpb = [f"{metric} {value:.4f} (float32 {scores['heldout'][metric]:.4f}, "
               f"{value / scores['heldout'][metric] - 1:+.2%})"
               for metric, value in v.scores.get("heldout", {}).items() if metric.endswith("/bpb")]
        lines.append(f"- {v.precision.name} ({v.precision}): {modeldir.WEIGHTS} {size / 2**20:.2f} MiB, "
                     f"{size / float32:.0%} of float32's"
                     + (f"; heldout bits per byte: {', '.join(bpb)}" if bpb else "")
                     + (f"; fidelity: {v.measured.line().partition(': ')[2]}" if v.measured else ""))
        lines += [f"  - `{p.relative_to(v.directory.parent.parent).as_posix()}` sha256 {sha256(p)}"
                  for p in sorted(v.directory.iterdir())]
    lines += ["", "## Fidelity", ""]
    if fidelities is None:
        lines.append(f"Not measured: the registry {registry_dir} has no {PROMPTS_FILE}, the prompts it is measured on.")
    else:
        lines += [f"Against float32 on the prompt book: {fidelity.DEFINITION}. The Hugging Face layout is compared with "
                  "float32 reading its input as `transformers` reads it.", ""]
        lines += [f"- {f.line()}" for f in fidelities.measured] or ["Nothing to compare: no variant, no Hugging Face "
                                                                    "layout."]
    return lines


def _measure_variants(trained: TrainedModel, tokenizer, directory: Path, precisions: list[Precision], device: str,
                      heldout: Callable[[CPMAnt], dict] | None, fidelities: Fidelities | None) -> list[Variant]:
    """Write each variant into directory/NAME, streaming from the float weights, then load it as
    a user would and measure it (heldout, and fidelity), one variant in memory at a time."""
    out = []
    for precision in precisions:
        where = directory / precision.name
        modeldir.write_model_dir(where, trained.model, trained.arch, tokenizer, precision=precision)
        model = modeldir.open_model_dir(where).build(device)
        scores = heldout(model) if heldout else {}
        measured = fidelities.measure(precision.name, fidelity.model_logits(model)) if fidelities else None
        out.append(Variant(precision, where, scores, measured))
        del model
    return out


def _hf_fidelity(hf_dir: Path, prompting: str, fidelities: Fidelities) -> None:
    """The Hugging Face layout's fidelity line, loaded with `transformers` as a user loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        fidelities.measure(HF_DIR, lambda ids: hf(ids).logits[0], prompting)


GGUF_FIDELITY = ("float16", "q8_0")
"""The `convert to-gguf` weights whose fidelity a release card states (run by llama.cpp)."""


def _gguf_fidelity(trained: TrainedModel, tmp: Path, fidelities: Fidelities) -> str:
    """Measure `convert to-gguf` of the release at each of GGUF_FIDELITY, run by llama.cpp; the
    card's line about it (why there is none, for a model llama.cpp cannot run or without
    llama-cpp-python)."""
    import importlib.util

    import torch

    from cpm_lightning.inference import gguf

    try:
        gguf.require_gguf()
        gguf.check_gguf(trained.arch, trained.model.require_tokenizer(), "q8_0", trained.model.where)
    except UserError as e:
        return f"No GGUF fidelity: {e}."
    if importlib.util.find_spec("llama_cpp") is None:
        return "No GGUF fidelity: llama-cpp-python is not installed where the release was made."
    longest = max(s.shape[1] for s in fidelities.references[fidelities.default].sequences)
    for weights in GGUF_FIDELITY:
        path = tmp / f"model-{weights}.gguf"
        gguf.write_gguf(trained.model, path, weights)
        with gguf.llama_cpp(path, longest) as model:
            fidelities.measure(f"gguf {weights}", lambda ids: torch.from_numpy(model.sequence_logits(ids[0].tolist())))
        path.unlink()
    return (f"`cpm-lightning convert to-gguf` of this release at {' and '.join(GGUF_FIDELITY)}, run by llama.cpp, "
            "is measured under Fidelity.")


def release(ckpt: str, name: str, alias: str, out: Path | None, registry_dir: Path, sign_key: Path | None = None,
            eval_tasks: list[str] = (), eval_limit: int | None = None, eval_data: DataConfig | None = None,
            variants: list[str] = (), apps_limit: int | None = None) -> int:
    """Checkpoint -> its scores on `eval_tasks` (evaluation.py; heldout on the sources of
    `eval_data`; the default list without the tasks whose data is not installed, with a warning)
    -> model directory, and one per variant (integrity.VARIANT_NAMES, checked by the caller),
    each scored on heldout and measured against float32 on the prompt book, as the Hugging Face
    layout is -> pyfunc model from code, sealed by its manifest (and signed with `sign_key`) ->
    a new registered version with tags (the manifest's sha256, the scores eval/<task>/<metric>,
    the variants' eval/<variant>/<task>/<metric> and fidelity/<variant>/...) and `alias`
    pointing at it. With `apps_limit`, the adapter of every application of the registry's apps.yaml
    is re-scored on the release too (`score_apps`: tags app/NAME/...). Returns the version."""
    check_alias(alias)
    if eval_tasks:
        eval_tasks, skipped = runnable_tasks(list(eval_tasks), "--eval-tasks", eval_data is not None)
        if skipped:
            print(f"warning: {skipped}", file=sys.stderr)
    if sign_key is not None:
        integrity.check_key(sign_key, "--sign-key", private=True)
    has_book, prompts = (registry_dir / PROMPTS_FILE).exists(), load_prompts(registry_dir)
    apps = [a for a in load_apps(registry_dir) if a.adapter] if apps_limit else []
    trained = trained_model(ckpt)
    precisions = [variant_precision(v, trained.arch, ckpt) for v in variants]  # before any work
    tokenizer = trained.model.require_tokenizer()
    client = MlflowClient()
    run_id = trained.run_id if trained.run_id and _run_exists(client, trained.run_id) else None
    val = _val_metrics(client, run_id, trained.step)
    write_hf_layout, hf_line, hf_prompting = _hf_layout(trained, name)
    model = _model(trained, bool(eval_tasks) or has_book)
    scores = evaluate_model(model, tokenizer, eval_tasks, eval_limit, eval_data) if eval_tasks else {}
    book = complete_book(model, tokenizer, prompts, trained.step) if has_book else None
    fidelities = _fidelities(model, tokenizer, prompts, hf_prompting) if has_book and (precisions or write_hf_layout) \
        else None
    device = str(model.embedding.device) if model is not None else "cpu"
    del model  # before the model directories are written
    app_tags = score_apps(apps, lambda: trained.model.build(device), adapters.base_sha256(trained.model), tokenizer,
                          apps_limit) if apps else {}
    proposals = applied_proposals(client, run_id, registry_dir, trained.proposals)
    heldout = ((lambda m: evaluate_model(m, tokenizer, ["heldout"], eval_limit, eval_data)) if "heldout" in eval_tasks
               else None)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / MODEL_DIR.name  # MLflow names the artifact after it: MODEL_DIR in the release
        variants_dir = Path(tmp) / VARIANTS_DIR.name  # and VARIANTS_DIR
        measured = _measure_variants(trained, tokenizer, variants_dir, precisions, device, heldout, fidelities)

        gguf_line = _gguf_fidelity(trained, Path(tmp), fidelities) if fidelities is not None else ""

        def beside(out: Path) -> list[Path]:
            written = write_hf_layout(out) if write_hf_layout else []
            if written and fidelities is not None:
                _hf_fidelity(out / HF_DIR, hf_prompting, fidelities)
            return written

        def card() -> str:
            section = _variants_section(name, directory / modeldir.WEIGHTS, measured, scores, fidelities, registry_dir)
            return _card(name, trained, val, scores, eval_limit, proposals, f"{hf_line} {gguf_line}".rstrip(), book,
                         registry_dir, section)
        modeldir.write_model_dir(directory, trained.model, trained.arch, tokenizer, card, beside)
        if out is not None:
            try:
                shutil.copytree(directory, out, dirs_exist_ok=True)
            except OSError as e:
                raise UserError(f"--out {out}: cannot write the model directory ({e.strerror or e})") from None
        version, manifest_sha256 = _log_and_register(client, name, directory, variants_dir if measured else None,
                                                     trained, run_id, sign_key, book)
    tags = {"step": trained.step, "tokens": trained.tokens_seen, "proposals": ",".join(p["id"] for p in proposals) or "none",
            "val_loss": f"{val['val/loss']:.4f}" if "val/loss" in val else "none", RUN_TAG: run_id or "none",
            integrity.MANIFEST_TAG: manifest_sha256, **{k: f"{v:.4f}" for k, v in flat(scores, "eval").items()},
            VARIANTS_TAG: ",".join(v.precision.name for v in measured) or "none", **app_tags}
    for v in measured:
        tags |= {k: f"{value:.4f}" for k, value in flat(v.scores, f"eval/{v.precision.name}").items()}
    for f in fidelities.measured if fidelities else ():
        tags |= f.tags()
    _tag(client, name, version, tags, alias)
    return version


BROKEN_CHARS = 500
"""Characters of the reason an application's adapter broke that its status tag keeps."""


def score_apps(apps: list[App], build: Callable[[], CPMAnt], base_sha256: str, tokenizer, limit: int) -> dict[str, str]:
    """The tags that record each application's adapter re-scored on the release being made (its
    weights hash to `base_sha256`; `build` makes a fresh copy of them): its tasks' scores on
    `limit` examples (app/NAME/TASK/METRIC) and app/NAME/status, ok or "broken: why". An adapter
    tuned on an earlier base is applied all the same (that is the question asked: does it still
    work?); one that cannot be pulled or applied (tensors of another architecture) or whose
    evaluation fails is broken, not a failed release."""
    tags = {}
    for app in apps:
        try:
            # From the store this release is made in (the verb's --tracking-uri), not $MLFLOW_TRACKING_URI's.
            with pulled_adapter(app.adapter, mlflow.get_tracking_uri()) as directory:
                model = build()
                # Merged: scored as fast as the base (unmerged LoRA took 1.5x as long, demo preset on a CPU).
                cfg = adapters.apply_adapter(model, directory, base_sha256, merge=True, any_base=True)
            tasks = [t for t in cfg.tasks if t in TASK_EVALS]  # a run config's own task has no evaluation
            scores = evaluate_model(model, tokenizer, tasks, limit) if tasks else {}
            del model
        except (UserError, RuntimeError, ValueError) as e:
            why = " ".join(str(e).split()) or type(e).__name__
            tags[app_tag(app.name, APP_STATUS)] = f"broken: {why[:BROKEN_CHARS]}"
            continue
        tags |= {app_tag(app.name, key.removeprefix("eval/")): f"{v:.4f}" for key, v in flat(scores, "eval").items()}
        tags[app_tag(app.name, APP_STATUS)] = "ok"
    return tags


def _tag(client: MlflowClient, name: str, version: int, tags: dict, alias: str) -> None:
    """The version's tags, then `alias` pointing at it (a reader of the alias sees them all)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    client.set_registered_model_alias(name, alias, str(version))


def release_adapter(adapter: Path, base_uri: str, name: str, alias: str, sign_key: Path | None = None) -> tuple[int, str]:
    """An adapter directory `tune` wrote -> checked against the base release `base_uri` (pulled
    and verified: the sha256 of its weights must be the one the adapter names, and the adapter's
    tensors must fit it) -> the adapter's files and a card, sealed by a manifest (and signed with
    `sign_key`), logged on a release run and registered under `name` with the tags ADAPTER_OF
    (the base's models:/NAME/VERSION), base_sha256, method, rank and tasks, and `alias` pointing
    at it. Nothing is registered when a check fails. Returns (the version, the base's URI)."""
    check_alias(alias)
    if sign_key is not None:
        integrity.check_key(sign_key, "--sign-key", private=True)
    cfg, base, _ = adapters.read_adapter(adapter)
    client = MlflowClient()
    base_uri = "models:/{}/{}".format(*resolve_version(client, base_uri))
    if ADAPTER_OF in client.get_model_version(*base_uri.removeprefix("models:/").split("/")).tags:
        raise UserError(f"--base {base_uri}: an adapter version, not a base release; expected the release the "
                        "adapter was tuned on")
    with pulled(base_uri, tracking_uri=mlflow.get_tracking_uri()) as directory:  # the verb's store
        stored = modeldir.open_model_dir(directory)
        sha256_of_base = adapters.base_sha256(stored)
        if base.get("sha256") != sha256_of_base:
            raise UserError(f"--adapter {adapter} was tuned on the base with weights sha256 {base.get('sha256')}, not "
                            f"on {base_uri} (weights sha256 {sha256_of_base}); nothing registered")
        adapters.apply_adapter(stored.build(), adapter, sha256_of_base)  # its tensors fit this base
        base_run = client.get_model_version(*base_uri.removeprefix("models:/").split("/")).tags.get(RUN_TAG)
    experiment_id = client.get_run(base_run).info.experiment_id if base_run and _run_exists(client, base_run) else None
    tags = {ADAPTER_OF: base_uri, "base_sha256": sha256_of_base, "method": cfg.method,
            "rank": cfg.rank if cfg.method == "lora" else "none", "tasks": ",".join(cfg.tasks)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapter"
        root.mkdir()
        for file in (adapters.WEIGHTS, adapters.CONFIG):
            shutil.copyfile(adapter / file, root / file)
        tuned = (adapter / adapters.CARD).read_text(encoding="utf-8") if (adapter / adapters.CARD).is_file() else ""
        (root / adapters.CARD).write_text(_adapter_card(name, base_uri, tags, tuned), encoding="utf-8")
        manifest_sha256 = _seal(root, sign_key)
        with _release_run(client, experiment_id, f"release {name} adapter of {base_uri}", base_run) as run:
            mlflow.log_artifacts(str(root), "adapter")
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name)
            version = int(client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run.info.run_id).version)
    _tag(client, name, version, {**tags, integrity.MANIFEST_TAG: manifest_sha256}, alias)
    return version, base_uri


def _adapter_card(name: str, base_uri: str, tags: dict, tuned: str) -> str:
    """An adapter version's card: what it is, how to use it, then the card `tune` wrote."""
    rank = f" of rank {tags['rank']}" if tags["method"] == "lora" else ""
    task = tags["tasks"].split(",")[0]
    lines = [f"# {name}: an adapter of {base_uri}", "",
             f"A {tags['method']} adapter{rank} for the task(s) {tags['tasks']}, tuned on {base_uri} (weights sha256 "
             f"`{tags['base_sha256']}`).", "", "## Use", "", "```",
             f"cpm-lightning generate {base_uri} --adapter models:/{name}/VERSION --task {task} --prompt \"...\"",
             "```", ""]
    if tuned:  # tune's card, its title dropped
        lines += ["## Tuning", "", tuned.partition("\n")[2].strip(), ""]
    return "\n".join(lines)


def _fidelities(model: CPMAnt, tokenizer, prompts: list[Prompt], hf_prompting: str | None) -> Fidelities:
    """The float32 side of the fidelity lines: the prompt book's greedy paths and float32's
    logits along them, as `generate` presents the input and as the Hugging Face layout reads it."""
    paths = fidelity.greedy_paths(model, tokenizer, prompts)
    return Fidelities(model, paths, {hf_prompting} if hf_prompting else set())


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
        self.manifest_sha256 = _seal(root, self.sign_key)


def _seal(root: Path, sign_key: Path | None) -> str:
    """The manifest over every file under `root` (and the signature, with `sign_key`); returns
    the manifest's sha256, the version's tag."""
    manifest_sha256 = integrity.write_manifest(root)
    if sign_key is not None:
        integrity.sign(root, sign_key)
    return manifest_sha256


@contextlib.contextmanager
def _release_run(client: MlflowClient, experiment_id: str | None, run_name: str, run_id: str | None):
    """The MLflow run a release is logged in, beside the training run `run_id` (which may still
    be running and must keep its status), marked with this process so that a later release can
    tell one that was killed (fail_abandoned)."""
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={RUN_TAG: run_id or "none", PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"}) as run:
        fail_abandoned(client, run.info.experiment_id)
        yield run


def _log_and_register(client: MlflowClient, name: str, directory: Path, variants: Path | None, trained: TrainedModel,
                      run_id: str | None, sign_key: Path | None, book: dict | None) -> tuple[int, str]:
    """Log the sealed model from code in a release run (beside the training run, which may
    still be running and must keep its status), with the model directory and the `variants`
    directory (when there are variants), register it under `name`, and log the prompt
    book's completions (`book`, when the registry has one) on the release run with the version
    they are of. Returns the version and the manifest's sha256."""
    from importlib.metadata import version

    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from cpm_lightning.tracking.mlflow_model import MODEL_CONFIG, PARAMS

    experiment_id = client.get_run(run_id).info.experiment_id if run_id else None
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec(k, {int: "long", float: "double"}[type(v)], v)
                                                   for k, v in PARAMS.items()]))
    flavor = _SealedPyfunc(sign_key)
    with _release_run(client, experiment_id, f"release {name} step {trained.step}", run_id):
        # Model.log is what mlflow.pyfunc.log_model calls, with mlflow.pyfunc as the flavor.
        info = Model.log(artifact_path=None, name="model", flavor=flavor, python_model=str(MODEL_CODE),
                         artifacts={"model_dir": str(directory), **({"variants": str(variants)} if variants else {})},
                         signature=signature, model_config=MODEL_CONFIG,
                         pip_requirements=[f"cpm-lightning=={version('cpm-lightning')}"], registered_model_name=name)
        if book is not None:
            release = f"models:/{name}/{info.registered_model_version}"
            mlflow.log_text(completions_json({**book, "model": release}), COMPLETIONS_ARTIFACT)
    return int(info.registered_model_version), flavor.manifest_sha256
