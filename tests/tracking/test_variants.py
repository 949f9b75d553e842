"""Quantized releases (issue 23): `release --quantize int8,int4` against a real `mlflow server`
adds the variants to the registered version (their files in the manifest, their sizes, held-out
bits per byte and fidelity to float32 in the card and the tags), `pull --variant int4` downloads
that variant alone, and `generate`, `evaluate` and the pyfunc model run it; and the bad inputs.

One tiny model trained a few steps and one release of it (module fixtures) serve every test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import cli_error, running, write_config, write_corpus
from mlflow import MlflowClient

from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.precision import Precision
from cpm_lightning.inference import fidelity
from cpm_lightning.inference.book import PROMPTS_FILE, Prompt
from cpm_lightning.inference.generate import sample
from cpm_lightning.live.config import LiveConfig
from cpm_lightning.tracking import integrity
from cpm_lightning.tracking.make_release import variant_precision

PROMPT = "It is a truth"
BOOK = [{"id": "truth", "author": "@someone", "text": PROMPT, "max_tokens": 6},
        {"id": "analects", "author": "@someone", "text": "子曰：", "max_tokens": 4}]
MLFLOW_FILES = {"MANIFEST.json", "MLmodel", "mlflow_model.py", "conda.yaml", "python_env.yaml", "requirements.txt"}
INT4 = Precision(quantize="int4", group_size=64)  # tiny's linears take 64 inputs: 128 does not divide them


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a checkpoint of the tiny preset trained 6 steps, its run config)."""
    root = tmp_path_factory.mktemp("variants")
    config = write_config(root / "config.yaml", write_corpus(root), **{
        "trainer.logger": False, "data.cache_dir": str(root / "cache")})
    main(["fit", "--config", str(config)])
    return next((root / "run" / "checkpoints").glob("*step*6*.ckpt")), config


