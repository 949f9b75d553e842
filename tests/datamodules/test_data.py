"""Sources, shards and the mixture: what makes the data exact and resumable."""

from __future__ import annotations

import gzip

import fsspec
import numpy as np
import pytest

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import EOS
from datamodules import shards
from datamodules.mixture import Mixture
from datamodules.pretrain import PretrainDataModule
from datamodules.sources import SourceConfig


def test_mixture_tracks_the_weights_at_every_prefix():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    mix = Mixture(weights, {"a": 7, "b": 5, "c": 3})
    counts = dict.fromkeys(weights, 0)
    for i in range(1, 1001):
        counts[mix.next()[0]] += 1
        for name, w in weights.items():
            assert abs(counts[name] - w * i) <= 1, (i, counts)


def test_mixture_visits_every_window_once_per_epoch_in_a_seeded_order():
    mix = Mixture({"a": 1.0}, {"a": 10}, seed=1)
    epoch0 = [mix.next()[1] for _ in range(10)]
    epoch1 = [mix.next()[1] for _ in range(10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert [Mixture({"a": 1.0}, {"a": 10}, seed=1).next()[1]] == epoch0[:1]


def state_after(weights: dict, sizes: dict, n: int) -> tuple[Mixture, dict]:
    mix = Mixture(weights, sizes)
    for _ in range(n):
        mix.next()
    return mix, mix.state.to_dict()


def test_mixture_state_restores_the_exact_continuation():
    weights, sizes = {"a": 2.0, "b": 1.0}, {"a": 9, "b": 4}
    mix, state = state_after(weights, sizes, 17)
    expected = [mix.next() for _ in range(30)]
    Mixture(weights, sizes, state=state).next()  # a restored mixture must not advance `state`
    restored = Mixture(weights, sizes, state=state)
    assert [restored.next() for _ in range(30)] == expected


def test_changed_weights_continue_from_the_cursors_without_a_burst():
    sizes = {"a": 50, "b": 50}
    _, state = state_after({"a": 1.0, "b": 1.0}, sizes, 20)
    changed = Mixture({"a": 3.0, "b": 1.0}, sizes, state=state)
    picks = [changed.next()[0] for _ in range(40)]
    assert picks.count("a") == 30  # the new shares from here on, not a catch-up on the past
    assert changed.state.cursors == {"a": 10 + 30, "b": 10 + 10}


def stream(dm: PretrainDataModule, name: str) -> np.ndarray:
    """All tokens of a source, its pieces back to back."""
    return dm.shards[name].read(0, len(dm.shards[name]))


def write_gz(path, text):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)


def test_a_skipped_window_is_drawn_past_and_never_handed_out():
    """After a rollback, `live` skips the samples that preceded a loss spike."""
    weights, sizes = {"a": 2.0, "b": 1.0}, {"a": 9, "b": 4}
    _, state = state_after(weights, sizes, 8)
    plain = Mixture(weights, sizes, state=state)
    every = [plain.next() for _ in range(20)]
    skipping = Mixture(weights, sizes, state=state, skip=[(8, 12), (20, 22)])
    assert [skipping.next() for _ in range(14)] == every[4:12] + every[14:20]
    assert skipping.state.index == 28
    assert Mixture(weights, sizes, state=state, skip=[(0, 8)]).next() == every[0]  # behind it: no effect


def test_sources_read_globs_gzip_and_fsspec_memory(tmp_path, corpus):
    (tmp_path / "parts").mkdir()
    write_gz(tmp_path / "parts" / "a.txt.gz", "first document " * 50)
    (tmp_path / "parts" / "b.txt").write_text("second document " * 50)
    with fsspec.open("memory://corpus/c.txt", "w") as f:
        f.write("third document " * 50)
    dm = PretrainDataModule(
        {"files": SourceConfig(url=str(tmp_path / "parts" / "*")), "mem": SourceConfig(url="memory://corpus/*.txt"),
         "en": SourceConfig(url=str(corpus["en"]))},
        tokenizer_vocab_size=300, seq_len=16)
    dm.prepare_data()
    dm.setup()
    files = stream(dm, "files")
    assert (files == EOS).sum() == 2  # two documents, each closed by EOS
    text = dm.text_tokenizer.decode([int(t) for t in files[: int(np.argmax(files == EOS))]])
    assert text == "first document " * 50
    assert dm.text_tokenizer.decode([int(t) for t in stream(dm, "mem")[:-1]]) == "third document " * 50


def test_shards_are_tokenized_once_and_redone_when_the_text_changes(tmp_path, corpus, monkeypatch):
    src = {"en": SourceConfig(url=str(corpus["en"]))}
    PretrainDataModule(src, tokenizer_vocab_size=300).prepare_data()
    calls = []
    real = shards.segments
    monkeypatch.setattr(shards, "segments", lambda *a, **k: calls.append(a) or real(*a, **k))
    dm = PretrainDataModule(src, tokenizer_vocab_size=300)
    dm.prepare_data()
    assert calls == []  # cached: the fingerprint matched
    corpus["en"].write_text(corpus["en"].read_text() + "\n\nOne more paragraph.")
    PretrainDataModule(src, tokenizer=dm.text_tokenizer.source).prepare_data()
    assert len(calls) == 1
    assert not list((tmp_path / "cache" / "shards").glob(".*"))  # no temporary directory left


def test_prepare_and_setup_list_each_source_once(corpus, monkeypatch):
    from datamodules import prepare

    listed = []
    real = prepare.expand
    monkeypatch.setattr(prepare, "expand", lambda *a, **k: listed.append(a[0]) or real(*a, **k))
    dm = PretrainDataModule({"en": SourceConfig(url=str(corpus["en"]))}, tokenizer=None, tokenizer_vocab_size=300)
    dm.prepare_data()
    dm.setup()
    assert listed == ["en"]  # the tokenizer's key, the pieces' keys and setup share one listing


def test_windows_are_packed_with_targets_shifted_by_one(corpus):
    dm = PretrainDataModule({"en": SourceConfig(url=str(corpus["en"]))}, tokenizer_vocab_size=300, seq_len=16)
    dm.prepare_data()
    dm.setup()
    tokens = stream(dm, "en")
    from datamodules.pretrain import window

    w = window(dm.shards["en"], 3, 16)
    assert w["input_ids"].tolist() == tokens[48:64].tolist()
    assert w["targets"].tolist() == tokens[49:65].tolist()
    assert dm.train_windows["en"] + dm.val_windows_of["en"] == (len(tokens) - 1) // 16


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_global_sequence(corpus, world):
    """Rank r takes global samples r, r+W, ...: together they are exactly one-rank's sequence."""
    dm = PretrainDataModule({"en": SourceConfig(url=str(corpus["en"])), "zh": SourceConfig(url=str(corpus["zh"]), format="jsonl")},
                            tokenizer_vocab_size=300, seq_len=16, batch_size=2)
    dm.prepare_data()
    dm.setup()
    from datamodules.pretrain import TrainStream

    def take(rank, w, n):
        it = iter(TrainStream(dm, rank, w, batch_size=2))
        return [next(it)["input_ids"] for _ in range(n)]

    single = take(0, 1, 12)
    ranks = [take(r, world, 12 // world) for r in range(world)]
    interleaved = [ranks[i % world][i // world] for i in range(12)]
    assert all((a == b).all() for a, b in zip(single, interleaved, strict=True))


def test_a_batch_beyond_its_range_is_refused_before_any_data_is_read(tmp_path, corpus, capsys, monkeypatch):
    from conftest import cli_error, write_config

    from datamodules import prepare

    monkeypatch.setattr(prepare, "expand", lambda *a: pytest.fail("listed the sources first"))
    config = write_config(tmp_path / "config.yaml", corpus, **{"trainer.max_steps": 1})
    assert cli_error(capsys, "fit", "--config", str(config), "--data.batch_size", "1000000000") == (
        "data.batch_size must be in [1, 1048576], got 1000000000")


def test_a_proposal_batch_or_sequence_beyond_its_range_fails_check(tmp_path, capsys):
    from conftest import write_proposal

    from cpm_lightning.cli.main import main

    path = write_proposal(tmp_path / "reg", 1, {"data.batch_size": 10**9, "data.seq_len": 10**9}, kind="data")
    with pytest.raises(SystemExit) as exit_info:
        main(["proposals", "check", str(tmp_path / "reg")])
    lines = capsys.readouterr().out.splitlines()
    assert exit_info.value.code == 2 and lines == [
        f"{path}:12: changes.data.batch_size: data.batch_size must be in [1, 1048576], got 1000000000",
        f"{path}:13: changes.data.seq_len: data.seq_len must be in [1, 1048576], got 1000000000"]


def test_a_micro_batch_beyond_the_memory_a_batch_may_take_is_refused_with_the_bound(corpus):
    dm = PretrainDataModule({"en": SourceConfig(url=str(corpus["en"]))}, seq_len=1 << 20, batch_size=1 << 10)
    assert dm.micro_batch_size(64, 4) == 4  # 4 windows of 1 Mi tokens a device: within the bound
    with pytest.raises(UserError) as e:
        dm.micro_batch_size(8, 4)
    assert str(e.value) == ("data.batch_size=1024 over 8 device(s) x trainer.accumulate_grad_batches=4 makes "
                            "micro-batches of 32 windows of data.seq_len + 1 = 1048577 tokens, 33,554,464 tokens; at "
                            "most 16,777,216 fit the memory a batch may take: raise trainer.accumulate_grad_batches "
                            "or lower data.batch_size or data.seq_len")
