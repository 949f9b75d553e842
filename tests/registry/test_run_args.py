"""The one reader of a run's config (registry/run_args.py): every spelling of fit's command line,
LightningCLI's merge order, and the strict loader's refusals as one line."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest
from conftest import cli_error

from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.run_args import FIT_GROUPS, REPLACED, read_run_args, read_run_config
from cpm_lightning.train.run_config import GROUPS

A = "data:\n  sources:\n    a: {url: a.txt}\n  seq_len: 64\ntrainer:\n  max_steps: 5\n  val_check_interval: 5\n"
B = "data:\n  sources:\n    b: {url: b.txt}\ntrainer:\n  max_steps: 8\n"


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "a.yaml").write_text(A)
    (tmp_path / "b.yaml").write_text(B)
    (tmp_path / "t.yaml").write_text("max_steps: 2\n")
    (tmp_path / "arch.yaml").write_text("dim: 48\nffn: swiglu\n")
    return tmp_path


def config(*argv: str) -> dict:
    return read_run_args(list(argv)).config


def error(*argv: str) -> str:
    with pytest.raises(UserError) as e:
        read_run_args(list(argv))
    return str(e.value)


@pytest.mark.parametrize("argv", [["--config", "a.yaml"], ["-c", "a.yaml"], ["--config=a.yaml"]])
def test_the_spellings_of_a_config_file(files, argv):
    assert config(*argv) == read_run_config(Path("a.yaml"))


def test_a_config_file_of_any_suffix_and_an_inline_config(files):
    (files / "run.conf").write_text(A)
    assert config("--config=run.conf") == config("--config", "a.yaml")
    assert config("--config", "{trainer: {max_steps: 3}}") == {"trainer": {"max_steps": 3}}


def test_later_files_and_options_win_key_by_key(files):
    # As LightningCLI merges them (checked there with --print_config): a group merges key by
    # key, data.sources is a value, replaced whole.
    assert config("--config", "a.yaml", "--config", "b.yaml") == {
        "data": {"sources": {"b": {"url": "b.txt"}}, "seq_len": 64}, "trainer": {"max_steps": 8, "val_check_interval": 5}}
    assert config("-c", "a.yaml", "--model.arch.dim", "40", "-c", "b.yaml")["model"] == {"arch": {"dim": 40}}
    assert config("-c", "a.yaml", "--trainer.max_steps=7", "-c", "b.yaml")["trainer"]["max_steps"] == 8
    assert config("-c", "a.yaml", "--data.sources", "{d: {url: w}}")["data"] == {"sources": {"d": {"url": "w"}},
                                                                               "seq_len": 64}
    assert config("-c", "a.yaml", "--data.sources.a.weight=2")["data"]["sources"] == {"a": {"url": "a.txt", "weight": 2}}


@pytest.mark.parametrize("argv, max_steps", [
    (["--trainer", "t.yaml"], 2), (["--trainer=t.yaml"], 2),
    (["--trainer=t.yaml", "--trainer.max_steps=7"], 7), (["--trainer.max_steps=7", "--trainer=t.yaml"], 2),
    (["--trainer", "{max_steps: 9}"], 9),
])
def test_a_group_file_or_mapping_is_that_groups_value(files, argv, max_steps):
    assert config("--config", "a.yaml", *argv)["trainer"] == {"max_steps": max_steps, "val_check_interval": 5}


def test_values_are_yaml_and_text_that_is_not_is_a_string(files):
    assert config("--trainer.logger=false", "--registry.exclude", "[3]", "--tracking.experiment=@me",
                  "--trainer.gradient_clip_val", "-1", "--seed_everything", "7") == {
        "trainer": {"logger": False, "gradient_clip_val": -1}, "registry": {"exclude": [3]},
        "tracking": {"experiment": "@me"}, "seed_everything": 7}


def test_an_option_without_a_value_is_a_flag(files):
    run = read_run_args(["--print_config", "-c", "a.yaml", "--help"])
    assert run.config == read_run_config(Path("a.yaml")) and run.cli_keys == {"print_config", "help"}


@pytest.mark.parametrize("argv, keys", [
    (["--config", "a.yaml", "--config=b.yaml", "--config", "{model: {arch: {dim: 8}}}"], set()),
    (["--model.arch.max_len", "512", "--trainer.max_steps=2"], {"model.arch.max_len", "trainer.max_steps"}),
    (["--model.arch", "{dim: 32, ffn: swiglu}"], {"model.arch.dim", "model.arch.ffn"}),
    (["--model.arch=arch.yaml"], {"model.arch"}),
    (["--model.arch", "{}"], {"model.arch"}),
    (["--trainer", "t.yaml", "--ckpt_path", "last"], {"trainer", "ckpt_path"}),
])
def test_the_keys_the_command_line_sets(files, argv, keys):
    assert read_run_args(argv).cli_keys == keys


@pytest.mark.parametrize("content, argv, expected", [
    ("trainer:\n  max_steps: &n 3\n  val_check_interval: *n\n", ["--config", "c.yaml"],
     "c.yaml:3: trainer.val_check_interval: YAML aliases (*name) are not allowed"),
    ("max_steps: &n 3\nval_check_interval: *n\n", ["--trainer=c.yaml"],
     "c.yaml:2: val_check_interval: YAML aliases (*name) are not allowed"),
    ("trainer: {max_steps: 1}\ntrainer: {max_steps: 2}\n", ["--config=c.yaml"], "c.yaml:2: trainer: duplicate key"),
    ("model:\n  arch: {preset: tiny\n", ["--config", "c.yaml"],
     "c.yaml:3:1: not valid YAML: while parsing a flow mapping expected ',' or '}', but got '<stream end>'"),
    ("trainer: !!python/name:os.system\n", ["--config", "c.yaml"],
     "c.yaml:1:10: not valid YAML: YAML tag !!python/name:os.system is not allowed: a run config is plain data "
     "(strings, numbers, lists, mappings, dates)"),
    ("", ["--config", "c.yaml"], "c.yaml: empty; expected a run config: a mapping of config groups (trainer, model, "
                                 "data, ...)"),
    ("- trainer\n", ["--trainer", "c.yaml"], "c.yaml: expected a run config: a mapping of config groups (trainer, "
                                             "model, data, ...), got list"),
])
def test_a_file_is_read_strictly(tmp_path, content, argv, expected):
    (tmp_path / "c.yaml").write_text(content)
    assert error(*argv) == expected


@pytest.mark.parametrize("argv, expected", [
    (["--config", "{trainer: {a: &n 1, b: *n}}"], "--config:1: trainer.b: YAML aliases (*name) are not allowed"),
    (["--config", "{trainer: {}, trainer: {}}"], "--config:1: trainer: duplicate key"),
    (["--model.arch", "{dim: &d 32, n_heads: *d}"], "--model.arch:1: n_heads: YAML aliases (*name) are not allowed"),
    (["--config", "nope.yaml"], "nope.yaml: cannot read the run config: No such file or directory"),
    (["--trainer=nope.yml"], "nope.yml: cannot read the run config: No such file or directory"),
    (["--config"], "--config: expected a run config file or an inline config (a YAML mapping)"),
    (["-c", "--trainer.max_steps=2"], "-c: expected a run config file or an inline config (a YAML mapping)"),
    (["fit"], "unexpected argument 'fit'; expected --config FILE and --key value options"),
])
def test_the_command_line_is_read_strictly(tmp_path, argv, expected):
    assert error(*argv) == expected


def test_fit_refuses_with_the_readers_line(tmp_path, capsys):
    # Before Lightning is imported; validate and test read the same.
    (tmp_path / "c.yaml").write_text("trainer: {max_steps: 2}\n")
    assert cli_error(capsys, "fit", "-c", "c.yaml", "--trainer", "{a: &n 1, b: *n}") == \
        "--trainer:1: b: YAML aliases (*name) are not allowed"
    assert cli_error(capsys, "validate", "--config=nope.yaml") == \
        "nope.yaml: cannot read the run config: No such file or directory"


def test_a_group_file_of_any_name_is_read_strictly(files):
    # jsonargparse reads any existing file given to a group, whatever its name; so does the reader.
    (files / "t.txt").write_text("max_steps: 2\n")
    (files / "twice.conf").write_text("max_steps: 1\nmax_steps: 2\n")
    assert config("--config", "a.yaml", "--trainer", "t.txt") == config("--config", "a.yaml", "--trainer", "t.yaml")
    assert error("--trainer=twice.conf") == "twice.conf:2: max_steps: duplicate key"
    assert read_run_args(["--trainer", "t.txt"]).cli_keys == {"trainer"}


def test_a_file_given_to_a_key_that_is_not_a_group_is_its_value(files):
    (files / "tok.model").write_bytes(b"\x00\x01 not yaml")
    (files / "step-5.ckpt").write_bytes(b"PK")
    assert config("--data.tokenizer", "tok.model", "--ckpt_path=step-5.ckpt") == {
        "data": {"tokenizer": "tok.model"}, "ckpt_path": "step-5.ckpt"}


def test_the_groups_are_fits():
    from cpm_lightning.cli.fit import CPMCLI

    class Parser:  # records the groups CPMCLI adds to LightningCLI's trainer, model and data
        def __init__(self):
            self.groups = ["trainer", "model", "data"]

        def add_class_arguments(self, cls, name):
            self.groups.append(name)

        def link_arguments(self, *args, **kwargs):
            pass

        _actions = [types.SimpleNamespace(dest="trainer.precision")]  # widened to take auto

        def set_defaults(self, defaults):
            pass

    parser = Parser()
    CPMCLI.add_arguments_to_parser(None, parser)
    assert sorted(parser.groups) == sorted(FIT_GROUPS)


def test_replaced_names_every_mapping_valued_field():
    def mappings(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from mappings(hint, f"{prefix}.{f.name}")
            elif typing.get_origin(hint) is dict:
                yield f"{prefix}.{f.name}"

    assert sorted(k for name, cls in GROUPS.items() for k in mappings(cls, name)) == sorted(REPLACED)