@pytest.fixture(scope="module")
def released(trained, mlflow_server, tmp_path_factory) -> Path:
    """var-lm/1, with int8 and int4 variants, scored on heldout and the prompt book BOOK; returns
    the release pulled whole."""
    ckpt, config = trained
    registry = tmp_path_factory.mktemp("registry")
    (registry / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": BOOK}, allow_unicode=True))
    uri = ["--tracking-uri", mlflow_server.uri]
    main(["release", str(ckpt), "--name", "var-lm", "--quantize", "int8,int4", "--eval-tasks", "heldout",
          "--eval-config", str(config), "--eval-limit", "4", "--proposals", str(registry), *uri])
    whole = tmp_path_factory.mktemp("pulled") / "whole"
    main(["pull", "models:/var-lm/1", "--dst", str(whole), *uri])
    return whole


@pytest.fixture(scope="module")
def int4(released, mlflow_server, tmp_path_factory) -> Path:
    """The int4 variant of var-lm/1, pulled alone."""
    dst = tmp_path_factory.mktemp("pulled") / "int4"
    main(["pull", "models:/var-lm/1", "--variant", "int4", "--dst", str(dst), "--tracking-uri", mlflow_server.uri])
    return dst


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def greedy(source: str, precision: Precision | None = None) -> list[int]:
    model, tokenizer = load_model(source, precision=precision)
    return sample(model, tokenizer.encode(PROMPT), 12, temperature=0, eos_id=tokenizer.eos_id)


@pytest.mark.slow
def test_the_variants_are_in_the_release_its_manifest_its_card_and_its_tags(released, mlflow_server):
    variant_files = {f"artifacts/variants/{v}/{f}" for v in ("int8", "int4")
                     for f in ("model.safetensors", "config.json", "tokenizer.model")}
    assert variant_files <= files(released)
    manifest = json.loads((released / "MANIFEST.json").read_text())["files"]
    assert variant_files <= manifest.keys()  # pull verified every one of them
    card = (released / "artifacts" / "model" / "MODEL_CARD.md").read_text()
    tags = MlflowClient(mlflow_server.uri).get_model_version("var-lm", "1").tags
    assert tags["variants"] == "int8,int4"
    for name, precision in (("int8", "int8 weights, bfloat16 activations"),
                            ("int4", "int4 weights in groups of 64, bfloat16 activations")):
        size = (released / "artifacts" / "variants" / name / "model.safetensors").stat().st_size
        line = next(s for s in card.splitlines() if s.startswith(f"- {name} ("))
        assert line.startswith(f"- {name} ({precision}): model.safetensors {size / 2**20:.2f} MiB, ")
        for source in ("en", "zh"):  # beside float32's figure, which is the release's own tag
            bpb, float32 = tags[f"eval/{name}/heldout/{source}/bpb"], tags[f"eval/heldout/{source}/bpb"]
            assert f"{source}/bpb {bpb} (float32 {float32}, " in line
        assert (f"fidelity: max |Δlogit| {tags[f'fidelity/{name}/max_logit_diff']}, greedy-token agreement "
                f"{float(tags[f'fidelity/{name}/agreement']):.1%}") in line
        assert f"`variants/{name}/model.safetensors` sha256 {manifest[f'artifacts/variants/{name}/model.safetensors']['sha256']}" in card
    assert f"Against float32 on the prompt book: {fidelity.DEFINITION}." in card
    assert [s.split(":")[0] for s in card.splitlines() if re.match(r"- \w+: max \|Δlogit\|", s)] == [
        "- int8", "- int4", "- hf"]
    # The Hugging Face layout computes what the model computes.
    assert float(tags["fidelity/hf/max_logit_diff"]) <= 1e-4 and tags["fidelity/hf/agreement"] == "1.0000"
    assert float(tags["fidelity/int8/max_logit_diff"]) > 0  # a different model, measured as one


@pytest.mark.slow
def test_pull_variant_downloads_that_variant_alone_and_generate_runs_it(released, int4, capsys):
    assert files(int4) == MLFLOW_FILES | {"artifacts/model/MODEL_CARD.md"} | {
        f"artifacts/variants/int4/{f}" for f in ("model.safetensors", "config.json", "tokenizer.model")}
    assert not (int4 / "artifacts" / "model" / "model.safetensors").exists()  # the float32 weights stay behind
    # The same quantization as the float32 release quantized as it loads: the same greedy tokens.
    assert greedy(str(int4)) == greedy(str(released), INT4)
    main(["generate", str(int4), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0"])
    main(["generate", str(released), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0",
          "--quantize", "int4", "--group-size", "64"])
    variant, quantized = capsys.readouterr().out.splitlines()[-2:]
    assert variant == quantized and variant.startswith(PROMPT)


@pytest.mark.slow
def test_the_card_measures_the_variant_a_user_pulls(released, int4, mlflow_server):
    """The card's figures are those of the files pulled: the variant against float32, remeasured."""
    model, tokenizer = load_model(str(released))
    ref = fidelity.reference(fidelity.model_logits(model), fidelity.greedy_paths(model, tokenizer,
                                                                                 [Prompt(**p) for p in BOOK]))
    measured = fidelity.measure("int4", fidelity.model_logits(load_model(str(int4))[0]), ref)
    assert measured.tags() == {k: v for k, v in MlflowClient(mlflow_server.uri).get_model_version("var-lm", "1").tags.items()
                               if k.startswith("fidelity/int4/")}


@pytest.mark.slow
def test_evaluate_and_the_pyfunc_model_run_a_pulled_variant(int4, trained, capsys):
    main(["evaluate", str(int4), "--tasks", "heldout", "--config", str(trained[1]), "--limit", "4", "--json"])
    scores = json.loads(capsys.readouterr().out)
    assert set(scores["heldout"]) == {"en/loss", "en/bpb", "zh/loss", "zh/bpb"}
    predicted = mlflow.pyfunc.load_model(str(int4)).predict([PROMPT], params={"temperature": 0.0, "max_new_tokens": 12})
    _, tokenizer = load_model(str(int4))
    assert predicted == [tokenizer.decode(greedy(str(int4)))]


@pytest.mark.slow
def test_a_variant_the_release_lacks_is_one_line_and_writes_nothing(released, mlflow_server, tmp_path, capsys):
    assert cli_error(capsys, "pull", "models:/var-lm/1", "--variant", "bfloat16", "--dst", str(tmp_path / "d"),
                     "--tracking-uri", mlflow_server.uri) == (
        "--variant bfloat16: models:/var-lm/1 has no variant 'bfloat16'; its variants: int4, int8 (without "
        "--variant: the float32 release)")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))


@pytest.mark.slow
def test_a_corrupted_variant_is_refused_after_pull_and_by_pull(int4, released, mlflow_server, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for rel in files(int4):
        (damaged / rel).parent.mkdir(parents=True, exist_ok=True)
        (damaged / rel).write_bytes((int4 / rel).read_bytes())
    weights = damaged / "artifacts" / "variants" / "int4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(data)
    error = cli_error(capsys, "generate", str(damaged), "--prompt", PROMPT)
    assert error.startswith(f"{weights}") and "damaged" in error, error

    uri = MlflowClient(mlflow_server.uri).get_model_version_download_uri("var-lm", "1")
    stored = mlflow_server.root / "artifacts" / uri.removeprefix("mlflow-artifacts:/") / "artifacts" / "variants" / "int4"
    original = (stored / "model.safetensors").read_bytes()
    try:
        (stored / "model.safetensors").write_bytes(data)
        error = cli_error(capsys, "pull", "models:/var-lm/1", "--variant", "int4", "--dst", str(tmp_path / "d"),
                          "--tracking-uri", mlflow_server.uri)
    finally:
        (stored / "model.safetensors").write_bytes(original)
    assert error.startswith("models:/var-lm/1: the release does not match its manifest: "
                            "artifacts/variants/int4/model.safetensors: sha256 "), error
    assert not (tmp_path / "d").exists()


def test_a_variant_with_a_trusted_key_is_refused(tmp_path, capsys):
    """Before anything is downloaded: a signature covers the whole release."""
    from cryptography.hazmat.primitives import serialization as pem
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "release.pub"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        pem.Encoding.PEM, pem.PublicFormat.SubjectPublicKeyInfo))
    db = f"sqlite:///{tmp_path}/store.db"
    MlflowClient(db).create_registered_model("m")
    MlflowClient(db).create_model_version("m", "file:///nowhere")
    assert cli_error(capsys, "pull", "models:/m/1", "--variant", "int4", "--dst", str(tmp_path / "d"),
                     "--verify-key", str(key), "--tracking-uri", db) == (
        f"--variant int4: a signature covers the whole release, so with a trusted key ({key}) pull it without "
        "--variant")


