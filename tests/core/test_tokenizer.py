"""The SentencePiece tokenizer: exact round-trip of mixed Chinese/English text (docs/ARCHITECTURE.md, "Data"),
and `cpm-lightning tokenizer train` writing a model that loads."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import ZH, cli_error, english_text

from cpm_lightning.cli.main import main
from cpm_lightning.core.tokenizer import UNK, Tokenizer, save_tokenizer, train_tokenizer

# Characters that occur nowhere in the training text: each must come back through byte fallback.
RARE = {"rare CJK (Extension B)": "𠀀", "rare CJK": "龘", "emoji": "🎉", "emoji with skin tone": "👍🏽"}

SAMPLES = {
    "chinese": "子曰：「學而時習之，不亦說乎？」",
    "english": "It is a truth universally acknowledged, that a single man must be in want of a wife.",
    "full-width punctuation": "全角（括號）！？、。；：《書名》……——「引號」『二重』",
    "newlines": "第一行\n第二行\n\n\nthird line\n",
    "crlf": "line one\r\nline two\r\n",
    "tabs": "\tindented\t\ttwo tabs\t",
    "runs of spaces": "a  b   c    d",
    "leading and trailing spaces": "   子曰   ",
    "digits": "In 1813, 3 editions; 一八一三年 2026-11-28",
    **RARE,
    "mixed": "子曰：「學而時習之」\nIt is a truth.\t\tTabs,   three spaces；全角！\r\n🎉 𠀀龘 end  \n\n",
}


def training_texts() -> list[str]:
    """The conftest corpus: English paragraphs and the Chinese JSONL documents."""
    return [english_text(), *(ZH[i % 3] * (1 + i % 4) for i in range(200))]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(training_texts(), 400)


@pytest.mark.parametrize("text", SAMPLES.values(), ids=SAMPLES.keys())
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert UNK not in ids
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("char", RARE.values(), ids=RARE.keys())
def test_characters_outside_the_vocabulary_fall_back_to_bytes(tokenizer, char):
    assert char not in "".join(training_texts())
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("子" + char)]
    assert pieces[-len(char.encode()):] == [f"<0x{b:02X}>" for b in char.encode()]


def test_training_text_round_trips_and_chinese_is_learned(tokenizer):
    for text in training_texts():
        assert tokenizer.decode(tokenizer.encode(text)) == text
    for char in "子曰學習":  # frequent in the corpus: whole pieces, not UTF-8 bytes
        assert not any(p.startswith("<0x") for p in tokenizer.sp.encode(char, out_type=str)), char
    assert tokenizer.vocab_size <= 400 and tokenizer.eos_id == 3


def test_save_and_load_through_fsspec_urls(tokenizer, tmp_path):
    for url in (f"file://{tmp_path}/sub/dir/tok.model", "memory://tokenizers/tok.model", "tok.model"):
        save_tokenizer(tokenizer, url)
        loaded = Tokenizer.load(url)
        assert loaded.model_bytes == tokenizer.model_bytes
        assert loaded.decode(loaded.encode(SAMPLES["mixed"])) == SAMPLES["mixed"]
    assert sorted(p.name for p in (tmp_path / "sub" / "dir").iterdir()) == ["tok.model"]  # no .tmp left


def test_tokenizer_train_cli_writes_a_model_that_loads(corpus, tmp_path, capsys):
    output = tmp_path / "out" / "zh-en.model"
    main(["tokenizer", "train", "--source", str(corpus["en"]), "--source", str(corpus["zh"]),
          "--vocab-size", "400", "--output", str(output)])
    tokenizer = Tokenizer.load(str(output))
    out, err = capsys.readouterr()
    assert out == f"wrote {output} ({tokenizer.vocab_size} pieces)\n" and err == ""
    assert 300 < tokenizer.vocab_size <= 400
    assert sorted(p.name for p in output.parent.iterdir()) == ["zh-en.model"]
    for text in SAMPLES.values():
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # The Chinese came from the JSONL's text field, so it was learned, and the JSON syntax was not.
    assert tokenizer.sp.encode("曰", out_type=str)[-1] == "曰"
    assert tokenizer.sp.piece_to_id('"text"') == UNK


def test_tokenizer_train_cli_reads_globs_gzip_and_another_field(tmp_path, capsys):
    (tmp_path / "books").mkdir()
    for i in range(3):
        (tmp_path / "books" / f"part{i}.txt").write_text(english_text(40 + i))
    with gzip.open(tmp_path / "analects.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(300):
            f.write(json.dumps({"content": ZH[i % 3], "text": "ignored"}, ensure_ascii=False) + "\n")
    main(["tokenizer", "train", "--source", f"{tmp_path}/books/*.txt", "--source", str(tmp_path / "analects.jsonl.gz"),
          "--field", "content", "--vocab-size", "400", "--output", "tok.model"])
    assert "warning" not in capsys.readouterr().err  # the JSONL's other key is no problem
    tokenizer = Tokenizer.load("tok.model")
    assert tokenizer.sp.encode("曰", out_type=str)[-1] == "曰"
    assert tokenizer.decode(tokenizer.encode(SAMPLES["mixed"])) == SAMPLES["mixed"]


def test_generate_prints_the_prompt_and_continuation_with_the_space_between(tokenizer, monkeypatch, capsys):
    # SentencePiece drops the leading space of a decoded sequence; the continuation of a prompt
    # must keep it ("a truth universally", not "a truthuniversally").
    import cpm_lightning.cli.loader
    import cpm_lightning.inference.generate

    prompt, text = "子曰 a truth", "子曰 a truth universally acknowledged"
    continuation = tokenizer.encode(text)[len(tokenizer.encode(prompt)):]
    assert tokenizer.decode(tokenizer.encode(prompt)) == prompt
    assert tokenizer.sp.id_to_piece(continuation[0]).startswith("▁")
    monkeypatch.setattr(cpm_lightning.cli.loader, "load_model", lambda source, device, precision, *adapter: (None, tokenizer))
    monkeypatch.setattr(cpm_lightning.inference.generate, "sample", lambda model, ids, *args: continuation)
    main(["generate", "model.ckpt", "--prompt", prompt])
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("size, expected", [
    (100_000_000, "--vocab-size must be at most 1048576 (as data.tokenizer_vocab_size), got 100000000"),
    (100, "--vocab-size must be at least 264 (256 byte pieces + specials), got 100"),
])
def test_tokenizer_train_refuses_a_vocabulary_size_outside_its_range_before_reading(size, expected, tmp_path,
                                                                                    monkeypatch, capsys):
    from datamodules import shards

    monkeypatch.setattr(shards, "iter_documents", lambda *a: pytest.fail("read the sources first"))
    assert cli_error(capsys, "tokenizer", "train", "--source", str(tmp_path / "x.txt"), "--vocab-size", str(size),
                     "--output", str(tmp_path / "tok.model")) == expected
    assert not (tmp_path / "tok.model").exists()


def test_a_tokenizer_with_far_fewer_pieces_than_asked_says_so_in_one_line(corpus, tmp_path, capsys):
    main(["tokenizer", "train", "--source", str(corpus["en"]), "--vocab-size", "100000", "--output", "tok.model"])
    pieces = Tokenizer.load("tok.model").vocab_size
    out, err = capsys.readouterr()
    assert pieces < 90_000 and out == f"wrote tok.model ({pieces} pieces)\n"
    assert err == (f"warning: the tokenizer has {pieces:,} pieces, fewer than the 100,000 asked: its training text "
                   "gives no more; train on more text for more\n")
