"""The prompt book and the applications list (issue 15, item 2): book.py's loader and every bad
input, `proposals check` on them (the maximum length with and without a model), greedy
completions, and the snapshot `live` segments read. (The completions of a training run, and a
book `fit` refuses: tests/inference/test_evaluate.py; of a release: tests/tracking/test_tracking.py.)

One tiny model directory (random weights, a tokenizer trained on the test corpus) per module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import EN, ZH, cli_error, english_text, write_proposal

from cpm_lightning.checkpoint.modeldir import write_model_dir
from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tokenizer import train_tokenizer
from cpm_lightning.inference.book import APPS_FILE, PROMPTS_FILE, App, Prompt, load_apps, load_prompts
from cpm_lightning.inference.generate import complete_book
from cpm_lightning.live import watch
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.registry.commands import config_schema
from cpm_lightning.registry.limits import Limits

REPO = Path(__file__).resolve().parents[2]
PROMPT = {"id": "truth", "author": "@someone", "text": EN[0][:30], "max_tokens": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = train_tokenizer([english_text(60), "\n\n".join(ZH * 30)], 400)
    torch.manual_seed(0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=tokenizer.vocab_size).resolved())
    model.init_weights()
    path = tmp_path_factory.mktemp("book") / "model"
    write_model_dir(path, model.state_dict(), model.cfg.to_dict(), tokenizer)
    return path


def registry(tmp_path: Path, prompts: list[dict], apps: list[dict] | None = None) -> Path:
    """A registry of one draft proposal, whose prompts.yaml (and apps.yaml) hold the given entries."""
    path = tmp_path / "registry"
    write_proposal(path, 1, status="draft")
    (path / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": prompts}, allow_unicode=True, sort_keys=False))
    (path / APPS_FILE).write_text(yaml.safe_dump({"apps": apps or []}, sort_keys=False))
    return path


def test_the_seed_book_loads():
    prompts = load_prompts(REPO / "proposals")
    assert len(prompts) >= 5 and len({p.id for p in prompts}) == len(prompts)
    assert any("子曰" in p.text for p in prompts) and any(p.text.isascii() for p in prompts)
    assert load_apps(REPO / "proposals") == []
    assert load_prompts(REPO / "configs") == [] and load_apps(REPO / "configs") == []  # no files: empty books


def test_entries_are_read_as_written(tmp_path):
    app = {"name": "Poems", "authors": ["@a", "@b"], "link": "https://example.org/p", "release": "models:/demo@stable"}
    tuned = {**app, "name": "QA", "authors": ["@c"], "adapter": "models:/demo-qa/2"}
    path = registry(tmp_path, [PROMPT, {**PROMPT, "id": "analects", "text": ZH[0]}], [app, tuned])
    assert load_prompts(path) == [Prompt(**PROMPT), Prompt(**{**PROMPT, "id": "analects", "text": ZH[0]})]
    assert load_apps(path) == [App(**app), App(**tuned)] and load_apps(path)[0].adapter is None


BAD = {  # case -> (file, its text, the one line load_* fails with, after the file's path)
    "invalid yaml": (PROMPTS_FILE, "prompts:\n  - id: a\n   author: b\n",
                     ":3: yaml: while parsing a block collection expected <block end>, but found '<block mapping start>'"),
    "unknown key": (PROMPTS_FILE, "prompts:\n  - id: a\n    author: b\n    text: c\n    max_tokens: 1\n    temperature: 0\n",
                    ":6: prompts[0] (id a): temperature: unknown field; expected: id, author, text, max_tokens, task, context"),
    "duplicate id": (PROMPTS_FILE, "prompts:\n  - {id: a, author: b, text: c, max_tokens: 1}\n"
                                   "  - {id: a, author: d, text: e, max_tokens: 2}\n",
                     ":3: prompts[1] (id a): id: also the id of prompts[0]; expected each once"),
    "max_tokens 0": (PROMPTS_FILE, "prompts:\n  - {id: a, author: b, text: c, max_tokens: 0}\n",
                     ":2: prompts[0] (id a): max_tokens: expected at least 1 new token, got 0"),
    "missing field": (PROMPTS_FILE, "prompts:\n  - {id: a, author: b, max_tokens: 3}\n",
                      ":2: prompts[0] (id a): text: missing (required)"),
    "empty text": (PROMPTS_FILE, "prompts:\n  - {id: a, author: b, text: ' ', max_tokens: 3}\n",
                   ":2: prompts[0] (id a): text: expected non-empty text, got ' '"),
    "not a list": (PROMPTS_FILE, "prompts: {id: a}\n",
                   ":1: prompts: expected a mapping with one key, `prompts:`, holding a list, got dict"),
    "bad link": (APPS_FILE, "apps:\n  - name: x\n    authors: ['@a']\n    link: javascript:alert(1)\n"
                            "    release: models:/demo/1\n",
                 ":4: apps[0] (name x): link: expected an http(s):// URL, got 'javascript:alert(1)'"),
    "bad release": (APPS_FILE, "apps:\n  - name: x\n    authors: ['@a']\n    link: https://x.org\n"
                               "    release: runs:/0123/model\n",
                    ":5: apps[0] (name x): release: expected models:/NAME/VERSION or models:/NAME@ALIAS, "
                    "got 'runs:/0123/model'"),
    "adapter not a models:/ URI": (APPS_FILE, "apps:\n  - {name: x, authors: ['@a'], link: 'https://x.org', "
                                   "release: 'models:/d/1', adapter: ./adapter}\n",
                                   ":2: apps[0] (name x): adapter: expected an adapter version (`cpm-lightning release "
                                   "--adapter`), models:/NAME/VERSION or models:/NAME@ALIAS, got './adapter'"),
    "no authors": (APPS_FILE, "apps:\n  - {name: x, authors: [], link: 'https://x.org', release: 'models:/d/1'}\n",
                   ":2: apps[0] (name x): authors: expected a non-empty list of names, got []"),
    # A hostile book is refused as a proposal would be, before it is built into Python objects.
    "alias bomb": (PROMPTS_FILE, "prompts:\n  - id: a\n    author: &a0 [x, x, x, x, x, x, x, x, x, x]\n    text: *a0\n"
                                 + "".join(f"    f{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
                                 + "    max_tokens: *a8\n",
                   ":4: prompts.0.text: YAML aliases (*name) are not allowed"),
    "duplicate field": (PROMPTS_FILE, "prompts:\n  - id: a\n    author: b\n    text: c\n    text: d\n    max_tokens: 1\n",
                        ":5: prompts.0.text: duplicate key"),
    "nested too deeply": (PROMPTS_FILE, "prompts: " + "[" * 1200, ": yaml: nested too deeply for prompt entries"),
    "overlong integer": (PROMPTS_FILE, "prompts:\n  - {id: a, author: b, text: c, max_tokens: " + "9" * 5000 + "}\n",
                         ":2: yaml: an integer of 5000 characters"),
    "integer beyond int64": (PROMPTS_FILE, "prompts:\n  - {id: a, author: b, text: c, max_tokens: 9223372036854775808}\n",
                             ":2: yaml: integer 9223372036854775808 is out of range: expected -9223372036854775808 to "
                             "9223372036854775807 (int64)"),
    # Text a stranger wrote reaches terminals and the site: no control or bidi characters, and
    # line breaks and tabs only in a prompt's text.
    "NUL in a prompt": (PROMPTS_FILE, 'prompts:\n  - {id: a, author: b, text: "x\\0y", max_tokens: 1}\n',
                        ":2: prompts[0] (id a): text: holds U+0000 (a control character) at character 2; expected plain text"),
    "ESC in an author": (PROMPTS_FILE, 'prompts:\n  - {id: a, author: "@b\\e[2J", text: c, max_tokens: 1}\n',
                         ":2: prompts[0] (id a): author: holds U+001B (a control character) at character 3; "
                         "expected plain text"),
    "line break in an author": (PROMPTS_FILE, 'prompts:\n  - {id: a, author: "@b\\nc", text: "two\\nlines", '
                                              "max_tokens: 1}\n",
                                ":2: prompts[0] (id a): author: holds U+000A (a control character) at character 3; "
                                "expected plain text"),
    "OSC in an app's name": (APPS_FILE, 'apps:\n  - {name: "\\e]0;owned\\a", authors: ["@a"], link: "https://x.org", '
                                        "release: 'models:/d/1'}\n",
                             ":2: apps[0] (name \\x1b]0;owned\\x07): name: holds U+001B (a control character) at "
                             "character 1; expected plain text"),
    "bidi in an app's authors": (APPS_FILE, 'apps:\n  - {name: x, authors: ["@a\\u202e"], link: "https://x.org/", '
                                         "release: 'models:/d/1'}\n",
                              ":2: apps[0] (name x): authors: holds U+202E (a bidirectional control) at character 3; "
                              "expected plain text"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_book_fails_with_its_line(case, tmp_path):
    name, text, message = BAD[case]
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        (load_prompts if name == PROMPTS_FILE else load_apps)(tmp_path)
    assert str(e.value) == f"{tmp_path / name}{message}"


def test_text_that_is_not_utf8_is_named_with_its_entry(tmp_path):
    (tmp_path / PROMPTS_FILE).write_bytes(b"prompts:\n  - id: a\n    author: b\n    text: \"caf\xe9\"\n    max_tokens: 3\n")
    with pytest.raises(UserError) as e:
        load_prompts(tmp_path)
    assert str(e.value) == (f"{tmp_path / PROMPTS_FILE}:4: prompts[0] (id a): text: not valid UTF-8 (byte 0xe9 at "
                            "offset 47); save the file as UTF-8")


def test_several_problems_fail_with_the_first_and_a_count(tmp_path):
    (tmp_path / PROMPTS_FILE).write_text("prompts:\n  - {id: A, author: b, text: c, max_tokens: -1}\n")
    with pytest.raises(UserError) as e:
        load_prompts(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / PROMPTS_FILE}:2: prompts[0] (id A): id: expected a short slug")
    assert str(e.value).endswith(f"(and 1 more; `cpm-lightning proposals check {tmp_path}` lists them)")


def test_max_len_must_be_positive(capsys):
    assert cli_error(capsys, "proposals", "check", str(REPO / "proposals"), "--max-len", "0") == (
        "--max-len must be at least 1, got 0")


def test_proposals_check_lists_the_problems_of_the_book_and_the_apps(tmp_path, capsys):
    path = registry(tmp_path, [PROMPT, {**PROMPT, "max_tokens": 0}],
                    [{"name": "x", "authors": ["@a"], "link": "ftp://x", "release": "models:/d/1"}])
    with pytest.raises(SystemExit) as e:
        main(["proposals", "check", str(path)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out.splitlines() == [
        f"{path / PROMPTS_FILE}:9: prompts[1] (id truth): max_tokens: expected at least 1 new token, got 0",
        f"{path / APPS_FILE}:5: apps[0] (name x): link: expected an http(s):// URL, got 'ftp://x'"]
    assert err == "2 problem(s) in 1 proposal file(s) and 2 prompt book and applications file(s)\n"


def test_proposals_check_refuses_a_prompt_longer_than_the_model(model_dir, tmp_path, capsys):
    long = {**PROMPT, "id": "long", "text": " ".join(EN), "max_tokens": 100}
    path = registry(tmp_path, [PROMPT, long])
    text_bytes = len(long["text"].encode())
    # Without a model: bounded by its UTF-8 bytes + 1 tokens, against --max-len.
    main(["proposals", "check", str(path), "--max-len", str(text_bytes + 101)])
    assert capsys.readouterr().out == "1 proposal file(s) and 2 prompt book and applications file(s) OK\n"
    with pytest.raises(SystemExit):
        main(["proposals", "check", str(path)])
    assert capsys.readouterr().out.splitlines() == [
        f"{path / PROMPTS_FILE}:6: prompts[1] (id long): text: at most {text_bytes + 1} tokens (its UTF-8 bytes + 1) "
        f"+ max_tokens 100 = {text_bytes + 101}, above --max-len 256 (--against CKPT counts the model's own tokens)"]
    # With it: the model's own tokens, against its maximum length.
    model, tokenizer = load_model(str(model_dir))
    tokens = len(tokenizer.encode(long["text"]))
    long["max_tokens"] = 257 - tokens
    path = registry(tmp_path / "again", [long])
    with pytest.raises(SystemExit):
        main(["proposals", "check", str(path), "--against", str(model_dir)])
    assert capsys.readouterr().out.splitlines() == [
        f"{path / PROMPTS_FILE}:2: prompts[0] (id long): text: {tokens} tokens + max_tokens {257 - tokens} = 257, "
        "above the model's maximum length 256"]
    with pytest.raises(UserError, match="above the model's maximum length 256"):  # and nothing is generated
        complete_book(model, tokenizer, load_prompts(path), 0)


def test_the_token_bound_holds_for_the_tokenizer(model_dir):
    """What `proposals check` assumes without a model: at most one token per UTF-8 byte, plus one."""
    _, tokenizer = load_model(str(model_dir))
    texts = [*EN, *ZH, " leading space", "double  space\tand\ttabs\n\n", "unseen: ☃ ∮ 𝔘 é ß", "x", "   "]
    assert all(len(tokenizer.encode(t)) <= len(t.encode()) + 1 for t in texts)


def test_greedy_completions_are_deterministic(model_dir, tmp_path):
    prompts = load_prompts(REPO / "proposals")
    book = complete_book(*load_model(str(model_dir)), prompts, 7)
    assert book == complete_book(*load_model(str(model_dir)), prompts, 7)  # the model loaded again
    assert book["step"] == 7 and book["model"] is None
    assert [(c["id"], c["text"], c["max_tokens"]) for c in book["completions"]] == [(p.id, p.text, p.max_tokens)
                                                                                    for p in prompts]
    assert all(c["completion"] for c in book["completions"])  # random weights: some text, no EOS first


def test_live_snapshots_carry_the_last_good_book(tmp_path):
    path = registry(tmp_path, [PROMPT])
    schema, snapshots = config_schema(), tmp_path / "snapshots"
    first = watch.read(path, watch.Reading(), snapshots, schema, Limits())
    assert load_prompts(first.snapshot) == [Prompt(**PROMPT)] and load_apps(first.snapshot) == []
    (path / PROMPTS_FILE).write_text("prompts:\n  - {id: a, author: b, text: c, max_tokens: 0}\n")
    second = watch.read(path, first, snapshots, schema, Limits())
    assert load_prompts(second.snapshot) == [Prompt(**PROMPT)]  # the last good version
    assert [r.reason for r in second.rejected] == [
        f"{path / PROMPTS_FILE}:2: prompts[0] (id a): max_tokens: expected at least 1 new token, got 0; "
        "the run reads its last good version"]
    (path / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": [{**PROMPT, "max_tokens": 3}]}))
    third = watch.read(path, second, snapshots, schema, Limits())
    assert third.snapshot != first.snapshot and load_prompts(third.snapshot)[0].max_tokens == 3
