"""Proposals checked against each other, resolution at a step, provenance, and the commands."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
import yaml
from conftest import write_proposal

from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.apply import AppliedRegistry, override_keys
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.resolve import in_effect, load_registry, resolve
from cpm_lightning.registry.run_args import read_run_args
from cpm_lightning.train.run_config import GROUPS

REPO = Path(__file__).resolve().parents[2]
SCHEMA = ConfigSchema(GROUPS)


def problems(directory: Path) -> list[str]:
    return [str(p) for p in load_registry(directory, SCHEMA).problems]


FFN = {"model.arch.ffn": "swiglu"}


def test_two_accepted_proposals_setting_one_key_name_both_files(tmp_path):
    a = write_proposal(tmp_path, 1, FFN)
    b = write_proposal(tmp_path, 2, {"model.arch.ffn": "gated_gelu", "model.arch.max_len": 1024})
    assert problems(tmp_path) == [
        f"{b}:12: changes.model.arch.ffn: also set by accepted proposal 1 ({a}:12) and neither supersedes "
        "the other; add `supersedes: [1]` or drop the key"]


def test_superseding_proposal_wins_whatever_the_order(tmp_path):
    write_proposal(tmp_path, 1, FFN, effective_from_step=100, supersedes=[2])
    write_proposal(tmp_path, 2, {"model.arch.ffn": "gated_gelu", "model.arch.max_len": 1024})
    reg = load_registry(tmp_path, SCHEMA)
    assert reg.problems == []
    early = resolve(reg, at_step=0)
    assert early.values == {"model.arch.ffn": "gated_gelu", "model.arch.max_len": 1024}
    late = resolve(reg, at_step=100)
    assert [p.id for p in late.applied] == [2, 1]  # by (effective_from_step, id)
    assert late.values["model.arch.ffn"] == "swiglu" and late.provenance["model.arch.ffn"].id == 1
    assert late.provenance["model.arch.max_len"].id == 2


def test_supersedes_is_transitive(tmp_path):
    write_proposal(tmp_path, 1, FFN)
    write_proposal(tmp_path, 2, FFN, supersedes=[1])
    write_proposal(tmp_path, 3, FFN, supersedes=[2])
    reg = load_registry(tmp_path, SCHEMA)
    assert reg.problems == [] and resolve(reg).provenance["model.arch.ffn"].id == 3


def test_requires_must_be_accepted(tmp_path):
    write_proposal(tmp_path, 1, FFN, status="discussion", decided=None)
    b = write_proposal(tmp_path, 2, {"model.arch.max_len": 1024}, requires=[1])
    a = tmp_path / "0001-proposal-1.yaml"
    assert problems(tmp_path) == [f"{b}:11: requires: proposal 1 ({a}) is discussion, not accepted"]


def test_conflicting_proposals_accepted_together(tmp_path):
    a = write_proposal(tmp_path, 1, FFN, conflicts=[2])
    b = write_proposal(tmp_path, 2, {"model.arch.max_len": 1024}, conflicts=[1])
    assert problems(tmp_path) == [f"{a}:11: conflicts: proposal 2 ({b}) is accepted too"]


def test_a_problem_between_proposals_names_both_and_one_in_a_file_its_own(tmp_path):
    """What `live` leaves out: both sides of a conflict or of a key set twice, a broken file's own."""
    write_proposal(tmp_path / "a", 1, FFN, conflicts=[2])
    write_proposal(tmp_path / "a", 2, {"model.arch.max_len": 1024})
    write_proposal(tmp_path / "a", 4, {"model.arch.nope": 1})
    assert sorted(sorted(p.ids) for p in load_registry(tmp_path / "a", SCHEMA).problems) == [[1, 2], [4]]
    write_proposal(tmp_path / "b", 2, {"model.arch.max_len": 1024})
    write_proposal(tmp_path / "b", 3, {"model.arch.max_len": 512})
    assert [p.ids for p in load_registry(tmp_path / "b", SCHEMA).problems] == [{2, 3}]
    (tmp_path / "b" / "notes.yaml").write_text("id: 5\n")  # a problem of no proposal's file
    notes = [p.ids for p in load_registry(tmp_path / "b", SCHEMA).problems if "notes" in p.path]
    assert notes and not any(notes)


