"""Releases in the MLflow Model Registry: promote, pull, list, and what the reports and the site
read of them (docs/ARCHITECTURE.md, "Releases"). Making one is make_release.py's: it needs the
model and its training stack, which nothing here imports."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cpm_lightning.core.errors import UserError
from cpm_lightning.tracking import integrity
from cpm_lightning.tracking.config import TrackingConfig
from cpm_lightning.tracking.integrity import MODEL_DIR

RESERVED_ALIASES = ("latest",)  # MLflow resolves models:/NAME@latest itself
RUN_TAG = "cpm.run_id"  # on a model version: the training run it was released from
TRUSTED_KEY_ENV = "CPM_LIGHTNING_TRUSTED_KEY"  # a public key: pulls then require its signature
HF_DIR = "hf"  # in a release: the Hugging Face layout (cpm_lightning.inference.hf)
VARIANTS_TAG = "variants"  # on a model version: its variants (integrity.VARIANTS_DIR), comma-separated, or none
ADAPTER_OF = "adapter_of"  # on an adapter version (`release --adapter`): models:/NAME/VERSION of its base
_TAG_UNSAFE = re.compile(r"[^\w .-]")
APP_STATUS = "status"  # app/NAME/status on a release: ok, or "broken: why" (its adapter could not run on it)


def app_tag(app: str, key: str) -> str:
    """The tag of a release that records `key` (TASK/METRIC, or APP_STATUS) of application `app`
    re-scored on it; the name with what MLflow's tag keys cannot hold replaced by -."""
    return f"app/{_TAG_UNSAFE.sub('-', app)}/{key}"


def applied_proposals(client: MlflowClient, run_id: str | None, registry_dir: Path, ids: str | None = None) -> list[dict]:
    """The proposals `ids` names (comma-separated), else the run's `cpm.proposals` tag, with
    title and discussion link when the registry directory has their files."""
    from cpm_lightning.registry.schema import load_proposal

    tag = ids if ids is not None else client.get_run(run_id).data.tags.get("cpm.proposals", "") if run_id else ""
    out = []
    for label in filter(None, (s.strip() for s in tag.split(","))):
        files = sorted(registry_dir.glob(f"{label}-*.yaml"))
        proposal = load_proposal(files[0])[0] if files else None
        out.append({"id": label, "title": proposal.title if proposal else "",
                    "discussion": (proposal.discussion or "") if proposal else "",
                    "effective_from_step": proposal.effective_from_step if proposal else None})
    return out


