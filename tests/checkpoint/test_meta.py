"""checkpoint["cpm"] (CPMMeta): its round trip, checkpoints written before its version field, and
the one-line errors for a newer version, a value of the wrong type and an unknown key."""

from __future__ import annotations

import pytest
import torch

from cpm_lightning.checkpoint.files import seal_zip
from cpm_lightning.checkpoint.meta import VERSION, CPMMeta, write
from cpm_lightning.checkpoint.store import read_meta
from cpm_lightning.core.errors import UserError
from cpm_lightning.model import ArchConfig

ARCH = ArchConfig(preset="tiny", vocab_size=300).to_dict()
# The keys as the five hooks wrote them before CPMMeta (no `version`).
BEFORE_VERSION = {"rng": [{"python": (3, (1, 2), None)}], "tokenizer": b"model", "proposals": "1,2",
                  "mlflow_run_id": "a" * 32, "live": {"losses": [2.5], "nonfinite": 0, "data": "{}"},
                  "changes": [{"step": 4}], "arch": ARCH, "tokens_seen": 512, "skipped_steps": 1,
                  "migrations": [{"name": "grow_ff_dim", "step": 4}]}


def test_a_section_round_trips():
    meta = CPMMeta(arch=ARCH, tokens_seen=7, tokenizer=b"x", live={"losses": [1.0]})
    assert CPMMeta.from_dict(meta.to_dict(), "c") == meta
    assert meta.to_dict()["version"] == VERSION
    assert "proposals" not in meta.to_dict()  # unset, as before the version field


def test_a_checkpoint_written_before_the_version_field_is_version_1():
    meta = CPMMeta.from_dict(BEFORE_VERSION, "old.ckpt")
    assert meta.version == 1
    assert meta.to_dict() == {**BEFORE_VERSION, "version": 1}
    assert CPMMeta.from_dict({"arch": ARCH}, "old.ckpt") == CPMMeta(arch=ARCH)  # a run of no registry, no MLflow


def test_the_hooks_writes_make_one_section():
    checkpoint: dict = {}
    write(checkpoint, rng=[])
    write(checkpoint, tokenizer=b"t", proposals="3")
    write(checkpoint, arch=ARCH, tokens_seen=5, skipped_steps=0, migrations=[])
    assert CPMMeta.of(checkpoint, "c") == CPMMeta(arch=ARCH, tokens_seen=5, tokenizer=b"t", proposals="3")


def test_a_checkpoint_may_record_a_model_larger_than_strangers_may_hand_us_but_not_a_runaway():
    """A run config may train past MAX_PARAMS (registry.max_params bounds proposals, not the
    operator); its checkpoints reopen. A crafted section of a billion layers is one line."""
    big = ArchConfig(preset="cpm-ant-10b", num_attn_layers=120, num_ffn_layers=120).to_dict()  # ~24 B
    assert CPMMeta.from_dict({"arch": big}, "c").arch == big
    with pytest.raises(UserError, match="c: .* parameters, above the 1,000,000,000,000 the project builds from it"):
        CPMMeta.from_dict({"arch": {**ARCH, "num_attn_layers": 10**9}}, "c")


def test_a_writer_of_an_unknown_key_is_a_bug():
    with pytest.raises(TypeError, match="unknown key 'tokens' in its cpm section"):
        write({}, tokens=5)


@pytest.mark.parametrize("section, expected", [
    ({"arch": ARCH, "version": VERSION + 1},
     f"its cpm section is version {VERSION + 1}, written by a newer cpm-lightning; this one reads versions up to {VERSION}"),
    ({"arch": ARCH, "version": "1"}, "its cpm section has version '1'; expected a positive integer"),
    ({"arch": ARCH, "tokens_seen": "512"}, "cpm.tokens_seen is str; expected int"),
    ({"arch": ARCH, "tokens_seen": True}, "cpm.tokens_seen is bool; expected int"),
    ({"arch": ARCH, "tokenizer": "model"}, "cpm.tokenizer is str; expected bytes or None"),
    ({"arch": ARCH, "sampler": {}}, "unknown key 'sampler' in its cpm section; expected: arch, tokens_seen"),
    ({"arch": "tiny"}, "the architecture is str; expected a mapping of model.arch fields"),
    ({"tokens_seen": 5}, "not a cpm-lightning checkpoint (no 'cpm' section)"),
])
def test_a_section_that_cannot_be_read_is_one_line_naming_the_checkpoint(tmp_path, section, expected):
    path = tmp_path / "step-00000004.ckpt"
    torch.save({"global_step": 4, "cpm": section}, path)
    seal_zip(path)  # as Checkpoints.save does: the section, not the record, is wrong
    with pytest.raises(UserError) as e:
        read_meta(path)
    assert str(e.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(e.value)