@pytest.mark.parametrize("names, error", [
    ("int3", "--quantize int3: 'int3' is not a variant; expected some of int8, int4, bfloat16, float16 (float32 is "
             "the release itself)"),
    ("int8,int8", "--quantize int8,int8: int8, int8 names a variant twice"),
    ("float32", "--quantize float32: 'float32' is not a variant; expected some of int8, int4, bfloat16, float16 "
                "(float32 is the release itself)")])
def test_release_refuses_unknown_variants_before_any_work(names, error, tmp_path, capsys):
    # The checkpoint is not read: it does not even exist.
    assert cli_error(capsys, "release", str(tmp_path / "none.ckpt"), "--name", "x", "--quantize", names,
                     "--eval-tasks", "none") == error


def test_int4_takes_the_largest_group_size_the_model_takes_or_is_refused():
    assert variant_precision("int4", {"preset": "tiny", "vocab_size": 400}, "c.ckpt") == INT4
    assert variant_precision("int4", {"preset": "demo", "vocab_size": 400}, "c.ckpt").group_size == 128
    assert variant_precision("int4", {"preset": "tiny", "vocab_size": 400, "dim": 96}, "c.ckpt").group_size == 32
    assert variant_precision("bfloat16", {"preset": "tiny", "vocab_size": 400}, "c.ckpt") == Precision(dtype="bfloat16")
    with pytest.raises(UserError) as refused:
        variant_precision("int4", {"preset": "tiny", "vocab_size": 400, "dim": 48}, "c.ckpt")
    assert str(refused.value) == ("--quantize int4: c.ckpt's blocks.0.attn.project_q takes 48 inputs, not a multiple of "
                                  "the group size 32; use --quantize int8")


