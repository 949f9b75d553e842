"""What proposals may do (issue 10, classes 2 and 3): values within their fields' declared
ranges, a model within registry.max_params, data and tokenizers only under
registry.allowed_sources, and proposal files that are plain files in the registry. Each refusal
is one `path:line: field: message` line of `proposals check`, and `fit` refuses the same before
it reads or builds anything."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from pathlib import Path

import pytest
from conftest import write_config, write_proposal

from cpm_lightning.checkpoint.config import CheckpointConfig
from cpm_lightning.cli.main import main
from cpm_lightning.core.ranges import range_of
from cpm_lightning.registry.apply import RegistryConfig, apply_registry
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.train.run_config import GROUPS

DEFAULT_PREFIXES = "registry.allowed_sources (s3://cpm-lightning-data/)"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])  # LightningCLI warns about pytest's own


def run(capsys, *argv) -> tuple[int, list[str], str]:
    """(exit status, stdout lines, stderr) of `cpm-lightning ARGV`."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def line_of(path: Path, key: str) -> int:
    """1-based line of `key:` in a proposal file written by write_proposal."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(f"{key}:"))


def check_one(capsys, tmp_path, kind: str, changes: dict, *options) -> tuple[Path, list[str]]:
    """Write one proposal to a fresh registry and return it with `proposals check`'s lines,
    which must be one per problem and be counted on stderr."""
    path = write_proposal(tmp_path / "reg", 1, changes, kind=kind)
    code, lines, err = run(capsys, "proposals", "check", tmp_path / "reg", *options)
    assert code == (2 if lines[0] != "1 proposal file(s) OK" else 0), (lines, err)
    if code:
        assert err == f"{len(lines)} problem(s) in 1 proposal file(s)\n"
    return path, lines


# -- class 2: ranges ------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("training", "model.optim.eps", -1e-8, "model.optim.eps must be > 0, got -1e-08"),
    ("training", "model.optim.betas", [0.9, 1.0], "model.optim.betas[1] must be in [0, 1), got 1.0"),
    ("training", "model.optim.betas", [-0.5, 0.9], "model.optim.betas[0] must be in [0, 1), got -0.5"),
    ("training", "model.optim.lr", math.nan, "model.optim.lr must be a finite number > 0, got nan"),
    ("training", "model.optim.lr", math.inf, "model.optim.lr must be a finite number > 0, got inf"),
    ("training", "model.optim.weight_decay", 2.0, "model.optim.weight_decay must be in [0, 1], got 2.0"),
    ("training", "model.schedule.warmup_steps", 10**10,
     "model.schedule.warmup_steps must be in [0, 1000000000], got 10000000000"),
    ("training", "model.loss.z_loss", -math.inf, "model.loss.z_loss must be a finite number in [0, 1], got -inf"),
    ("architecture", "model.arch.num_segments", 0, "model.arch.num_segments must be >= 1, got 0"),
    ("architecture", "model.arch.num_attn_layers", -2, "model.arch.num_attn_layers must be >= 1, got -2"),
    ("architecture", "model.arch.num_attn_layers", 0, "model.arch.num_attn_layers must be >= 1, got 0"),
    ("architecture", "model.arch.num_ffn_layers", -1, "model.arch.num_ffn_layers must be >= 0, got -1"),
    ("architecture", "model.arch.norm_eps", 0.0, "model.arch.norm_eps must be in (0, 1], got 0.0"),
    ("data", "data.sources.en.weight", -1.0, "data.sources.en.weight must be in (0, 1000000], got -1.0"),
    ("data", "data.seq_len", 0, "data.seq_len must be in [1, 1048576], got 0"),
]


@pytest.mark.parametrize("kind, key, value, message", OUT_OF_RANGE, ids=[f"{c[1]}={c[2]}" for c in OUT_OF_RANGE])
def test_a_value_outside_its_range_is_refused_at_its_key(capsys, tmp_path, kind, key, value, message):
    path, lines = check_one(capsys, tmp_path, kind, {key: value})
    assert lines == [f"{path}:{line_of(path, key)}: changes.{key}: {message}"]


def test_each_bad_value_is_a_line_of_its_own(capsys, tmp_path):
    path, lines = check_one(capsys, tmp_path, "training", {"model.optim.lr": math.nan, "model.optim.eps": -1.0})
    assert lines == [
        f"{path}:{line_of(path, 'model.optim.lr')}: changes.model.optim.lr: model.optim.lr must be a finite number > 0, got nan",
        f"{path}:{line_of(path, 'model.optim.eps')}: changes.model.optim.eps: model.optim.eps must be > 0, got -1.0"]


def test_relative_buckets_need_a_max_distance_above_the_exact_buckets(capsys, tmp_path):
    path, lines = check_one(capsys, tmp_path, "architecture", {"model.arch.max_distance": 8})
    assert lines == [f"{path}:{line_of(path, 'changes')}: changes: model.arch.max_distance (8) must be above "
                     "num_buckets // 4 (8) for relative_buckets (checked on the default preset, tiny)"]


def test_huge_integer_in_a_proposal_is_a_yaml_problem(capsys, tmp_path):
    path = write_proposal(tmp_path / "reg", 1, {"model.arch.dim": 1}, kind="architecture")
    path.write_text(path.read_text().replace("model.arch.dim: 1", "model.arch.dim: " + "9" * 5000))
    code, lines, _ = run(capsys, "proposals", "check", tmp_path / "reg")
    assert code == 2 and lines == [f"{path}:{line_of(path, 'model.arch.dim')}: yaml: an integer of 5000 characters"]


@pytest.mark.parametrize("value", ["100000000000000000000000", "9223372036854775808", "-9223372036854775809"])
def test_an_integer_beyond_int64_is_refused(value, capsys, tmp_path):
    path = write_proposal(tmp_path / "reg", 1, {"model.arch.dim": 1}, kind="architecture", effective_from_step=5)
    path.write_text(path.read_text().replace("effective_from_step: 5", f"effective_from_step: {value}"))
    code, lines, _ = run(capsys, "proposals", "check", tmp_path / "reg")
    assert code == 2 and lines == [f"{path}:{line_of(path, 'effective_from_step')}: yaml: integer {value} is out of "
                                   "range: expected -9223372036854775808 to 9223372036854775807 (int64)"]


def test_fit_refuses_a_proposal_with_an_integer_beyond_int64(capsys, tmp_path, corpus):
    path = write_proposal(tmp_path / "reg", 1, {"model.arch.dim": 1}, kind="architecture", effective_from_step=5)
    path.write_text(path.read_text().replace("effective_from_step: 5", "effective_from_step: 100000000000000000000000"))
    config = write_config(tmp_path / "config.yaml", corpus, **{"registry.path": str(tmp_path / "reg")})
    code, _, err = run(capsys, "fit", "--config", config)
    assert code == 2 and err == (f"error: 1 problem(s) in the proposal registry {tmp_path / 'reg'}; nothing is applied:\n"
                                 f"{path}:{line_of(path, 'effective_from_step')}: yaml: integer 100000000000000000000000 "
                                 "is out of range: expected -9223372036854775808 to 9223372036854775807 (int64)\n")
    assert not (tmp_path / "run").exists()


# field -> (its YAML in the proposal, the column-free problem `proposals check` prints after the line)
HOSTILE_TEXT = {
    "title": ('"Rotary \\e[2J\\e[H"', "holds U+001B (a control character) at character 8"),
    "title ": ('"\\e]0;owned\\a"', "holds U+001B (a control character) at character 1"),
    "title  ": ('"Rotary\\a"', "holds U+0007 (a control character) at character 7"),
    "title   ": ('"Rotary \\u202egnp.exe"', "holds U+202E (a bidirectional control) at character 8"),
    "summary": ('"One\\nparagraph\\x00."', "holds U+0000 (a control character) at character 14"),
    "motivation": ('"Why \\u2066isolated\\u2069."', "holds U+2066 (a bidirectional control) at character 5"),
    "discussion": ('"https://github.com/x/y/discussions/1\\e[2J"', "holds U+001B (a control character) at character 37"),
    "evidence": ('[{run: 0123456789abcdef0123456789abcdef, verdict: "better\\u200f"}]',
                 "holds U+200F (a bidirectional control) at character 7"),
}


@pytest.mark.parametrize("field", HOSTILE_TEXT)
def test_control_and_bidi_characters_in_a_text_field_are_refused(field, capsys, tmp_path):
    yaml_value, problem = HOSTILE_TEXT[field]
    name = field.strip()
    path = write_proposal(tmp_path / "reg", 1, {"model.arch.dim": 64}, kind="architecture",
                          motivation="Why.", evidence=[])
    text = path.read_text().splitlines()
    i = next(i for i, line in enumerate(text) if line.startswith(f"{name}:"))
    text[i] = f"{name}: {yaml_value}"
    path.write_text("\n".join(text) + "\n")
    code, lines, _ = run(capsys, "proposals", "check", tmp_path / "reg")
    assert code == 2 and lines == [f"{path}:{i + 1}: {name}: {problem}; expected plain text"]
    # Refused, the proposal never reaches the terminal: `proposals list` leaves it out.
    code, out, err = run(capsys, "proposals", "list", "--dir", tmp_path / "reg")
    assert code == 0 and out == [] and err.startswith("warning: 1 problem(s) in ")


def _numeric(hint) -> bool:
    """int or float, alone, optional or in a tuple."""
    if hint in (int, float):
        return True
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) in (tuple, typing.Union, types.UnionType) and all(map(_numeric, args)) and bool(args)


def test_every_numeric_config_field_declares_its_range():
    """The guarantee behind the checks: no number a config takes is unbounded by accident
    (and every float is refused as NaN or infinite)."""
    classes = {cls for root in GROUPS.values() for cls in _dataclasses(root)} | {CheckpointConfig, RegistryConfig}
    hints = {(cls.__name__, f.name): (f, typing.get_type_hints(cls)[f.name]) for cls in classes
             for f in dataclasses.fields(cls)}
    numeric = {k for k, (f, hint) in hints.items() if _numeric(hint)}
    assert len(numeric) > 30 and {k for k in numeric if range_of(hints[k][0]) is None} == set()


def _dataclasses(cls):
    yield cls
    for hint in typing.get_type_hints(cls).values():
        for c in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(c):
                yield from _dataclasses(c)


def test_integers_where_floats_belong_reach_the_run_as_floats(tmp_path):
    """YAML reads `betas: [0, 0]` as integers, which pass the type check of floats; AdamW
    refuses integer betas, so the registry sets floats, as jsonargparse would have parsed them."""
    from jsonargparse import Namespace

    write_proposal(tmp_path / "reg", 1, {"model.optim.betas": [0, 0], "model.optim.lr": 1}, kind="training")
    cfg = Namespace(registry=Namespace(**dataclasses.asdict(RegistryConfig(path=str(tmp_path / "reg")))),
                    model=Namespace(arch=Namespace(preset="tiny"), optim=Namespace(betas=(0.9, 0.95), lr=0.02)),
                    data=Namespace(tokenizer=None, tokenizer_vocab_size=400))
    apply_registry(cfg, set(), ConfigSchema(GROUPS))
    assert (cfg.model.optim.betas, cfg.model.optim.lr) == ((0.0, 0.0), 1.0)
    assert all(type(v) is float for v in (*cfg.model.optim.betas, cfg.model.optim.lr))


def test_an_integer_no_float_can_hold_is_refused(capsys, tmp_path):
    # The strict loader refuses it, as every integer beyond int64, naming the bound.
    path, lines = check_one(capsys, tmp_path, "training", {"model.optim.lr": 10**400})
    assert lines == [f"{path}:{line_of(path, 'model.optim.lr')}: yaml: integer {str(10**400)[:20]}... (401 characters) "
                     "is out of range: expected -9223372036854775808 to 9223372036854775807 (int64)"]


# -- class 2: size ---------------------------------------------------------------------------

def test_check_refuses_a_model_above_the_default_budget(capsys, tmp_path):
    path, lines = check_one(capsys, tmp_path, "architecture", {"model.arch.num_attn_layers": 100_000_000})
    assert lines == [f"{path}:{line_of(path, 'changes')}: changes: with model.arch.num_attn_layers, the model has "
                     "1,644,800,088,384 parameters, above registry.max_params=20,000,000,000 (checked on the default "
                     "preset, tiny)"]


def test_check_takes_the_budget_from_max_params(capsys, tmp_path):
    changes = {"model.arch.num_attn_layers": 3, "model.arch.ffn": "swiglu"}
    path, lines = check_one(capsys, tmp_path, "architecture", changes, "--max-params", 137_728)
    assert lines == ["1 proposal file(s) OK"]
    path, lines = check_one(capsys, tmp_path, "architecture", changes, "--max-params", 137_727)
    assert lines == [f"{path}:{line_of(path, 'changes')}: changes: with model.arch.num_attn_layers, model.arch.ffn, "
                     "the model has 137,728 parameters, above registry.max_params=137,727 (checked on the default "
                     "preset, tiny)"]
    code, _, err = run(capsys, "proposals", "check", tmp_path / "reg", "--max-params", 0)
    assert code == 2 and err == "error: --max-params must be at least 1, got 0\n"


def fit(capsys, tmp_path, corpus, registry: dict, *argv) -> tuple[int, str]:
    """(exit status, stderr) of `fit` on the tiny config with the registry group `registry`."""
    config = write_config(tmp_path / "config.yaml", corpus, registry=registry)
    code, _, err = run(capsys, "fit", "--config", config, *argv)
    return code, err


def assert_nothing_started(tmp_path: Path) -> None:
    """No tokenizer trained, no shard, no checkpoint, no tracking store."""
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_fit_refuses_a_model_above_max_params_before_building_anything(capsys, tmp_path, corpus):
    path = write_proposal(tmp_path / "reg", 1, {"model.arch.num_attn_layers": 100_000_000})
    code, err = fit(capsys, tmp_path, corpus, {"path": "reg"})
    assert code == 2 and err.splitlines()[-1] == (
        f"reg/{path.name}:{line_of(path, 'changes')}: changes: with model.arch.num_attn_layers, the model has "
        "1,644,800,088,384 parameters, above registry.max_params=20,000,000,000 (checked on the default preset, tiny)")
    assert_nothing_started(tmp_path)


def test_fit_sizes_the_model_the_proposals_make_of_the_run_config(capsys, tmp_path, corpus):
    """Alone on tiny the proposals fit the budget; on this run's wider model they do not. The
    vocabulary is that of the tokenizer the run would train (data.tokenizer_vocab_size: 400)."""
    write_proposal(tmp_path / "reg", 1, {"model.arch.num_attn_layers": 3})
    write_proposal(tmp_path / "reg", 2, {"model.arch.ffn": "swiglu"})
    config = write_config(tmp_path / "config.yaml", corpus, **{"model.arch.dim": 128},
                          registry={"path": "reg", "max_params": 200_000})
    code, _, err = run(capsys, "fit", "--config", config)
    assert code == 2 and err.splitlines()[-1] == (
        "error: the model would have 256,896 parameters, above registry.max_params=200,000; model.arch keys set by "
        "proposals: model.arch.num_attn_layers (proposal 0001), model.arch.ffn (proposal 0002)")
    assert_nothing_started(tmp_path)


def test_fit_sizes_the_model_of_groups_given_as_files(capsys, tmp_path, corpus):
    """Groups in files of their own on the command line: the arch file overrides every
    model.arch key of the proposals, and is sized all the same."""
    write_proposal(tmp_path / "reg", 1, {"model.arch.ffn": "swiglu"})
    (tmp_path / "arch.yaml").write_text("preset: tiny\ndim: 128\nnum_attn_layers: 3\n")
    (tmp_path / "registry.yaml").write_text("path: reg\nmax_params: 200000\n")
    code, err = fit(capsys, tmp_path, corpus, {}, "--model.arch", "arch.yaml", "--registry", "registry.yaml")
    assert code == 2 and err.splitlines()[-1] == (
        "error: the model would have 256,896 parameters, above registry.max_params=200,000; model.arch keys set by "
        "proposals: none")
    assert_nothing_started(tmp_path)


def test_fit_refuses_an_out_of_range_proposal_before_building_anything(capsys, tmp_path, corpus):
    path = write_proposal(tmp_path / "reg", 1, {"model.optim.eps": -1e-8}, kind="training")
    code, err = fit(capsys, tmp_path, corpus, {"path": "reg"})
    assert code == 2 and err.splitlines()[-2:] == [
        "error: 1 problem(s) in the proposal registry reg; nothing is applied:",
        f"reg/{path.name}:{line_of(path, 'model.optim.eps')}: changes.model.optim.eps: model.optim.eps must be > 0, "
        "got -1e-08"]
    assert_nothing_started(tmp_path)


def test_fit_refuses_a_proposal_that_adds_a_source_without_a_url(capsys, tmp_path, corpus):
    """`proposals check` cannot tell a new source from one of the run config; fit can."""
    write_proposal(tmp_path / "reg", 1, {"data.sources.en.weight": 0.5, "data.sources.extra.weight": 2.0}, kind="data")
    code, err = fit(capsys, tmp_path, corpus, {"path": "reg"})
    assert code == 2 and err.splitlines()[-1] == (
        "error: data.sources.extra: proposal 0001 (reg/0001-proposal-1.yaml) sets data.sources.extra.weight, but the "
        "run config has no source 'extra' and the proposals give it no url")
    assert_nothing_started(tmp_path)


# -- class 3: locations ----------------------------------------------------------------------

@pytest.fixture
def places(tmp_path) -> dict[str, Path]:
    """An allowed directory with a text file, a link out of it and a file behind the link, and
    a secret outside it."""
    allowed, outside = tmp_path.resolve() / "allowed", tmp_path.resolve() / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "a.txt").write_text("allowed text\n")
    (outside / "secret.txt").write_text("a secret\n")
    (allowed / "out").symlink_to(outside)
    (allowed / "sub" / "s.txt").symlink_to(outside / "secret.txt")
    return {"allowed": allowed, "outside": outside}


def refused(capsys, tmp_path, allowed: list[str], key: str, value: str) -> str | None:
    """The message `proposals check --allowed-sources ALLOWED` prints for a data proposal
    setting `key` to `value` (at the key's line), or None if it passes."""
    options = ["--allowed-sources", *allowed] if allowed else []
    path, lines = check_one(capsys, tmp_path, "data", {key: value}, *options)
    if lines == ["1 proposal file(s) OK"]:
        return None
    prefix = f"{path}:{line_of(path, key)}: changes.{key}: "
    (line,) = lines
    assert line.startswith(prefix), line
    return line.removeprefix(prefix)


BYPASSES = [  # (value, reason); {A} is the allowed directory, {O} the one outside
    ("/etc/passwd", "is not under an allowed prefix"),
    ("file:///root/.bashrc", "is not under an allowed prefix"),
    ("FILE:///etc/passwd", "is not under an allowed prefix"),
    ("local:///etc/passwd", "is not under an allowed prefix"),
    ("~/.bashrc", "is not under an allowed prefix"),
    ("http://169.254.169.254/latest/meta-data/", "is not under an allowed prefix"),
    ("{O}/secret.txt", "is not under an allowed prefix"),
    ("{A}x/secret.txt", "is not under an allowed prefix"),  # a sibling whose name extends the prefix
    ("{A}/../outside/secret.txt", "has a '..' segment"),
    ("file://{A}/%2e%2e/outside/secret.txt", "has a '..' segment"),
    ("s3://cpm-lightning-data/%252e%252e/other-bucket/x", "has a '..' segment"),  # decoded twice by a server
    ("https://data.example.org/corpora/..;/admin", "has a '..' segment"),
    ("s3://cpm-lightning-data-evil/x.txt", "is not under an allowed prefix"),
    ("s3a://cpm-lightning-data/x.txt", "is not under an allowed prefix"),
    ("https://data.example.org/corpora@evil.example/x", "is not under an allowed prefix"),
    ("https://data.example.org.evil.example/corpora/x", "is not under an allowed prefix"),
    ("https://data.example.org\\@evil.example/corpora/x", "contains a control character or a backslash"),
    ("https://data.example.org/corpora/%0a../x", "contains a control character or a backslash"),
    ("simplecache::file://{O}/secret.txt", "chains filesystems ('::')"),
    ("s3://cpm-lightning-data/x::file:///etc/passwd", "chains filesystems ('::')"),
    ("{A}/out/secret.txt", "is not under an allowed prefix"),  # a link out of the allowed directory
    ("{A}/sub/*.txt", "matches {A}/sub/s.txt, which resolves to {O}/secret.txt, not under an allowed prefix"),
    ("data:text/plain,inline", "is not under an allowed prefix"),
    ("memory://anything", "is not under an allowed prefix"),
]


@pytest.mark.parametrize("key", ["data.sources.leak.url", "data.tokenizer"])
@pytest.mark.parametrize("value, reason", BYPASSES, ids=[b[0] for b in BYPASSES])
def test_a_location_outside_the_allowed_prefixes_is_refused(capsys, tmp_path, places, key, value, reason):
    fill = lambda s: s.replace("{A}", str(places["allowed"])).replace("{O}", str(places["outside"]))  # noqa: E731
    allowed = [f"{places['allowed']}/", "s3://cpm-lightning-data/", "https://data.example.org/corpora/"]
    assert refused(capsys, tmp_path, allowed, key, fill(value)) == (
        f"{fill(value)!r} {fill(reason)}; a proposal may name only locations under registry.allowed_sources "
        f"({', '.join(allowed)})")


@pytest.mark.parametrize("value", ["{A}/a.txt", "file://{A}/a.txt", "allowed/a.txt", "./allowed/*.txt", "{A}//a.txt",
                                   "s3://cpm-lightning-data/english/*.jsonl.gz", "S3://cpm-lightning-data/x.txt",
                                   "https://data.example.org/corpora/en.txt"])
def test_a_location_under_an_allowed_prefix_passes(capsys, tmp_path, places, value):
    value = value.replace("{A}", str(places["allowed"]))  # relative ones: the tests run in tmp_path
    allowed = [f"{places['allowed']}/", "s3://cpm-lightning-data/", "https://data.example.org/corpora/"]
    assert refused(capsys, tmp_path, allowed, "data.sources.en.url", value) is None


def test_check_applies_the_default_prefixes(capsys, tmp_path):
    assert refused(capsys, tmp_path, [], "data.tokenizer", "/etc/passwd") == (
        f"'/etc/passwd' is not under an allowed prefix; a proposal may name only locations under {DEFAULT_PREFIXES}")
    assert refused(capsys, tmp_path, [], "data.sources.en.url", "s3://cpm-lightning-data/en/*.txt") is None


def test_fit_refuses_a_proposal_that_reads_outside_before_reading_anything(capsys, tmp_path, corpus, places):
    secret = places["outside"] / "secret.txt"
    path = write_proposal(tmp_path / "reg", 1, {"data.sources.leak": {"url": str(secret), "weight": 1.0}}, kind="data")
    # The run config's own sources (corpus, outside every prefix) are the operator's: not limited.
    code, err = fit(capsys, tmp_path, corpus, {"path": "reg", "allowed_sources": [f"{places['allowed']}/"]})
    assert code == 2 and err.splitlines()[-1] == (
        f"reg/{path.name}:{line_of(path, 'url')}: changes.data.sources.leak.url: {str(secret)!r} is not under an "
        f"allowed prefix; a proposal may name only locations under registry.allowed_sources ({places['allowed']}/)")
    assert_nothing_started(tmp_path)


# -- class 3: the proposal files themselves --------------------------------------------------

def test_proposal_files_that_are_links_out_or_not_regular_files_are_refused_unread(capsys, tmp_path):
    reg = tmp_path / "reg"
    write_proposal(reg, 1, {"model.arch.ffn": "swiglu"})
    (reg / "0002-pagemap.yaml").symlink_to("/proc/self/pagemap")
    (reg / "0003-passwd.yaml").symlink_to("/etc/passwd")
    (reg / "0004-gone.yaml").symlink_to(tmp_path / "gone.yaml")
    os.mkfifo(reg / "0005-fifo.yaml")  # reading it would block forever
    (reg / "0006-dir.yaml").mkdir()
    (reg / "drafts").mkdir()  # a link inside the registry is read
    write_proposal(reg / "drafts", 7, {"model.arch.norm": "layernorm"}).rename(reg / "drafts" / "seven.txt")
    (reg / "0007-inside.yaml").symlink_to(Path("drafts") / "seven.txt")
    code, lines, err = run(capsys, "proposals", "check", reg)
    outside = "a proposal is a file in the registry"
    assert code == 2 and lines == [
        f"{reg}/0002-pagemap.yaml: file: a symbolic link to /proc/self/pagemap, outside the registry {reg}; {outside}",
        f"{reg}/0003-passwd.yaml: file: a symbolic link to /etc/passwd, outside the registry {reg}; {outside}",
        f"{reg}/0004-gone.yaml: file: a symbolic link to {tmp_path}/gone.yaml, outside the registry {reg}; {outside}",
        f"{reg}/0005-fifo.yaml: file: not a regular file; a proposal is a plain YAML file",
        f"{reg}/0006-dir.yaml: file: not a regular file; a proposal is a plain YAML file",
    ] and err == "5 problem(s) in 7 proposal file(s)\n"
    code, lines, err = run(capsys, "proposals", "check", reg / "0002-pagemap.yaml", reg / "0007-inside.yaml")
    assert code == 2 and lines == [
        f"{reg}/0002-pagemap.yaml: file: a symbolic link to /proc/self/pagemap, outside the registry {reg}; {outside}",
    ] and err == "1 problem(s) in 2 proposal file(s)\n"
