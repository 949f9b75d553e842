"""A model directory verifies itself (issue 22): model.safetensors carries the record of its own
bytes and the sha256 of config.json and the tokenizer, so a copy or rename of the directory
verifies and a flipped byte is one error line for every verb that reads it; config.json is
checked as a proposal's architecture is before torch sees it; nothing outside the directory is
read through a link or an index."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import english_text

from cpm_lightning.checkpoint.modeldir import CONFIG, REMEDY, WEIGHTS, staged_dir, write_model_dir
from cpm_lightning.cli.main import main
from cpm_lightning.core.tokenizer import train_tokenizer
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.model.config import MAX_PARAMS


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A model directory of the tiny preset, as `checkpoint consolidate` writes it."""
    out = tmp_path_factory.mktemp("modeldir") / "model"
    tokenizer = train_tokenizer(english_text().split("\n\n"), 512)
    arch = ArchConfig(preset="tiny", vocab_size=tokenizer.vocab_size).resolved().to_dict()
    torch.manual_seed(0)
    write_model_dir(out, CPMAnt(ArchConfig(**arch)).state_dict(), arch, tokenizer)
    return out


@pytest.fixture
def model(made, tmp_path) -> Path:
    """A renamed copy of the directory: it verifies."""
    return Path(shutil.copytree(made, tmp_path / "copied"))


def run_cli(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def assert_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error")] == [f"error: {expected}"], err[-3000:]


VERBS = {
    "generate": lambda m, tmp: ["generate", m, "--prompt", "It is", "--max-new-tokens", "2"],
    "model info": lambda m, tmp: ["model", "info", m],
    "convert to-hf": lambda m, tmp: ["convert", "to-hf", m, tmp / "hf"],
}


def test_a_copied_and_renamed_directory_verifies(model, capsys):
    main(["model", "info", str(model)])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("where", ["header", "data"])
def test_a_flipped_byte_of_the_weights_is_named(model, tmp_path, capsys, verb, where):
    weights = model / WEIGHTS
    data = bytearray(weights.read_bytes())
    offset = 8 + data[8:].index(b'"dtype"') + 2 if where == "header" else len(data) - 100
    data[offset] ^= 0x20  # in the header: "dtype" becomes "Dtype", still JSON
    weights.write_bytes(data)
    code, err = run_cli(capsys, *VERBS[verb](model, tmp_path))
    if where == "header":  # the header no longer reads as safetensors, or its bytes do not match
        assert code == 2 and "Traceback" not in err and f"error: {weights}" in err, err
    else:
        assert_error(code, err, f"{weights} is damaged: its bytes do not match the sha256 recorded in it when it was "
                                f"written; {REMEDY}")
    assert not (tmp_path / "hf").exists()


def test_a_flipped_byte_of_the_tokenizer_is_named(model, capsys):
    [tokenizer] = [p for p in model.iterdir() if p.name not in (WEIGHTS, CONFIG)]
    data = bytearray(tokenizer.read_bytes())
    data[len(data) // 2] ^= 0x80
    tokenizer.write_bytes(data)
    code, err = run_cli(capsys, "model", "info", model)
    assert_error(code, err, f"{tokenizer} is damaged: its sha256 does not match the one recorded in {model / WEIGHTS} "
                            f"when it was written; {REMEDY}")


def test_a_directory_without_a_record_is_read_only_with_trust_unverified(model, capsys):
    from cpm_lightning.checkpoint.modeldir import SafetensorsFile, TensorSpec, write_safetensors

    old = SafetensorsFile(model / WEIGHTS)
    specs = [TensorSpec(n, tuple(s), old.dtypes[n]) for n, s in old.shapes.items()]
    tensors = [old.read(s.name) for s in specs]
    header = json.dumps({"__metadata__": {"format": "pt"}, **old.entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    (model / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + b"".join(
        t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors))  # as other software writes it
    code, err = run_cli(capsys, "model", "info", model)
    assert_error(code, err, f"{model / WEIGHTS}: the model directory's weights file has no integrity record (written "
                            "by other software or by an older cpm-lightning); pass --trust-unverified to read it "
                            "unverified (fit and live: checkpoint.trust_unverified: true)")
    main(["model", "info", str(model), "--trust-unverified"])
    assert "its bytes are not verified" in capsys.readouterr().err
    write_safetensors(model / "resealed.safetensors", specs, tensors)  # what write_model_dir writes verifies
    assert SafetensorsFile(model / "resealed.safetensors").verify() is None


def test_a_link_out_of_the_directory_is_refused(model, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    (model / WEIGHTS).rename(outside)
    (model / WEIGHTS).symlink_to(outside)
    code, err = run_cli(capsys, "generate", model, "--prompt", "It is")
    assert_error(code, err, f"{model.resolve() / WEIGHTS}: a symbolic link to {outside.resolve()}, outside the model "
                            "directory; refused (copy the file in instead)")


@pytest.mark.parametrize("change, expected", [
    ({"dim": 1073741824}, "parameters, above the {max:,} the project builds from it"),
    ({"num_attn_layers": 1000000000}, "parameters, above the {max:,} the project builds from it"),
    ({"dim": "64"}, "dim is str '64'; expected int or null"),
    ({"dim": 100000000000000000000000}, "dim is beyond a 64-bit integer"),
    ({"norm_eps": True}, "norm_eps is bool True; expected float"),
    ("deep", "nested too deeply to read; expected the architecture as a JSON object of plain values"),
], ids=["dim 2^30", "1e9 layers", "dim a string", "beyond int64", "a bool", "100000-deep list"])
def test_config_json_is_checked_before_torch_sees_it(model, capsys, change, expected):
    config = model / CONFIG
    if change == "deep":
        config.write_text('{"dim": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    code, err = run_cli(capsys, "generate", model, "--prompt", "It is")
    assert code == 2 and "Traceback" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("error")]
    assert line.startswith(f"error: {config}: ") and line.endswith(expected.format(max=MAX_PARAMS)), line


def test_from_hf_refuses_an_index_that_names_a_file_outside(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../other/model.safetensors"}}))
    code, err = run_cli(capsys, "convert", "from-hf", hf, tmp_path / "out")
    assert_error(code, err, f"{hf / 'model.safetensors.index.json'}: names '../other/model.safetensors', not a file in "
                            f"{hf}; an index names the weight files beside it")
    assert not (tmp_path / "out").exists()


def test_a_staged_directory_is_readable_by_others_as_the_umask_allows(tmp_path):
    """mkdtemp makes the staged directory 0700 and safetensors writes 0600: a directory shared on a
    machine (an adapter, a converted model) must get the modes the umask gives an ordinary one."""
    from safetensors.torch import save_file

    umask = os.umask(0)
    os.umask(umask)
    with staged_dir(tmp_path / "adapter", force=False) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "adapter.safetensors"))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "card.md").write_text("card")
    out = tmp_path / "adapter"
    assert {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]} == {
        ".": 0o777 & ~umask, "adapter.safetensors": 0o666 & ~umask, "sub": 0o777 & ~umask, "sub/card.md": 0o666 & ~umask}