@pytest.mark.parametrize("relation", ["requires", "supersedes"])
def test_cycles(tmp_path, relation):
    a = write_proposal(tmp_path, 1, FFN, status="draft", **{relation: [3]})
    b = write_proposal(tmp_path, 2, {"model.arch.max_len": 1024}, status="draft", **{relation: [1]})
    c = write_proposal(tmp_path, 3, {"model.arch.dim": 32}, status="draft", **{relation: [2]})
    found = problems(tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{a}:11: {relation}: cycle 0001 -> 0003 -> 0002 -> 0001")
    assert str(b) in found[0] and str(c) in found[0]


def test_duplicate_ids(tmp_path):
    a = write_proposal(tmp_path, 5, FFN)
    b = a.with_name("0005-another-slug.yaml")
    b.write_text(a.read_text())
    assert problems(tmp_path) == [f"{a}:1: id: 5 is also the id of {b}"]  # files are read in name order


def test_references_to_missing_and_superseded_without_successor(tmp_path):
    a = write_proposal(tmp_path, 1, FFN, requires=[42])
    assert problems(tmp_path) == [f"{a}:11: requires: no proposal 42 in the registry"]
    a.unlink()
    b = write_proposal(tmp_path, 2, FFN, status="superseded")
    assert problems(tmp_path) == [f"{b}:4: status: superseded, but no proposal lists it in `supersedes`"]


def test_resolution_filters_kinds_exclude_and_steps(tmp_path):
    write_proposal(tmp_path, 1, FFN)
    write_proposal(tmp_path, 2, {"model.loss.z_loss": 1.0e-4}, kind="training")
    write_proposal(tmp_path, 3, {"data.sources.en.url": "s3://cpm-lightning-data/en.txt"}, kind="data")
    write_proposal(tmp_path, 4, {"model.arch.max_len": 1024}, effective_from_step=500)
    write_proposal(tmp_path, 5, {"model.arch.dim": 32}, status="rejected")
    reg = load_registry(tmp_path, SCHEMA)
    assert resolve(reg).ids == "0001,0002,0003"
    assert resolve(reg, at_step=500).ids == "0001,0002,0003,0004"
    assert resolve(reg, kinds=["architecture", "training"], exclude=[2]).ids == "0001"
    with pytest.raises(UserError, match="registry.exclude: no proposal 9 in"):
        resolve(reg, exclude=[9])


def test_required_proposal_left_out_is_an_error_naming_both(tmp_path):
    a = write_proposal(tmp_path, 1, {"data.sources.en.url": "s3://cpm-lightning-data/en.txt"}, kind="data")
    b = write_proposal(tmp_path, 2, FFN, requires=[1])
    reg = load_registry(tmp_path, SCHEMA)
    with pytest.raises(UserError) as e:
        resolve(reg, kinds=["architecture"])
    assert str(e.value).splitlines()[1] == (f"{b}:11: requires: proposal 1 ({a}) is not applied: a data proposal, "
                                            "left out by registry.kinds")


def test_in_effect_from_since_or_the_step_and_not_before_what_is_required(tmp_path):
    """The one answer of `fit` and `live`: a proposal takes effect at the step it took effect
    at in this run (`since`), else at its effective_from_step, and not before those it requires;
    the next change is the first step after that a proposal takes effect at."""
    write_proposal(tmp_path, 1, FFN, effective_from_step=10)
    write_proposal(tmp_path, 2, {"model.loss.z_loss": 1.0e-4}, kind="training", effective_from_step=2, requires=[1])
    write_proposal(tmp_path, 3, {"model.arch.max_len": 1024}, effective_from_step=4)
    proposals = load_registry(tmp_path, SCHEMA).proposals
    early = in_effect(proposals, 5)
    assert (early.ids, early.next_change, dict(early.due)) == ([3], 10, {1: 10, 2: 10, 3: 4})
    # 0003 was read at step 12, long after its step: it took effect at the boundary 14.
    late = in_effect(proposals, 12, since={3: 14})
    assert (late.ids, late.next_change) == ([1, 2], 14)
    assert (in_effect(proposals, 14, since={3: 14}).ids, in_effect(proposals, 14).next_change) == ([1, 2, 3], None)
    # Without the proposal it requires (left out), 0002 never takes effect.
    alone = in_effect({i: p for i, p in proposals.items() if i != 1}, 100)
    assert (alone.ids, alone.next_change, dict(alone.due)) == ([3], None, {3: 4})


def test_resolution_waits_for_a_required_proposal_s_step(tmp_path):
    write_proposal(tmp_path, 1, FFN, effective_from_step=10)
    write_proposal(tmp_path, 2, {"model.loss.z_loss": 1.0e-4}, kind="training", requires=[1])
    reg = load_registry(tmp_path, SCHEMA)
    assert (resolve(reg, at_step=5).ids, resolve(reg, at_step=10).ids) == ("", "0002,0001")  # by (effective_from_step, id)


def test_registry_with_problems_applies_nothing(tmp_path):
    write_proposal(tmp_path, 1, FFN)
    (tmp_path / "0002-broken.yaml").write_text("id: [2\n")
    with pytest.raises(UserError) as e:
        resolve(load_registry(tmp_path, SCHEMA))
    first, *rest = str(e.value).splitlines()
    assert first.startswith("1 problem(s) in the proposal registry") and "nothing is applied" in first
    assert rest == [f"{tmp_path / '0002-broken.yaml'}:2: yaml: while parsing a flow sequence expected ',' or ']', "
                    "but got '<stream end>'"]


def test_lock_and_comments(tmp_path):
    import hashlib

    paths = [write_proposal(tmp_path, 1, FFN), write_proposal(tmp_path, 2, {"model.arch.max_len": 1024})]
    applied = AppliedRegistry(resolve(load_registry(tmp_path, SCHEMA)), divergences={"model.arch.max_len": 512})
    lock = json.loads(applied.resolution.lock())
    assert lock == {f"{i + 1:04d}": {"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                    for i, p in enumerate(paths)}
    text = applied.annotate("model:\n  arch:\n    ffn: swiglu\n    max_len: 512\n    dim: 64\n")
    assert text.splitlines() == ["model:", "  arch:", "    ffn: swiglu  # from proposal 0001",
                                 "    max_len: 512  # command line; diverges from proposal 0002 (1024)", "    dim: 64"]
    assert applied.overrides_tag() == "model.arch.max_len=512 (proposal 0002: 1024)"


@pytest.mark.parametrize("argv, keys", [
    (["fit", "--config", "c.yaml", "--model.arch.max_len", "512", "--trainer.max_steps=2"], {"model.arch.max_len"}),
    (["fit", "--model.arch.ffn=gated_gelu", "--data.sources.en.url", "x.txt"],
     {"model.arch.ffn", "data.sources.en.url"}),
    (["fit", "--model.arch", "{dim: 32, ffn: swiglu}"], {"model.arch.dim", "model.arch.ffn"}),
    (["fit", "--model.optim.betas=[0.9, 0.99]", "-c", "c.yaml"], {"model.optim.betas"}),
    (["fit", "--config=c.yaml"], set()),
])
def test_command_line_override_keys(argv, keys, tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  arch:\n    dim: 64\n")
    assert override_keys(read_run_args(argv[1:]).cli_keys) == keys


# -- the commands ---------------------------------------------------------------------------------

def run(capsys, *argv) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_passes_on_the_seed_registry(capsys):
    code, out, _ = run(capsys, "proposals", "check", str(REPO / "proposals"))
    assert (code, out) == (0, "9 proposal file(s) and 2 prompt book and applications file(s) OK\n")


def test_check_lists_every_problem_and_exits_2(tmp_path, capsys):
    good = write_proposal(tmp_path, 1, FFN)
    bad = write_proposal(tmp_path, 2, {"model.arch.postion": "rotary", "trainer.max_steps": 5})
    code, out, err = run(capsys, "proposals", "check", str(tmp_path))
    first, second = out.splitlines()
    assert code == 2 and first.startswith(
        f"{bad}:12: changes.model.arch.postion: unknown config key 'model.arch.postion' (did you mean "
        "'model.arch.position'?); model.arch has: preset, vocab_size, dim,")
    assert second == (f"{bad}:13: changes.trainer.max_steps: trainer.* is the operator's (devices, precision, "
                      "steps); a proposal sets model.* or data.* keys")
    assert "2 problem(s) in 2 proposal file(s)" in err
    code, out, _ = run(capsys, "proposals", "check", str(good))
    assert (code, out) == (0, "1 proposal file(s) OK\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    code, out, _ = run(capsys, "proposals", "check", str(tmp_path / "notes.md"), str(tmp_path / "missing"))
    assert code == 2 and out.splitlines() == [
        f"{tmp_path / 'notes.md'}: file: not a proposal; expected NNNN-slug.yaml (not TEMPLATE.yaml)",
        f"{tmp_path / 'missing'}: path: no such file or directory"]


def test_new_writes_a_draft_at_the_next_free_id_that_passes_check(tmp_path, capsys):
    reg = tmp_path / "reg"
    (reg).mkdir()
    (reg / "TEMPLATE.yaml").write_text((REPO / "proposals" / "TEMPLATE.yaml").read_text())
    write_proposal(reg, 3, FFN)
    code, out, _ = run(capsys, "proposals", "new", "--title", "Use: \"QK-norm\" in attention", "--kind",
                       "architecture", "--dir", str(reg))
    path = Path(out.strip())
    assert code == 0 and path == reg / "0004-use-qk-norm-in-attention.yaml"
    data = yaml.safe_load(path.read_text())
    assert (data["id"], data["title"], data["kind"], data["status"]) == (
        4, 'Use: "QK-norm" in attention', "architecture", "draft")
    assert data["created"] == date.today()
    assert run(capsys, "proposals", "check", str(reg))[:2] == (0, "2 proposal file(s) OK\n")


def test_list_and_show(tmp_path, capsys):
    write_proposal(tmp_path, 1, FFN)
    write_proposal(tmp_path, 2, {"model.loss.z_loss": 0.001}, kind="training", status="rejected")
    code, out, _ = run(capsys, "proposals", "list", "--dir", str(tmp_path))
    assert [line.split()[:3] for line in out.splitlines()] == [["0001", "accepted", "architecture"],
                                                               ["0002", "rejected", "training"]]
    out = run(capsys, "proposals", "list", "--status", "rejected", "--dir", str(tmp_path))[1]
    assert out.split()[0] == "0002"
    assert run(capsys, "proposals", "list", "--kind", "data", "--dir", str(tmp_path))[1] == ""
    out = run(capsys, "proposals", "show", "2", "--dir", str(tmp_path))[1]
    assert out.splitlines()[0].startswith(f"# {tmp_path / '0002-proposal-2.yaml'}  sha256 ")
    assert "title: Proposal 2" in out
    code, _, err = run(capsys, "proposals", "show", "7", "--dir", str(tmp_path))
    assert code == 2 and f"error: no proposal 7 in {tmp_path}" in err


def test_resolve_prints_the_config_with_provenance(tmp_path, capsys):
    reg = tmp_path / "reg"
    write_proposal(reg, 1, FFN)
    write_proposal(reg, 2, {"model.loss.z_loss": 0.001}, kind="training", effective_from_step=10)
    write_proposal(reg, 3, {"data.sources.en.weight": 0.5}, kind="data")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"arch": {"preset": "tiny", "ffn": "gated_gelu"}},
                                      "data": {"sources": {"en": {"url": "en.txt"}}},
                                      "registry": {"path": str(reg), "kinds": ["architecture", "training"]}}))
    code, out, _ = run(capsys, "proposals", "resolve", "--config", str(config), "--at-step", "10")
    assert code == 0
    assert "    ffn: swiglu  # from proposal 0001" in out.splitlines()
    assert "    z_loss: 0.001  # from proposal 0002" in out.splitlines()
    assert "weight" not in out  # data proposals are left out by registry.kinds
    resolved = yaml.safe_load(out)
    assert resolved["model"]["arch"] == {"preset": "tiny", "ffn": "swiglu"}
    out = run(capsys, "proposals", "resolve", "--config", str(config))[1]
    assert "z_loss" not in out  # effective from step 10 only
    config.write_text(yaml.safe_dump({"registry": {"path": str(reg), "kind": ["data"]}}))
    code, _, err = run(capsys, "proposals", "resolve", "--config", str(config))
    assert code == 2 and "registry.kind: unknown key; expected: allowed_sources, max_params, path, kinds, exclude, at_step" in err


def test_check_reports_file_problems_and_cross_problems_at_once(tmp_path):
    a = write_proposal(tmp_path, 1, FFN)
    b = write_proposal(tmp_path, 2, FFN, requires=[3])  # collides with 1; 3 is broken, not missing
    (tmp_path / "0003-broken.yaml").write_text("id: 3\ntitle: [\n")
    found = problems(tmp_path)
    assert len(found) == 2 and found[0].startswith(f"{tmp_path / '0003-broken.yaml'}:3: yaml: ")
    assert found[1].startswith(f"{b}:14: changes.model.arch.ffn: also set by accepted proposal 1 ({a}:12)")