def check_alias(alias: str) -> None:
    if alias in RESERVED_ALIASES or alias.isdigit() or not alias:
        raise UserError(f"--alias {alias!r} is reserved by MLflow; expected a name like candidate or stable")


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(name, version) of models:/NAME@ALIAS or models:/NAME/VERSION; unknown names, aliases and
    versions are UserErrors that list what exists."""
    spec = uri.removeprefix("models:/")
    name, sep, ref = spec.partition("@") if "@" in spec else spec.partition("/")
    if not (uri.startswith("models:/") and name and ref):
        raise UserError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    model = _registered_model(client, name, uri)
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    if sep == "@":
        if ref not in model.aliases:
            have = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
            raise UserError(f"{uri}: model {name!r} has no alias {ref!r}; its aliases: {have}")
        return name, str(model.aliases[ref])
    if not ref.isdigit() or int(ref) not in versions:
        raise UserError(f"{uri}: model {name!r} has no version {ref!r}; its versions: "
                        f"{', '.join(map(str, versions)) or 'none'}")
    return name, ref


def _registered_model(client: MlflowClient, name: str, where: str):
    try:
        return client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise UserError(f"{where}: no registered model {name!r}; the registry has: {', '.join(names) or 'none'}") from None


def promote(name: str, version: str, alias: str) -> None:
    check_alias(alias)
    client = MlflowClient()
    name, version = resolve_version(client, f"models:/{name}/{version}")
    client.set_registered_model_alias(name, alias, version)


def trusted_key(flag: Path | None) -> Path | None:
    """The public key releases must be signed with: --verify-key, else $CPM_LIGHTNING_TRUSTED_KEY,
    else none (checked to be a usable key)."""
    if flag is not None:
        integrity.check_key(flag, "--verify-key", private=False)
        return flag
    env = os.environ.get(TRUSTED_KEY_ENV)
    if not env:
        return None
    integrity.check_key(Path(env), f"${TRUSTED_KEY_ENV}", private=False)
    return Path(env)


def pull(uri: str, dst: Path, verify_key: Path | None = None, variant: str | None = None) -> Path:
    """Download the MLflow model of a registered version beside `dst` (with `variant`, only that
    variant of it: integrity.variant_files), verify it (the manifest against the version's tag,
    every file against the manifest, and the signature when `verify_key` is given), then rename
    it to `dst`. On any failure `dst` is as it was."""
    client = MlflowClient()
    name, version = resolve_version(client, uri)
    where = f"models:/{name}/{version}"
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"--dst {dst}: {'not empty' if dst.is_dir() else 'not a directory'}; expected a new or "
                        "empty directory")
    if not dst.absolute().parent.is_dir():
        raise UserError(f"--dst {dst}: its parent directory {dst.absolute().parent} does not exist")
    if variant is not None and verify_key is not None:
        # model-signing verifies a signature over every file of the release, never a part of it.
        raise UserError(f"--variant {variant}: a signature covers the whole release, so with a trusted key "
                        f"({verify_key}) pull it without --variant")
    expected = client.get_model_version(name, version).tags.get(integrity.MANIFEST_TAG)
    if not expected:
        raise UserError(f"{where}: no tag {integrity.MANIFEST_TAG}, so its files cannot be verified; expected a "
                        "version registered by `cpm-lightning release`")
    # The download is not a registry one (models:/), which would add a file of MLflow's own.
    source = client.get_model_version_download_uri(name, version)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.absolute().parent))
    try:
        if variant is None:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging)))
            integrity.verify_manifest(local, expected, where)
        else:
            local = _pull_variant(source, staging / "release", expected, where, variant)
        if verify_key is not None:
            integrity.verify_signature(local, verify_key, where)
        local.replace(dst)  # onto an empty directory, or a new name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def _pull_variant(source: str, local: Path, expected: str, where: str, variant: str) -> Path:
    """Download into `local` the manifest, then the files of `variant` it lists, and verify them."""
    def download(rel: str) -> None:
        parent = (local / rel).parent
        parent.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{rel}", dst_path=str(parent))

    download(integrity.MANIFEST)
    listed = integrity.read_manifest(local, expected, where)
    have = integrity.variants(listed)
    if variant not in have:
        raise UserError(f"--variant {variant}: {where} has no variant {variant!r}; its variants: "
                        f"{', '.join(have) or 'none'} (without --variant: the float32 release)")
    files = integrity.variant_files(listed, variant)
    for rel in files:
        download(rel)
    integrity.verify_manifest(local, expected, where, only=files)
    return local


@contextlib.contextmanager
def pulled(uri: str, inside: Path = MODEL_DIR, tracking_uri: str | None = None) -> Iterator[Path]:
    """The model directory of models:/NAME@ALIAS or models:/NAME/VERSION (its `inside`), pulled
    from the store at `tracking_uri` (unset: $MLFLOW_TRACKING_URI's, as `generate` reads a models:/
    source) to a temporary directory and verified (with $CPM_LIGHTNING_TRUSTED_KEY when set)
    before any of it is read; it lasts as long as the context."""
    mlflow.set_tracking_uri(tracking_uri or TrackingConfig().resolved_uri)
    with tempfile.TemporaryDirectory() as tmp:
        yield pull(uri, Path(tmp) / "release", trusted_key(None)) / inside


@contextlib.contextmanager
def pulled_adapter(uri: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """The adapter directory of an adapter version (`release --adapter`: the adapter's files at
    the version's root, beside its manifest), pulled and verified as `pulled` does; any other
    version is a UserError before anything is downloaded."""
    mlflow.set_tracking_uri(tracking_uri or TrackingConfig().resolved_uri)
    name, version = resolve_version(MlflowClient(), uri)
    if ADAPTER_OF not in MlflowClient().get_model_version(name, version).tags:
        raise UserError(f"--adapter {uri}: models:/{name}/{version} is not an adapter version (no tag {ADAPTER_OF}); "
                        "expected one `cpm-lightning release --adapter` registered")
    with pulled(f"models:/{name}/{version}", Path(), tracking_uri) as directory:
        yield directory


def version_aliases(model) -> dict[str, list[str]]:
    """Version (as a string) -> the aliases of a registered model that point at it, sorted."""
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted(model.aliases.items()):
        aliases.setdefault(str(version), []).append(alias)
    return aliases


def list_models(name: str | None) -> list[dict]:
    """Registered versions (of `name`, or of every model), oldest first."""
    client = MlflowClient()
    models = [_registered_model(client, name, "models list")] if name else client.search_registered_models()
    rows = []
    for model in models:
        aliases = version_aliases(model)
        for v in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
            rows.append({"name": model.name, "version": int(v.version), "aliases": ",".join(aliases.get(str(v.version), [])),
                         **{k: v.tags.get(k, "") for k in ("step", "tokens", "val_loss", "proposals")},
                         VARIANTS_TAG: v.tags.get(VARIANTS_TAG, "none")})
    return rows
