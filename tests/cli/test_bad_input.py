"""Every input a user can get wrong ends in one line `error: WHAT...` on stderr, exit status 2,
no traceback, and nothing half-written (issue 2, "Bad input").

The CLI runs in-process through `cpm_lightning.cli.main.main` (one case runs the installed script).
Training never starts: each error happens before the first step, and most fit cases load a
tokenizer trained once per session instead of training one. Lines that are not JSON and bytes
that are not UTF-8 are not errors: they are skipped or replaced, counted and warned about.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ZH, english_text, write_config, write_corpus

from cpm_lightning.checkpoint.files import REMEDY, seal_zip
from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import Tokenizer, save_tokenizer, train_tokenizer
from cpm_lightning.model.config import PRESETS, ArchConfig
from cpm_lightning.model.layers import COMPONENTS
from datamodules.shards import Shard, open_source, prepare_source
from datamodules.sources import SourceConfig


@pytest.fixture(scope="session")
def _mlflow_db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _plain_argv_shared_mlflow(monkeypatch, _mlflow_db):
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])
    # One tracking store for the module: creating a SQLite store takes seconds, and these tests
    # do not look at what is logged.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_db)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    save_tokenizer(train_tokenizer([english_text(100), *ZH], 300), str(path))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cpm-lightning ARGV`."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_user_error(code: int, err: str, expected: str) -> None:
    """Exit 2 and exactly one error line, `error: EXPECTED`; no traceback, no usage block."""
    assert code == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [f"error: {expected}"], err


def assert_no_partial_shards(cache: Path) -> None:
    """Only complete shards (with meta.json) in the cache; no temporary directories left."""
    shards = cache / "shards"
    entries = list(shards.iterdir()) if shards.exists() else []
    assert all(not e.name.startswith(".") and (e / "meta.json").exists() for e in entries), entries


def fit(capsys, tmp_path, corpus, *extra, **overrides) -> tuple[int, str]:
    """(exit status, stderr) of `fit` on the tiny config with `overrides`; no checkpoint written."""
    overrides.setdefault("registry.path", None)  # these runs are not about the proposal registry
    config = write_config(tmp_path / "config.yaml", corpus, **overrides)
    code, _, err = run_cli(capsys, "fit", "--config", config, *extra)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    return code, err


# -- data sources: each case with a given tokenizer (fails while building shards) and without
# -- one (fails while reading the sources to train the tokenizer) -----------------------------

def _nomatch(tmp_path):
    url = str(tmp_path / "nothing-*.txt")
    return "en", {"url": url}, f"data.sources.en.url: {url!r} matches no file"


def _missing(tmp_path):
    url = str(tmp_path / "missing.txt")
    return "en", {"url": url}, f"data.sources.en.url: {url!r} matches no file"


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    return "en", {"url": str(path)}, f"data.sources.en: {str(path)!r} holds no text (empty source)"


def _blank(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n \n\t\n")
    return "en", {"url": str(path)}, f"data.sources.en: {str(path)!r} holds no text (empty source)"


def _binary(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(np.arange(4096, dtype=np.int32).tobytes())
    return "en", {"url": str(path)}, f"data.sources.en: {path} is not text (binary data); expected UTF-8 text"


def _not_gzip(tmp_path):
    path = tmp_path / "en.txt.gz"
    path.write_text(english_text(5))
    return "en", {"url": str(path)}, f"data.sources.en: cannot read {path} (BadGzipFile: Not a gzipped file (b'It'))"


def _jsonl_all_bad(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('not json\n{"title": "no text field"}\n["a list"]\n{"text": 3}\n{"text": ""}\n')
    return "zh", {"url": str(path), "format": "jsonl"}, (
        f"data.sources.zh: all 5 JSONL lines of {str(path)!r} are bad (not JSON, or no string field 'text')")


SOURCE_FAULTS = [_nomatch, _missing, _empty, _blank, _binary, _not_gzip, _jsonl_all_bad]


# Each fault once through fit: found while building shards (data.tokenizer given) or while
# reading the sources to train a tokenizer (none given). `tokenizer train` below meets them all.
FIT_CASES = [(_nomatch, True), (_empty, True), (_binary, True), (_jsonl_all_bad, True),
             (_missing, False), (_blank, False), (_not_gzip, False), (_jsonl_all_bad, False)]


@pytest.mark.parametrize("fault, given_tokenizer", FIT_CASES,
                         ids=[f"{f.__name__[1:]}-{'tokenizer' if t else 'no-tokenizer'}" for f, t in FIT_CASES])
@pytest.mark.slow
def test_bad_source_in_fit(fault, given_tokenizer, tmp_path, corpus, tokenizer_path, capsys):
    name, source, expected = fault(tmp_path)
    overrides = {f"data.sources.{name}": source}
    if given_tokenizer:
        overrides["data.tokenizer"] = str(tokenizer_path)
    code, err = fit(capsys, tmp_path, corpus, **overrides)
    assert_user_error(code, err, expected)
    assert_no_partial_shards(tmp_path / "cache")
    if name == "en":  # the first source: nothing was tokenized before the fault
        assert not list((tmp_path / "cache").glob("shards/*")) and not list((tmp_path / "cache").glob("shards/.*"))
    if not given_tokenizer:
        assert not list((tmp_path / "cache").glob("tokenizers/*")), "a tokenizer was written"


def built(name: str, src: SourceConfig, tokenizer: Tokenizer, cache: Path) -> Path:
    """The shard directory of a one-file source, built."""
    [piece] = open_source(prepare_source(name, src, tokenizer, cache), cache).pieces
    return piece.path


def test_bad_jsonl_lines_are_skipped_and_counted(tmp_path, tokenizer_path, capsys):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": t}, ensure_ascii=False) for t in ZH]
    path.write_text("\n".join([good[0], "{not json", good[1], '{"body": "x"}', good[2], '{"text": null}']) + "\n")
    tokenizer = Tokenizer.load(str(tokenizer_path))
    shard_dir = built("zh", SourceConfig(url=str(path), format="jsonl"), tokenizer, tmp_path / "cache")
    err = capsys.readouterr().err
    assert ("warning: data.sources.zh: skipped 3 JSONL lines that are not JSON or lack a string field 'text'"
            in err.splitlines())
    meta = json.loads((shard_dir / "meta.json").read_text())
    assert (meta["documents"], meta["bad_lines"]) == (3, 3)
    tokens, ends = Shard.open(shard_dir).tokens, np.load(shard_dir / "index.npy")
    docs = [tokenizer.decode(tokens[start:end - 1].tolist()) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    assert docs == ZH


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer_path, capsys):
    path = tmp_path / "latin1.txt"
    text = english_text(20)
    path.write_bytes(text.encode() + "\nCafé naïve, 學而時習之".encode("latin-1", errors="replace")
                     + b" \xe5\xad" + "子曰".encode())  # 2 latin-1 bytes, a truncated CJK char
    tokenizer = Tokenizer.load(str(tokenizer_path))
    shard_dir = built("en", SourceConfig(url=str(path)), tokenizer, tmp_path / "cache")
    err = capsys.readouterr().err
    assert "warning: data.sources.en: replaced 3 invalid UTF-8 sequences with U+FFFD" in err.splitlines(), err
    assert "Traceback" not in err
    meta = json.loads((shard_dir / "meta.json").read_text())
    assert (meta["documents"], meta["replaced_bytes"]) == (1, 3)
    decoded = tokenizer.decode([int(t) for t in Shard.open(shard_dir).tokens[:-1]])
    assert decoded.startswith(text) and decoded.endswith("Caf\ufffd na\ufffdve, ????? \ufffd子曰")


# -- model and data config keys ---------------------------------------------------------------

def test_unknown_preset(tmp_path, corpus, tokenizer_path, capsys):
    code, err = fit(capsys, tmp_path, corpus, **{"model.arch.preset": "cpm-ant-20b",
                                                  "data.tokenizer": str(tokenizer_path)})
    assert_user_error(code, err, f"unknown model.arch.preset 'cpm-ant-20b'; expected one of: {', '.join(sorted(PRESETS))}")


def test_unknown_component(tmp_path, corpus, tokenizer_path, capsys):
    code, err = fit(capsys, tmp_path, corpus, **{"model.arch.norm": "batchnorm", "data.tokenizer": str(tokenizer_path)})
    assert_user_error(code, err, "unknown model.arch.norm 'batchnorm'; expected one of: layernorm, rmsnorm")


@pytest.mark.parametrize("kind", sorted(COMPONENTS))
def test_unknown_component_of_each_kind_lists_the_valid_names(kind):
    with pytest.raises(UserError) as error:
        ArchConfig(preset="tiny", **{kind: "nope"})
    assert str(error.value) == f"unknown model.arch.{kind} 'nope'; expected one of: {', '.join(sorted(COMPONENTS[kind]))}"


def test_seq_len_above_model_maximum(tmp_path, corpus, tokenizer_path, capsys):
    max_len = PRESETS["tiny"]["max_len"]
    code, err = fit(capsys, tmp_path, corpus, **{"data.seq_len": max_len + 1, "data.tokenizer": str(tokenizer_path)})
    assert_user_error(code, err, f"data.seq_len={max_len + 1} is above the model's maximum length "
                                 f"model.arch.max_len={max_len}")
    assert_no_partial_shards(tmp_path / "cache")


def test_source_weight_not_positive(tmp_path, corpus, tokenizer_path, capsys):
    code, err = fit(capsys, tmp_path, corpus, **{"data.sources.zh.weight": 0, "data.tokenizer": str(tokenizer_path)})
    assert_user_error(code, err, "data.sources.zh.weight must be in (0, 1000000], got 0.0")


def test_tokenizer_path_does_not_exist(tmp_path, corpus, capsys):
    missing = tmp_path / "no" / "tok.model"
    code, err = fit(capsys, tmp_path, corpus, **{"data.tokenizer": str(missing)})
    assert_user_error(code, err, f"tokenizer {str(missing)!r} does not exist; train one with "
                                 "`cpm-lightning tokenizer train` or fix data.tokenizer")
    assert not (tmp_path / "cache").exists()


def test_tokenizer_that_is_not_a_model(tmp_path, corpus, capsys):
    code, err = fit(capsys, tmp_path, corpus, **{"data.tokenizer": str(corpus["en"])})
    assert_user_error(code, err, f"{corpus['en']}: not a SentencePiece model or a CPM-Ant vocab.txt")


# -- checkpoints --------------------------------------------------------------------------------

def test_fit_ckpt_path_does_not_exist(tmp_path, corpus, tokenizer_path, capsys):
    code, err = fit(capsys, tmp_path, corpus, "--ckpt_path", "missing.ckpt", **{"data.tokenizer": str(tokenizer_path)})
    assert code == 2 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith("error: ") and "--ckpt_path" in line and "missing.ckpt" in line and "does not exist" in line
    assert_no_partial_shards(tmp_path / "cache")


def test_generate_checkpoint_does_not_exist(capsys):
    code, _, err = run_cli(capsys, "generate", "missing.ckpt", "--prompt", "子曰")
    assert_user_error(code, err, "checkpoint 'missing.ckpt' does not exist")


def test_generate_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    code, _, err = run_cli(capsys, "generate", "notes.ckpt", "--prompt", "hi")
    assert_user_error(code, err, "notes.ckpt: not a readable checkpoint (not a file written by torch.save)")


def test_generate_from_a_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "somedir").mkdir()
    code, _, err = run_cli(capsys, "generate", "somedir", "--prompt", "hi")
    assert_user_error(code, err, "'somedir' is not a checkpoint file or model directory")


ONE_OF = ("model info: give a preset (--preset NAME) or a trained model (a checkpoint, model directory or models:/ "
          "URI), one of them")


@pytest.mark.parametrize("args, message", [
    (["model", "info"], ONE_OF),
    (["model", "info", "run.ckpt", "--preset", "tiny"], ONE_OF),
    (["model", "info", "missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
    (["proposals", "check", "--against", "missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
])
def test_what_a_model_is_measured_against_must_exist(args, message, capsys):
    code, out, err = run_cli(capsys, *args)
    assert_user_error(code, err, message)
    assert "OK" not in out  # --against is read before the proposals


# -- the config file itself ---------------------------------------------------------------------

def test_config_file_does_not_exist(capsys):
    code, _, err = run_cli(capsys, "fit", "--config", "nope.yaml")
    assert_user_error(code, err, "nope.yaml: cannot read the run config: No such file or directory")


def test_config_is_not_yaml(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("model:\n  arch: {preset: tiny\ndata:\n  seq_len: 32\n")
    code, _, err = run_cli(capsys, "fit", "--config", "broken.yaml")
    assert code == 2 and "Traceback" not in err and "usage:" not in err, err
    [line] = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith("error: broken.yaml:3:5: not valid YAML: "), line


def test_unknown_config_key(tmp_path, corpus, capsys):
    config = write_config(tmp_path / "config.yaml", corpus, **{"data.seq_lenght": 64})
    code, _, err = run_cli(capsys, "fit", "--config", config)
    assert_user_error(code, err, "Subcommand 'fit' does not accept option 'data.seq_lenght'")


def test_config_value_of_the_wrong_type(tmp_path, corpus, capsys):
    config = write_config(tmp_path / "config.yaml", corpus)
    code, _, err = run_cli(capsys, "fit", "--config", config, "--data.seq_len", "long")
    assert_user_error(code, err, "Parser key \"data.seq_len\": Expected a <class 'int'>. Got value: long")


# -- the other verbs ----------------------------------------------------------------------------

def test_model_info_unknown_preset(capsys):
    code, out, err = run_cli(capsys, "model", "info", "--preset", "nope")
    assert_user_error(code, err, f"unknown model.arch.preset 'nope'; expected one of: {', '.join(sorted(PRESETS))}")
    assert out == ""


def test_model_info_no_devices(capsys):
    code, _, err = run_cli(capsys, "model", "info", "--preset", "tiny", "--devices", "0")
    assert_user_error(code, err, "--devices must be at least 1, got 0")


@pytest.mark.parametrize("fault", [f for f in SOURCE_FAULTS if f is not _jsonl_all_bad], ids=lambda f: f.__name__[1:])
def test_tokenizer_train_bad_source(fault, tmp_path, corpus, capsys):
    _, source, expected = fault(tmp_path)
    code, _, err = run_cli(capsys, "tokenizer", "train", "--source", corpus["zh"], "--source", source["url"],
                           "--vocab-size", 300, "--output", tmp_path / "out" / "tok.model")
    assert_user_error(code, err, expected.replace("data.sources.en.url", "--source[1]")
                      .replace("data.sources.en", "--source[1]"))
    assert not (tmp_path / "out").exists()


def test_tokenizer_train_all_jsonl_lines_bad(tmp_path, capsys):
    _, source, expected = _jsonl_all_bad(tmp_path)
    code, _, err = run_cli(capsys, "tokenizer", "train", "--source", source["url"], "--vocab-size", 300,
                           "--output", tmp_path / "tok.model")
    assert_user_error(code, err, expected.replace("data.sources.zh", "--source[0]"))
    assert not (tmp_path / "tok.model").exists()


def test_tokenizer_train_vocab_size_too_small(tmp_path, corpus, capsys):
    code, _, err = run_cli(capsys, "tokenizer", "train", "--source", corpus["en"], "--vocab-size", 100,
                           "--output", tmp_path / "tok.model")
    assert_user_error(code, err, "--vocab-size must be at least 264 (256 byte pieces + specials), got 100")
    assert list(tmp_path.glob("tok.model*")) == []


def test_tokenizer_train_warns_about_skipped_lines_and_bad_bytes(tmp_path, corpus, capsys):
    jsonl = tmp_path / "some-bad.jsonl"
    jsonl.write_text(corpus["zh"].read_text() + "\n{oops\n")
    text = tmp_path / "bytes.txt"
    text.write_bytes(corpus["en"].read_bytes() + b"\xff\xfe end")
    main(["tokenizer", "train", "--source", str(jsonl), "--source", str(text), "--vocab-size", "300",
          "--output", str(tmp_path / "tok.model")])
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "warning: --source[0]: skipped 1 JSONL lines that are not JSON or lack a string field 'text'",
        "warning: --source[1]: replaced 2 invalid UTF-8 sequences with U+FFFD",
    ]
    vocab_size = Tokenizer.load(str(tmp_path / "tok.model")).vocab_size
    assert out == f"wrote {tmp_path / 'tok.model'} ({vocab_size} pieces)\n" and vocab_size <= 300



def test_fit_ckpt_path_last_without_a_checkpoint(tmp_path, corpus, tokenizer_path, capsys):
    code, err = fit(capsys, tmp_path, corpus, "--ckpt_path", "last", **{"data.tokenizer": str(tokenizer_path)})
    assert code == 2 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith("error: --ckpt_path last: ") and str(tmp_path / "run" / "checkpoints") in line, line


@pytest.mark.slow
def test_console_script_reports_a_broken_config_on_one_line(tmp_path):
    # The installed entry point reads sys.argv itself (main(None)), unlike the tests above.
    (tmp_path / "broken.yaml").write_text("trainer:\n  max_steps: [1, 2\n")
    script = Path(sys.executable).parent / "cpm-lightning"
    done = subprocess.run([str(script), "fit", "--config", "broken.yaml"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: broken.yaml:3:1: not valid YAML: ") and done.stderr.count("\n") == 1, done.stderr


# -- issue 10, class 1: what ended in a traceback ends in one line --------------------------------

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer_path) -> Path:
    """A real single-file checkpoint: one step of `fit` on the tiny config."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "config.yaml", write_corpus(root), **{
        "trainer.max_steps": 1, "checkpoint.every_n_steps": 1, "trainer.logger": False, "registry.path": None,
        "data.tokenizer": str(tokenizer_path), "data.cache_dir": str(root / "cache")})
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before the autouse ones
        mp.setattr(sys, "argv", ["cpm-lightning"])
        main(["fit", "--config", str(config)])
    return root / "run" / "checkpoints" / "step-00000001.ckpt"