def test_live_release_quantize_is_checked_like_the_other_live_settings():
    assert LiveConfig(release_every_n_steps=4, release_quantize=["int8", "int4"]).release_quantize == ["int8", "int4"]
    with pytest.raises(UserError, match=r"^live.release_quantize: 'q4' is not a variant; expected some of int8, int4"):
        LiveConfig(release_every_n_steps=4, release_quantize=["q4"])
    with pytest.raises(UserError, match=r"^live.release_quantize: .* live.release_every_n_steps is 0 \(no releases\)"):
        LiveConfig(release_quantize=["int8"])


def test_variant_files_are_the_mlflow_files_the_card_and_the_variant():
    listed = ["MLmodel", "mlflow_model.py", "artifacts/model/MODEL_CARD.md", "artifacts/model/model.safetensors",
              "artifacts/model/hf/config.json", "artifacts/variants/int4/model.safetensors",
              "artifacts/variants/int8/model.safetensors", "artifacts/variants/int4x/model.safetensors"]
    assert integrity.variants(listed) == ["int4", "int4x", "int8"]
    assert integrity.variant_files(listed, "int4") == ["MLmodel", "mlflow_model.py", "artifacts/model/MODEL_CARD.md",
                                                       "artifacts/variants/int4/model.safetensors"]


@pytest.mark.slow
def test_a_rotary_release_states_the_fidelity_of_its_gguf_conversion(mlflow_server, tmp_path):
    """A model llama.cpp runs: the card and the tags measure `convert to-gguf` of it, run by llama.cpp."""
    config = write_config(tmp_path / "config.yaml", write_corpus(tmp_path), **{
        "trainer.logger": False, "trainer.max_steps": 3, "model.arch.position": "rotary", "model.arch.ffn": "swiglu"})
    main(["fit", "--config", str(config)])
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": BOOK}, allow_unicode=True))
    main(["release", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--name", "rotary-lm", "--proposals",
          str(registry), "--tracking-uri", mlflow_server.uri])
    tags = MlflowClient(mlflow_server.uri).get_model_version("rotary-lm", "1").tags
    card = (Path(mlflow.artifacts.download_artifacts(
        "models:/rotary-lm/1", dst_path=str(tmp_path / "pulled"), tracking_uri=mlflow_server.uri))
        / "artifacts" / "model" / "MODEL_CARD.md").read_text()
    for weights, bound in (("float16", 1e-2), ("q8_0", 0.2)):
        assert float(tags[f"fidelity/gguf {weights}/max_logit_diff"]) <= bound
        assert f"- gguf {weights}: max |Δlogit| {tags[f'fidelity/gguf {weights}/max_logit_diff']}" in card
    assert tags["fidelity/gguf float16/agreement"] == "1.0000"
    assert "`cpm-lightning convert to-gguf` of this release at float16 and q8_0, run by llama.cpp" in card


def test_a_relative_bucket_release_says_why_it_has_no_gguf_fidelity(released):
    card = (released / "artifacts" / "model" / "MODEL_CARD.md").read_text()
    assert "No GGUF fidelity: " in card and "llama.cpp has no T5-style relative position buckets" in card


@pytest.mark.slow
def test_a_pulled_variant_is_served(int4):
    """A user's path: `pull --variant int4`, then `serve` it and ask with the official client."""
    from openai import OpenAI

    from cpm_lightning.inference.server import create_app

    model, tokenizer = load_model(str(int4))
    with running(create_app(model, tokenizer, "var-lm")) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["var-lm"]
        text = client.completions.create(model="var-lm", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert PROMPT + text == tokenizer.decode(tokenizer.encode(PROMPT) + greedy(str(int4)))


@pytest.mark.slow
def test_the_pyfunc_model_quantizes_as_its_model_config_says(released):
    model = mlflow.pyfunc.load_model(str(released), model_config={"quantize": "int4", "group_size": 64})
    predicted = model.predict([PROMPT], params={"temperature": 0.0, "max_new_tokens": 12})
    _, tokenizer = load_model(str(released))
    assert predicted == [tokenizer.decode(greedy(str(released), INT4))]
    with pytest.raises(UserError, match="--quantize 'int3': expected one of int8, int4"):
        mlflow.pyfunc.load_model(str(released), model_config={"quantize": "int3"})
