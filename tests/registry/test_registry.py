"""The proposal file format and the checks of `changes` (issue 3: schema, validation, bad input)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from cpm_lightning.registry.keys import ConfigSchema, check_changes
from cpm_lightning.registry.limits import Limits
from cpm_lightning.registry.resolve import load_registry
from cpm_lightning.registry.schema import load_proposal
from cpm_lightning.train.run_config import GROUPS

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "proposals"
SCHEMA = ConfigSchema(GROUPS)

VALID = """\
id: 7
title: Rotary position embeddings
kind: architecture
status: accepted
authors: ["@handle"]
discussion: https://github.com/cpm-lightning/cpm-lightning/discussions/42
created: 2026-11-01
decided: 2026-11-10
effective_from_step: 0
requires: []
conflicts: []
supersedes: []
summary: One paragraph.
motivation: Why.
evidence: [0123456789abcdef0123456789abcdef]
changes:
  model.arch.position: rotary
"""


def write(directory: Path, name: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def problems_of(path: Path) -> list[str]:
    """Every problem of one file, as printed: its own checks, then its changes."""
    proposal, problems = load_proposal(path)
    if proposal is not None and not problems:
        problems = check_changes(proposal, SCHEMA, Limits())
    return [str(p) for p in problems]


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def test_seed_registry_is_valid_and_complete():
    reg = load_registry(SEED, SCHEMA)
    assert reg.problems == []
    statuses = {p.status for p in reg.proposals.values()}
    assert {"accepted", "rejected", "superseded"} <= statuses
    accepted = [p for p in reg.proposals.values() if p.status == "accepted"]
    assert {p.kind for p in accepted} == {"architecture", "training", "data"}
    changed = {k: v for p in accepted for k, v in p.changes.items()}
    assert changed["model.arch.split_qk_scale"] is True  # the CPM-Ant fp16 fix
    assert changed["model.arch.max_len"] == 1024
    assert changed["model.arch.position"] == "rotary" and changed["model.arch.ffn"] == "swiglu"
    assert changed["model.loss.z_loss"] > 0
    assert changed["data.sources.english.url"].endswith(".jsonl.gz")
    for p in reg.proposals.values():
        assert p.discussion.startswith("https://github.com/cpm-lightning/cpm-lightning/discussions/")


def test_valid_proposal_loads_with_lines_and_hash(tmp_path):
    import hashlib

    path = write(tmp_path, "0007-rotary.yaml", VALID)
    proposal, problems = load_proposal(path)
    assert problems == [] and check_changes(proposal, SCHEMA, Limits()) == []
    assert (proposal.id, proposal.kind, proposal.changes) == (7, "architecture", {"model.arch.position": "rotary"})
    assert proposal.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert proposal.line("changes.model.arch.position") == 17 and proposal.line("kind") == 3


def test_nested_changes_are_dotted_keys(tmp_path):
    text = edit(VALID, "  model.arch.position: rotary\n", "  model.arch:\n    position: rotary\n    ffn: swiglu\n")
    proposal, problems = load_proposal(write(tmp_path, "0007-rotary.yaml", text))
    assert problems == []
    assert proposal.changes == {"model.arch.position": "rotary", "model.arch.ffn": "swiglu"}
    assert proposal.line("changes.model.arch.ffn") == 19


BAD_FILES = {
    "malformed": (edit(VALID, "authors: [\"@handle\"]", "authors: [\"@handle\""), ":6: yaml:",
                  "expected ',' or ']'"),
    "python tag": (edit(VALID, "summary: One paragraph.", "summary: !!python/object/apply:os.system [\"true\"]"),
                   ":13: yaml:", "YAML tag !!python/object/apply:os.system is not allowed"),
    "custom tag": (edit(VALID, "summary: One paragraph.", "summary: !include x.yaml"), ":13: yaml:",
                   "YAML tag !include is not allowed"),
    "unknown field": (VALID + "colour: red\n", ":18: colour:", "unknown field; expected: id, title, kind"),
    "unknown field with a control character": (VALID + '"col\\e[2Jour": red\n', ":18: col\\x1b[2Jour:",
                                               "unknown field; expected: id, title, kind"),
    "misspelt field": (edit(VALID, "motivation:", "motivaton:"), ":14: motivaton:",
                       "unknown field (did you mean 'motivation'?)"),
    "missing field": (edit(VALID, "summary: One paragraph.\n", ""), ":1: summary:", "missing (required)"),
    "wrong type": (edit(VALID, "id: 7", 'id: "7"'), ":1: id:", "expected an integer, got '7' (a string)"),
    "bool for int": (edit(VALID, "effective_from_step: 0", "effective_from_step: true"),
                     ":9: effective_from_step:", "expected an integer, got True (a boolean)"),
    "impossible date": (edit(VALID, "created: 2026-11-01", "created: 2026-02-30"), ":7: yaml:",
                        "impossible date '2026-02-30' (day is out of range for month)"),
    "date as text": (edit(VALID, "created: 2026-11-01", "created: November 1st"), ":7: created:",
                     "expected a date (YYYY-MM-DD), got 'November 1st' (a string)"),
    "decided before created": (edit(VALID, "decided: 2026-11-10", "decided: 2026-10-10"), ":8: decided:",
                               "2026-10-10 is before created (2026-11-01)"),
    "accepted undecided": (edit(VALID, "decided: 2026-11-10", "decided: null"), ":4: status:",
                           "accepted proposals need a `decided` date"),
    "unknown status": (edit(VALID, "status: accepted", "status: merged"), ":4: status:",
                       "expected one of: draft, discussion, accepted, rejected, withdrawn, superseded, retired, "
                       "got 'merged'"),
    "unknown kind": (edit(VALID, "kind: architecture", "kind: optimizer"), ":3: kind:",
                     "expected one of: architecture, training, data, got 'optimizer'"),
    "bad handle": (edit(VALID, '["@handle"]', '["handle"]'), ":5: authors.0:",
                   "expected a GitHub handle like '@handle', got 'handle'"),
    "bad url": (edit(VALID, "discussion: https://", "discussion: http://"), ":6: discussion:",
                "expected an https:// URL"),
    "bad evidence": (edit(VALID, "0123456789abcdef0123456789abcdef", "run-1"), ":15: evidence.0:",
                     "expected an MLflow run id (32 hex digits), got 'run-1'"),
    "duplicate key": (VALID + "title: Again\n", ":18: title:", "duplicate key"),
    "alias": (edit(VALID, "requires: []\nconflicts: []", "requires: &ids [1]\nconflicts: *ids"), ":11: conflicts:",
              "YAML aliases (*name) are not allowed"),
    "two documents": (VALID + "---\nid: 8\n", ":18: yaml:", "expected a single document"),
    "not a mapping": ("- id: 7\n", ":1: ", "expected a mapping of proposal fields, got list"),
    "self reference": (edit(VALID, "requires: []", "requires: [7]"), ":10: requires:", "names the proposal itself"),
    "empty accepted": (edit(VALID, "changes:\n  model.arch.position: rotary\n", "changes: {}\n"), ":16: changes:",
                       "empty; an accepted proposal changes at least one key"),
    "dotted and nested": (VALID + "  model.arch:\n    position: rotary\n", ":17: changes.model.arch.position:",
                          "set twice"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_reported_at_its_line(tmp_path, case):
    text, where, message = BAD_FILES[case]
    path = write(tmp_path, "0007-rotary.yaml", text)
    problems = problems_of(path)
    assert any(p.startswith(f"{path}{where}") and message in p for p in problems), problems


@pytest.mark.parametrize("name, message", [
    ("0008-rotary.yaml", "id: 7 disagrees with the file name 0008-rotary.yaml (expected id 8)"),
    ("7-rotary.yaml", "id: file name '7-rotary.yaml' is not NNNN-slug.yaml"),
    ("0007_Rotary.yaml", "id: file name '0007_Rotary.yaml' is not NNNN-slug.yaml"),
])
def test_file_name_must_match_id(tmp_path, name, message):
    path = write(tmp_path, name, VALID)
    assert f"{path}:1: {message}" in problems_of(path)[0]


@pytest.mark.parametrize("content, message", [
    (b"", "file: empty; expected a proposal"),
    (b"# only a comment\n\n", "file: empty; expected a proposal"),
    (VALID.encode().replace(b"One paragraph.", b"caf\xe9"), "file: not UTF-8 (byte 0xe9 at offset"),
    (b"id: " + b"[" * 1200, "yaml: nested too deeply"),
])
def test_empty_non_utf8_and_deep_files(tmp_path, content, message):
    path = write(tmp_path, "0007-rotary.yaml", content)
    (problem,) = problems_of(path)
    assert problem.startswith(str(path)) and message in problem
    if b"\xe9" in content:
        assert problem.startswith(f"{path}:13: ")


def test_ten_megabyte_file_is_refused_unread(tmp_path):
    path = tmp_path / "0007-rotary.yaml"
    with path.open("wb") as f:
        f.truncate(10 << 20)  # sparse: the size is what matters, it is never read
    assert problems_of(path) == [f"{path}: file: {10 << 20} bytes; a proposal is at most 1048576 bytes"]


def test_directory_without_proposals(tmp_path):
    write(tmp_path / "reg", "README.md", "# nothing here\n")
    reg = load_registry(tmp_path / "reg", SCHEMA)
    assert [str(p) for p in reg.problems] == [
        f"{tmp_path / 'reg'}: registry: no proposals; expected NNNN-slug.yaml files (see TEMPLATE.yaml)"]
    missing = load_registry(tmp_path / "nowhere", SCHEMA)
    assert "no such directory; set registry.path" in str(missing.problems[0])


BAD_CHANGES = [
    ("architecture", "model.optim.lr: 0.1", "changes.model.optim.lr:",
     "outside the scope of a architecture proposal (model.arch.*)"),
    ("training", "model.arch.dim: 64", "changes.model.arch.dim:",
     "outside the scope of a training proposal (model.optim.*, model.schedule.*, model.loss.*)"),
    ("data", "model.loss.z_loss: 0.1", "changes.model.loss.z_loss:", "outside the scope of a data proposal (data.*, model.arch.num_tasks)"),
    ("architecture", "model.arch.postion: rotary", "changes.model.arch.postion:",
     "unknown config key 'model.arch.postion' (did you mean 'model.arch.position'?)"),
    ("training", "model.optim.learning_rate: 0.1", "changes.model.optim.learning_rate:",
     "unknown config key 'model.optim.learning_rate'"),
    ("data", "data.source.en.url: x.txt", "changes.data.source.en.url:",
     "unknown config key 'data.source.en.url' (did you mean 'data.sources'?)"),
    ("data", "data.sources.en.path: x.txt", "changes.data.sources.en.path:",
     "unknown config key 'data.sources.en.path'"),
    ("architecture", "model.arch.ffn: swish", "changes.model.arch.ffn:",
     "unknown model.arch.ffn 'swish'; expected one of: gated_gelu, swiglu"),
    ("architecture", "model.arch.norm: batchnorm", "changes.model.arch.norm:",
     "expected one of: layernorm, rmsnorm"),
    ("architecture", "model.arch.preset: huge", "changes.model.arch.preset:", "unknown model.arch.preset 'huge'"),
    ("architecture", "model.arch.dim: '64'", "changes.model.arch.dim:",
     "expected an integer or null, got '64' (a string)"),
    ("architecture", "model.arch.split_qk_scale: 1", "changes.model.arch.split_qk_scale:",
     "expected true or false, got 1 (an integer)"),
    ("training", "model.loss.z_loss: 1e-4", "changes.model.loss.z_loss:",
     "expected a number, got '1e-4' (a string; YAML 1.1 reads an exponent without a dot as a string"),
    ("training", "model.optim.betas: [0.9]", "changes.model.optim.betas:", "expected a list of 2 numbers"),
    ("training", "model.schedule.name: linear", "changes.model.schedule.name:", "expected one of: noam, cosine"),
    ("data", "data.sources.en.format: csv", "changes.data.sources.en.format:",
     "expected one of: text, jsonl, python_docstrings"),
    ("data", "data.sources.en.weight: heavy", "changes.data.sources.en.weight:", "expected a number"),
    ("architecture", "model.arch: 5", "changes.model.arch:", "model.arch is a group, not a value; set its keys"),
    ("data", "data.sources.en: x.txt", "changes.data.sources.en:", "data.sources.en is a group, not a value"),
    ("architecture", "model.arch.dim.width: 5", "changes.model.arch.dim.width:", "model.arch.dim has no field 'width'"),
    ("data", "data.sources.'bad name'.url: x", "changes.data.sources.'bad name'.url:", "not a valid entry name"),
    ("architecture", "trainer.max_steps: 10", "changes.trainer.max_steps:", "trainer.* is the operator's"),
    ("architecture", "model.class_path: os.system", "changes.model.class_path:",
     "class_path names a Python class"),
    ("data", "data.init_args.x: 1", "changes.data.init_args.x:", "init_args names a Python class"),
    ("data", "data.cache_dir: /tmp/x", "changes.data.cache_dir:", "where a run caches its shards is the operator's"),
    ("data", "data.tokenizer: os.path", "changes.data.tokenizer:",
     "'os.path' names Python code (module 'os'); a proposal is data"),
    ("architecture", "model.arch.num_kv_heads: 3", "changes:",
     "model.arch.num_kv_heads (3) must divide num_heads (4) (checked on the default preset, tiny)"),
    ("architecture", "model.arch.dim: -8", "changes.model.arch.dim:", "model.arch.dim must be >= 1, got -8"),
]


@pytest.mark.parametrize("kind, change, where, message", BAD_CHANGES, ids=[c[1] for c in BAD_CHANGES])
def test_bad_change_is_reported_with_its_key(tmp_path, kind, change, where, message):
    text = edit(VALID, "kind: architecture", f"kind: {kind}")
    text = edit(text, "  model.arch.position: rotary\n", f"  {change}\n")
    path = write(tmp_path, "0007-rotary.yaml", text)
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:") and f": {where} " in problems[0] + " "
    assert message in problems[0], problems[0]


@pytest.mark.parametrize("kind, changes", [
    ("data", {"data.sources.english": {"url": "s3://cpm-lightning-data/en/*.jsonl.gz", "weight": 0.3,
                                       "format": "jsonl"}}),
    ("data", {"data.seq_len": 64, "data.tokenizer": "s3://cpm-lightning-data/spm.model"}),
    ("training", {"model.optim.betas": [0.9, 0.99], "model.optim.lr": 1, "model.schedule.total_steps": None}),
    ("architecture", {"model.arch.num_kv_heads": 2, "model.arch.norm": "layernorm", "model.arch.rope_base": 5.0e+5}),
])
def test_valid_changes(tmp_path, kind, changes):
    text = edit(VALID, "kind: architecture", f"kind: {kind}")
    text = text[: text.index("changes:")] + yaml.safe_dump({"changes": changes})
    assert problems_of(write(tmp_path, "0007-rotary.yaml", text)) == []


# Every place a value can go: each field, a change value, a nested change value, a list item.
PLACES = ["title", "kind", "status", "authors", "discussion", "created", "decided", "summary", "motivation",
          "evidence", "requires", "effective_from_step", "changes.model.arch.ffn", "changes.model.arch",
          "changes.data.tokenizer"]
PAYLOADS = ["os.system", "os:system", "!!python/name:os.system", "!!python/object/apply:os.system [\"exit 3\"]",
            "!!python/object/new:os.system [\"exit 3\"]", "!!python/module:os", "{class_path: os.system}",
            "{class_path: os.system, init_args: {command: exit 3}}", "[os.system]"]


def _with_payload(place: str, payload: str) -> str:
    if place.startswith("changes."):
        text = VALID if place.startswith("changes.model.arch") else edit(VALID, "kind: architecture", "kind: data")
        return text[: text.index("changes:")] + f"changes:\n  {place.removeprefix('changes.')}: {payload}\n"
    text, n = re.subn(rf"^{place}:.*$", f"{place}: {payload}", VALID, flags=re.M)
    assert n == 1
    return text


@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_proposal_content_runs_or_imports_code(tmp_path, monkeypatch, payload):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    for i, place in enumerate(PLACES):
        path = write(tmp_path / str(i), "0007-rotary.yaml", _with_payload(place, payload))
        reg = load_registry(path.parent, SCHEMA)
        assert reg.problems and reg.proposals == {}, (place, payload)
        assert all(str(p).startswith(str(path)) for p in reg.problems)
    assert calls == []