def generate(capsys, source, *options) -> str:
    """stdout of a successful `generate SOURCE --prompt ...`."""
    main(["generate", str(source), "--prompt", "It is a truth", *map(str, options)])
    return capsys.readouterr().out


# Each is refused before the checkpoint is read: it does not even exist.
GENERATE_OPTIONS = [
    (["--max-new-tokens", "-5"], "max_new_tokens must be at least 0, got -5"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0 (0 is greedy), got nan"),
    (["--temperature=-1"], "temperature must be a finite number >= 0 (0 is greedy), got -1.0"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0 (0 is greedy), got inf"),
    (["--top-k", "-3"], "top_k must be at least 1 (or unset), got -3"),
    (["--top-k", "0"], "top_k must be at least 1 (or unset), got 0"),
    (["--top-p", "0"], "top_p must be in (0, 1] (or unset), got 0.0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1] (or unset), got 1.5"),
    (["--top-p", "nan"], "top_p must be in (0, 1] (or unset), got nan"),
    (["--seed", str(2**64)], f"seed must be in [-2**63, 2**64 - 1], got {2**64}"),
    ([f"--seed={-2**63 - 1}"], f"seed must be in [-2**63, 2**64 - 1], got {-2**63 - 1}"),
    (["--device", "tpu"], "device 'tpu': expected cpu, cuda or cuda:N"),
    (["--device", ""], "device '': expected cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("options, expected", GENERATE_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_generate_option_out_of_range(options, expected, capsys):
    code, _, err = run_cli(capsys, "generate", "missing.ckpt", "--prompt", "hi", *options)
    assert_user_error(code, err, expected)


@pytest.mark.parametrize("count, device, expected", [
    (0, "cuda", "device 'cuda': this machine has no CUDA device; use cpu"),
    (0, "cuda:0", "device 'cuda:0': this machine has no CUDA device; use cpu"),
    (2, "cuda:2", "device 'cuda:2': this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
])
def test_generate_on_a_cuda_device_the_machine_lacks(count, device, expected, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    code, _, err = run_cli(capsys, "generate", "missing.ckpt", "--prompt", "hi", "--device", device)
    assert_user_error(code, err, expected)


def test_the_served_model_checks_its_params_too():
    # The pyfunc model of a release takes the same settings as request params.
    from cpm_lightning.tracking.mlflow_model import CPMGenerator

    with pytest.raises(UserError, match=r"^top_p must be in \(0, 1\] \(or unset\), got 2.0$"):
        CPMGenerator().predict(None, ["hi"], {"top_p": 2})


@pytest.mark.slow
def test_a_tiny_temperature_is_greedy(checkpoint, capsys):
    # Dividing the logits by 1e-300 made them inf, then NaN: torch.multinomial failed.
    greedy = generate(capsys, checkpoint, "--max-new-tokens", 8, "--temperature", 0)
    assert generate(capsys, checkpoint, "--max-new-tokens", 8, "--temperature", "1e-300") == greedy


def _edited_checkpoint(checkpoint: Path, out: Path, edit) -> Path:
    import torch

    ckpt = torch.load(checkpoint, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, out)
    seal_zip(out)  # a checkpoint as fit writes it, but for the edit
    return out


def _nan_weights(ckpt: dict) -> None:
    for tensor in ckpt["state_dict"].values():
        tensor.fill_(float("nan"))


ARCH_FIELDS = ", ".join(f.name for f in dataclasses.fields(ArchConfig))
DAMAGED_CHECKPOINTS = {
    "unknown arch key": (lambda c: c["cpm"]["arch"].update(flash=True),
                         "{path}: unknown architecture key 'flash'; expected: " + ARCH_FIELDS),
    "arch not a mapping": (lambda c: c["cpm"].update(arch="tiny"),
                           "{path}: the architecture is str; expected a mapping of model.arch fields"),
    "unknown component": (lambda c: c["cpm"]["arch"].update(norm="batchnorm"),
                          "{path}: unknown model.arch.norm 'batchnorm'; expected one of: layernorm, rmsnorm"),
    "cpm section not a mapping": (lambda c: c.update(cpm=5), "{path}: not a cpm-lightning checkpoint (no 'cpm' section)"),
    "NaN weights": (_nan_weights, "the model's output is not finite (NaN or infinite logits): its weights are damaged"),
}


@pytest.mark.parametrize("case", list(DAMAGED_CHECKPOINTS))
def test_generate_from_a_damaged_checkpoint(case, checkpoint, tmp_path, capsys):
    edit, expected = DAMAGED_CHECKPOINTS[case]
    path = _edited_checkpoint(checkpoint, tmp_path / "edited.ckpt", edit)
    code, _, err = run_cli(capsys, "generate", path, "--prompt", "hi")
    assert_user_error(code, err, expected.format(path=path))


@pytest.fixture
def model_dir(checkpoint, tmp_path, capsys) -> Path:
    main(["checkpoint", "consolidate", str(checkpoint), str(tmp_path / "model")])
    capsys.readouterr()
    return tmp_path / "model"


def _with_config(text: str):
    return lambda d: (d / "config.json").write_text(text)


def _truncated_weights(d: Path) -> None:
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "size").write_text(str(len(raw)))  # for the message


DAMAGED_MODEL_DIRS = {
    "unknown arch key": (lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "num_head": 4})),
        "{d}/config.json: unknown architecture key 'num_head' (did you mean 'num_heads'?); expected: " + ARCH_FIELDS),
    "config not JSON": (_with_config("{preset: tiny"), "{d}/config.json: not JSON (Expecting property name enclosed "
                        "in double quotes: line 1 column 2 (char 1)); expected the architecture as a JSON object"),
    "config a list": (_with_config("[1, 2]"), "{d}/config.json: the architecture is list; expected a mapping of "
                      "model.arch fields"),
    "weights not safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 4096),
                                "{d}/model.safetensors: not a readable safetensors file (its header length, "
                                f"{2**64 - 1} bytes, is more than the file holds)"),
    "truncated weights": (_truncated_weights, "{d}/model.safetensors: not a readable safetensors file (truncated: "
                          "{half} bytes, its header describes {size})"),
}


@pytest.mark.parametrize("case", list(DAMAGED_MODEL_DIRS))
def test_generate_from_a_damaged_model_directory(case, model_dir, capsys):
    damage, expected = DAMAGED_MODEL_DIRS[case]
    damage(model_dir)
    code, _, err = run_cli(capsys, "generate", model_dir, "--prompt", "hi")
    size = int((model_dir / "size").read_text()) if (model_dir / "size").exists() else 0
    assert_user_error(code, err, expected.format(d=model_dir, size=size, half=size // 2))


def _sharded(checkpoint: Path, out: Path) -> Path:
    """The checkpoint in the layout trainer.strategy=fsdp writes (ModelParallelStrategy.save_checkpoint):
    tensors in DCP shards indexed by .metadata, the rest in meta.pt. The optimizer is left out:
    generate does not read it."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt.pop("optimizer_states")
    with warnings.catch_warnings():  # "torch.distributed is disabled...": one process, as intended
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": ckpt.pop("state_dict")}, checkpoint_id=out)
    torch.save(ckpt, out / "meta.pt")
    return out


def test_generate_from_a_sharded_checkpoint_with_a_file_missing_or_cut(checkpoint, tmp_path, capsys):
    sharded = _sharded(checkpoint, tmp_path / "step-00000001.ckpt")
    # Without hashes.json (read unverified): its sizes against .metadata's are still checked.
    assert generate(capsys, sharded, "--max-new-tokens", 3, "--temperature", 0, "--trust-unverified") == \
        generate(capsys, checkpoint, "--max-new-tokens", 3, "--temperature", 0)
    [shard] = sharded.glob("*.distcp")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    code, _, err = run_cli(capsys, "generate", sharded, "--prompt", "hi", "--trust-unverified")
    assert_user_error(code, err, f"{shard.resolve()}: {size // 2} bytes; the checkpoint's .metadata expects {size} "
                                 "bytes (a truncated or incomplete copy)")
    (sharded / ".metadata").unlink()
    code, _, err = run_cli(capsys, "generate", sharded, "--prompt", "hi", "--trust-unverified")
    assert_user_error(code, err, f"{sharded.resolve()}: not a sharded checkpoint (no .metadata)")


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "sharded without .metadata"])
def test_fit_ckpt_path_that_is_not_a_checkpoint(damage, checkpoint, tmp_path, corpus, tokenizer_path, capsys):
    # Lightning's own --ckpt_path reader (LightningCLI._parse_ckpt_path) ended in a traceback.
    if damage == "random bytes":
        path = tmp_path / "random.ckpt"
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "truncated":
        path = tmp_path / "cut.ckpt"
        path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    else:
        path = _sharded(checkpoint, tmp_path / "sharded.ckpt")
        (path / ".metadata").unlink()
    code, err = fit(capsys, tmp_path, corpus, "--ckpt_path", path.name, **{"data.tokenizer": str(tokenizer_path)})
    expected = {"random bytes": f"{path.name}: not a readable checkpoint (not a file written by torch.save)",
                "truncated": f"{path.resolve()} is damaged: its zip archive has no end (a truncated copy); {REMEDY}",
                }.get(damage, f"{path.resolve()}: not a sharded checkpoint (no .metadata)")
    assert_user_error(code, err, expected)
    assert not (tmp_path / "cache").exists()  # refused before the data was read


@pytest.mark.parametrize("output, expected", [
    ("a_file/tok.model", "cannot write the tokenizer to 'a_file/tok.model': {tmp}/a_file is a file, not a directory"),
    ("a_dir", "cannot write the tokenizer to 'a_dir': it is a directory; expected a file path"),
    ("/proc/cpm-lightning/tok.model", "cannot write the tokenizer to '/proc/cpm-lightning/tok.model': "
                                      "No such file or directory"),
])
def test_tokenizer_train_output_that_cannot_be_written(output, expected, tmp_path, corpus, capsys):
    (tmp_path / "a_file").write_text("kept\n")
    (tmp_path / "a_dir").mkdir()
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, "tokenizer", "train", "--source", corpus["zh"], "--vocab-size", 300,
                             "--output", output)
    assert_user_error(code, err, expected.format(tmp=tmp_path))
    assert sorted(tmp_path.rglob("*")) == before and out == ""  # no temporary file either


def test_flex_attention_on_cpu_is_refused_before_anything_is_prepared(tmp_path, corpus, tokenizer_path, capsys):
    code, err = fit(capsys, tmp_path, corpus, **{"model.parallel.attention": "flex", "data.tokenizer": str(tokenizer_path)})
    assert_user_error(code, err, "model.parallel.attention: flex cannot train on CPU (this torch has no FlexAttention "
                                 "backward there); use chunked, sdpa or auto")
    assert not (tmp_path / "cache").exists()  # refused while planning: no shard built, no run logged


def test_trainer_accelerator_this_machine_lacks(tmp_path, corpus, tokenizer_path, monkeypatch, capsys):
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))  # also on a GPU machine
    code, err = fit(capsys, tmp_path, corpus, "--trainer.accelerator", "gpu", **{"data.tokenizer": str(tokenizer_path)})
    assert_user_error(code, err, "trainer: No supported gpu backend found! (accelerators on this machine: cpu)")


# Python that CPython's parser refuses with RecursionError or MemoryError rather than a
# SyntaxError: nesting deeper than it goes.
PATHOLOGICAL_PYTHON = {
    "deep parentheses": "x = " + "(" * 300 + "1" + ")" * 300,
    "long chain of +": "x = " + "1+" * 200_000 + "1",
    "long chain of unary -": "x = " + "-" * 200_000 + "1",
    "long attribute chain": "x = a" + ".b" * 200_000,
    "nested lambdas": "f = " + "lambda: " * 3000 + "1",
}


@pytest.mark.parametrize("case", list(PATHOLOGICAL_PYTHON))
def test_python_docstrings_of_a_pathological_module(case, tmp_path):
    from datamodules.sources import ReadStats, documents, expand

    stats = ReadStats()
    (tmp_path / "x.py").write_text(f'"""A module docstring long enough to be kept as a document."""\n'
                                   f'{PATHOLOGICAL_PYTHON[case]}\n')
    src = SourceConfig(url=str(tmp_path / "x.py"), format="python_docstrings")
    assert list(documents("py", src, expand("py", src)[0], stats)) == []
    assert stats.documents == 0


@pytest.mark.parametrize("url", ["stdlib://", "stdlib://json", "stdlib://[", "stdlib://a\0b", "stdlib://" + "a/" * 3000])
def test_python_docstrings_of_a_pathological_module_path(url):
    from datamodules.sources import expand

    with pytest.raises(UserError) as error:
        expand("py", SourceConfig(url=url, format="python_docstrings"))
    assert str(error.value) == f"data.sources.py.url: {url!r} matches no file"


def test_fit_on_a_python_source_too_deep_to_parse(tmp_path, corpus, tokenizer_path, capsys):
    (tmp_path / "deep.py").write_text(f'"""{"A docstring. " * 5}"""\n{PATHOLOGICAL_PYTHON["long chain of +"]}\n')
    code, err = fit(capsys, tmp_path, corpus, **{"data.tokenizer": str(tokenizer_path), "data.sources.py": {
        "url": str(tmp_path / "deep.py"), "format": "python_docstrings"}})
    assert_user_error(code, err, f"data.sources.py: {str(tmp_path / 'deep.py')!r} holds no text (empty source)")


def test_proposals_resolve_config_that_is_not_yaml(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("model:\n  arch: {preset: tiny\ndata:\n  seq_len: 32\n")
    code, out, err = run_cli(capsys, "proposals", "resolve", "--config", "broken.yaml")
    assert_user_error(code, err, "broken.yaml:3:5: not valid YAML: while parsing a flow mapping expected ',' or '}', "
                                 "but got ':'")
    assert out == ""


@pytest.mark.parametrize("argv, expected", [
    (["model", "info", "--preset", "tiny", "--devices", "two"],
     "cpm-lightning model info: argument --devices: invalid int value: 'two'; see `cpm-lightning model info --help`"),
    (["generate", "x.ckpt"], "cpm-lightning generate: the following arguments are required: --prompt; "
                             "see `cpm-lightning generate --help`"),
    (["generate", "x.ckpt", "--prompt", "hi", "--max-new-tokens", "many"],
     "cpm-lightning generate: argument --max-new-tokens: invalid int value: 'many'; see `cpm-lightning generate --help`"),
    (["model", "info", "--preset", "tiny", "--colour"], "cpm-lightning: unrecognized arguments: --colour; "
                                                         "see `cpm-lightning --help`"),
    (["proposals", "resolve", "--config", "c.yaml", "--at-step", "-1"], "--at-step must be >= 0, got -1"),
])
def test_usage_mistakes_are_one_line(argv, expected, capsys):
    # argparse printed its usage block above the error.
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, expected)


def test_fit_tokenizer_that_is_a_directory(tmp_path, corpus, capsys):
    (tmp_path / "tok").mkdir()
    code, err = fit(capsys, tmp_path, corpus, **{"data.tokenizer": str(tmp_path / "tok")})
    assert_user_error(code, err, f"tokenizer {str(tmp_path / 'tok')!r}: cannot read it (Is a directory); expected a "
                                 "tokenizer file")


# -- issue 10, class 9 ------------------------------------------------------------------------------

def test_consolidate_into_a_directory_that_is_not_empty(checkpoint, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's weights")
    code, stdout, err = run_cli(capsys, "checkpoint", "consolidate", checkpoint, out)
    assert_user_error(code, err, f"{out}: exists and is not empty; expected a new or empty directory (--force "
                                 "replaces it)")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"] and stdout == ""
    assert (out / "model.safetensors").read_bytes() == b"someone else's weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory either
    main(["checkpoint", "consolidate", str(checkpoint), str(out), "--force"])
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert generate(capsys, out, "--max-new-tokens", 3, "--temperature", 0) == \
        generate(capsys, checkpoint, "--max-new-tokens", 3, "--temperature", 0)


BILLION_LAUGHS = "\n".join(
    ['lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    + ["trainer: {max_steps: *i}"]) + "\n"


@pytest.mark.parametrize("verb", [["fit", "--config"], ["validate", "-c"], ["proposals", "resolve", "--config"]])
def test_run_config_with_an_alias_bomb(verb, tmp_path, capsys):
    # Expanded, the last line holds 9**9 strings (gigabytes); composed, it is ten lines.
    (tmp_path / "bomb.yaml").write_text(BILLION_LAUGHS)
    code, _, err = run_cli(capsys, *verb, "bomb.yaml")
    assert_user_error(code, err, "bomb.yaml:1: b.0: YAML aliases (*name) are not allowed")


def test_group_file_with_aliases(tmp_path, corpus, capsys):
    # A group's values can come from a file of their own, read by jsonargparse like --config.
    config = write_config(tmp_path / "config.yaml", corpus)
    (tmp_path / "trainer.yaml").write_text("max_steps: &n 3\nval_check_interval: *n\n")
    code, _, err = run_cli(capsys, "fit", "--config", config, "--trainer=trainer.yaml")
    assert_user_error(code, err, "trainer.yaml:2: val_check_interval: YAML aliases (*name) are not allowed")


@pytest.mark.parametrize("name", ["trainer.txt", "trainer"])
def test_group_file_of_any_name_with_duplicate_keys(name, tmp_path, corpus, capsys):
    # jsonargparse reads any existing file given to a group, not only *.yaml: so does the strict reader.
    config = write_config(tmp_path / "config.yaml", corpus)
    (tmp_path / name).write_text("max_steps: 3\nmax_steps: 1000\n")
    code, _, err = run_cli(capsys, "fit", "--config", config, "--trainer", name)
    assert_user_error(code, err, f"{name}:2: max_steps: duplicate key")


@pytest.mark.parametrize("max_steps", [-1, 0, 10**9 + 1])
def test_fit_without_a_bounded_max_steps(max_steps, tmp_path, corpus, tokenizer_path, capsys):
    # Lightning's -1 is "no limit"; the training stream has no end, the schedule and `live` are keyed on it.
    code, err = fit(capsys, tmp_path, corpus, f"--trainer.max_steps={max_steps}", **{"data.tokenizer": str(tokenizer_path)})
    assert_user_error(code, err, f"trainer.max_steps must be in [1, 1000000000], got {max_steps}: a fit trains until "
                                 "then (its data has no end; -1, Lightning's default, would train forever)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, expected", [
    ("", "empty.yaml: empty; expected a run config: a mapping of config groups (trainer, model, data, ...)"),
    ("# nothing yet\n", "empty.yaml: empty; expected a run config: a mapping of config groups (trainer, model, data, ...)"),
    ("- trainer\n", "empty.yaml: expected a run config: a mapping of config groups (trainer, model, data, ...), got list"),
    ("trainer:\n  max_steps: 1\ntrainer:\n  max_steps: 2\n", "empty.yaml:3: trainer: duplicate key"),
    ("trainer: !!python/name:os.system\n", "empty.yaml:1:10: not valid YAML: YAML tag !!python/name:os.system is not "
                                           "allowed: a run config is plain data (strings, numbers, lists, mappings, dates)"),
    (b"trainer: {max_steps: 1}  # caf\xe9\n", "empty.yaml:1: file: not UTF-8 (byte 0xe9 at offset 30); save it as UTF-8"),
])
@pytest.mark.parametrize("verb", [["fit", "--config"], ["proposals", "resolve", "--config"]])
def test_run_config_that_holds_no_config(verb, content, expected, tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(capsys, *verb, "empty.yaml")
    assert_user_error(code, err, expected)
