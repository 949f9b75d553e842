"""Tasks at inference (issue 24, items 4 and 6): the metrics against hand-worked cases and the
reference libraries, the task layout decoded with the KV cache against the same layout run whole,
`evaluate --tasks qa,summarize,translate` on the shipped data, `generate --task`, and a prompt book
entry that names a task. Every bad input is one line.

Two tiny model directories per module (random weights, a tokenizer trained on the test corpus):
one with task prompt embeddings, one without (as the demo, num_tasks 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
import yaml
from conftest import EN, ZH, cli_error, english_text, write_config, write_corpus, write_proposal
from mlflow import MlflowClient
from rouge_score import rouge_scorer

from cpm_lightning.checkpoint.modeldir import write_model_dir
from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.tasks import INPUT_SEGMENT, OUTPUT_SEGMENT, TASK_PROMPTS, input_text
from cpm_lightning.core.tokenizer import train_tokenizer
from cpm_lightning.inference import task_metrics as tm
from cpm_lightning.inference.book import PROMPTS_FILE, Prompt, load_prompts
from cpm_lightning.inference.generate import complete_book
from cpm_lightning.inference.tasks import DATA, TASK_EVALS, decode, input_ids, prompt_note
from cpm_lightning.model import ArchConfig, CPMAnt

PROMPT_LEN = 4


def _model_dir(root: Path, num_tasks: int) -> Path:
    tokenizer = train_tokenizer([english_text(60), "\n\n".join(ZH * 30)], 400)
    torch.manual_seed(0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=tokenizer.vocab_size, num_tasks=num_tasks,
                              prompt_len=PROMPT_LEN).resolved())
    model.init_weights()
    path = root / f"model-{num_tasks}"
    write_model_dir(path, model.state_dict(), model.cfg.to_dict(), tokenizer)
    return path


@pytest.fixture(scope="module")
def with_prompts(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("tasks"), num_tasks=6)


@pytest.fixture(scope="module")
def without_prompts(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("tasks"), num_tasks=0)


# -- metrics ----------------------------------------------------------------------------------
def test_squad_normalization_and_exact_match():
    assert tm.normalize_answer("  The Eiffel   Tower, in Paris!") == "eiffel tower in paris"
    assert tm.normalize_answer("An apple a day") == "apple day"
    assert tm.exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert tm.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert tm.exact_match("1858", ["in 1858", "1858"]) == 1.0  # the best of the gold answers


def test_squad_f1_worked_by_hand():
    # [in, year, 1858] against [1858]: 1 shared token, precision 1/3, recall 1: F1 = 2/3 / (4/3) = 0.5
    assert tm.f1("in the year 1858", ["1858"]) == pytest.approx(0.5)
    # against "saint bernadette soubirous": P 1, R 2/3 -> 0.8; against "bernadette": P 1/2, R 1 -> 2/3; the max
    assert tm.f1("Bernadette Soubirous", ["Saint Bernadette Soubirous", "Bernadette"]) == pytest.approx(0.8)
    # a bag: [cat, cat, dog] and [cat, dog, dog] share one cat and one dog: P = R = 2/3
    assert tm.f1("cat cat dog", ["cat dog dog"]) == pytest.approx(2 / 3)
    assert tm.f1("", ["anything"]) == 0.0 and tm.f1("The.", ["a"]) == 0.0  # nothing left to share


def test_rouge_l_is_rouge_scores_and_worked_by_hand():
    # LCS of "the cat on the mat" (5 of 6 tokens each way): P = R = F = 5/6
    assert tm.rouge_l(["the cat on the mat sat"], ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    pairs = [("The cats were sitting on mats", "the cat sat on the mat"), ("A quick brown fox", "the quick fox jumps")]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs)
    assert tm.rouge_l([p for p, _ in pairs], [r for _, r in pairs]) == pytest.approx(expected, abs=1e-12)


def test_chinese_rouge_l_is_over_characters():
    # 后妃之美也。 against 后妃之德也。: LCS 后妃之也。, 5 of 6 characters each way
    assert tm.rouge_l(["后妃之美也。"], ["后妃之德也。"]) == pytest.approx(5 / 6)
    assert tm.rouge_l(["后 妃"], ["后妃"]) == 1.0  # spaces are not characters of the text
    # rouge-score's own tokenizer keeps only [a-z0-9]: every Chinese pair would score 0
    assert rouge_scorer.RougeScorer(["rougeL"]).score("后妃之德也。", "后妃之美也。")["rougeL"].fmeasure == 0.0


def test_chrf_and_bleu_are_sacrebleus():
    hyps = ["The Master said, learning is a pleasure.", "Fine words are seldom virtue."]
    refs = ['The Master said, "Is it not pleasant to learn?"', "Fine words are seldom associated with true virtue."]
    chrf, bleu = tm.chrf_bleu(hyps, refs)
    assert chrf == sacrebleu.corpus_chrf(hyps, [refs]).score and bleu == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert 0 < bleu < chrf < 100
    assert tm.chrf_bleu(refs, refs) == pytest.approx((100.0, 100.0))
    # Chinese references: BLEU over sacrebleu's Chinese tokenization (characters), not one "word" per sentence
    zh_bleu = tm.chrf_bleu(["学而时习之不亦说乎"], ["学而时习之，不亦说乎？"])[1]
    assert zh_bleu == sacrebleu.corpus_bleu(["学而时习之不亦说乎"], [["学而时习之，不亦说乎？"]], tokenize="zh").score > 0


# -- the layout and decoding ------------------------------------------------------------------
def _whole(model: CPMAnt, ids: list[int], task: int | None, steps: int) -> list[int]:
    """Greedy decoding without a cache: the whole layout (input in its segment as context, the
    output so far in the output segment, causal) run again for every token."""
    out: list[int] = []
    for _ in range(steps):
        seq = torch.tensor([ids + out])
        segments = torch.tensor([[INPUT_SEGMENT] * len(ids) + [OUTPUT_SEGMENT] * len(out)])
        context = torch.tensor([[True] * len(ids) + [False] * len(out)])
        kwargs = {} if task is None else {"task": torch.tensor([task])}
        out.append(int(model(seq, segment_ids=segments, context=context, **kwargs)[0, -1].argmax()))
    return out


@pytest.mark.parametrize("prompts", [True, False])
def test_decoding_with_the_cache_is_the_layout_run_whole(prompts, with_prompts, without_prompts):
    model, tokenizer = load_model(str(with_prompts if prompts else without_prompts))
    ids, cut = input_ids(tokenizer, model.cfg, "qa", "Who lives there?", EN[0], 12)
    assert cut == 0
    with torch.no_grad():
        expected = _whole(model, ids, TASK_PROMPTS["qa"] if prompts else None, 12)
    assert decode(model, ids, "qa", 12, eos_id=None) == expected


def test_a_model_without_the_tasks_rows_is_said_to_read_without_the_prompt(with_prompts, without_prompts):
    assert prompt_note(load_model(str(with_prompts))[0].cfg, "translate") is None
    assert prompt_note(load_model(str(without_prompts))[0].cfg, "qa") == (
        "task qa: the model has no prompt embeddings for it (num_tasks 0, the task's row 3): its input is read "
        "without the task prompt")


def test_a_long_input_loses_its_oldest_tokens(with_prompts):
    model, tokenizer = load_model(str(with_prompts))
    context = " ".join(EN * 20)
    full = tokenizer.encode(input_text("Who?", context))
    ids, cut = input_ids(tokenizer, model.cfg, "qa", "Who?", context, 32)
    assert len(ids) == model.cfg.max_len - PROMPT_LEN - 32 and cut == len(full) - len(ids) > 0
    assert ids == full[-len(ids):]  # the question, at the end, is kept
    with pytest.raises(UserError, match="leave no room for the input"):
        input_ids(tokenizer, model.cfg, "qa", "Who?", None, model.cfg.max_len)


# -- evaluate ---------------------------------------------------------------------------------
def test_the_shipped_data_loads():
    assert {name: len(t.examples(None)) for name, t in TASK_EVALS.items()} == {"qa": 200, "summarize": 30, "translate": 22}
    qa = TASK_EVALS["qa"].examples(3)
    assert len(qa) == 3 and all(e.context and e.input and e.references and all(e.references) for e in qa)
    assert all(tm.is_chinese(e.input) and tm.is_chinese(e.references[0]) for e in TASK_EVALS["summarize"].examples(None))
    assert all(tm.is_chinese(e.input) and e.references[0].isascii() for e in TASK_EVALS["translate"].examples(None))
    assert "licence" in (DATA / "README.md").read_text()


def test_evaluate_scores_the_tasks_as_their_outputs_say(with_prompts, capsys):
    main(["evaluate", str(with_prompts), "--tasks", "qa,summarize,translate", "--limit", "2", "--json"])
    out, err = capsys.readouterr()
    scores = json.loads(out)
    assert {t: sorted(m) for t, m in scores.items()} == {
        "qa": ["exact_match", "f1"], "summarize": ["rouge_l"], "translate": ["bleu", "chrf"]}
    assert "without the task prompt" not in err
    model, tokenizer = load_model(str(with_prompts))
    outputs = []
    for e in TASK_EVALS["qa"].examples(2):
        ids, _ = input_ids(tokenizer, model.cfg, "qa", e.input, e.context, 32)
        outputs.append(tokenizer.decode(decode(model, ids, "qa", 32, tokenizer.eos_id)))
    golds = [e.references for e in TASK_EVALS["qa"].examples(2)]
    assert scores["qa"]["f1"] == pytest.approx(sum(tm.f1(o, g) for o, g in zip(outputs, golds, strict=True)) / 2)
    assert 0 <= scores["summarize"]["rouge_l"] <= 1 and 0 <= scores["translate"]["chrf"] <= 100


def test_evaluate_says_when_the_model_has_no_task_prompts(without_prompts, capsys):
    main(["evaluate", str(without_prompts), "--tasks", "qa", "--limit", "1"])
    err = capsys.readouterr().err
    assert "warning: task qa: the model has no prompt embeddings for it (num_tasks 0" in err


def test_an_unknown_task_lists_the_valid_ones(with_prompts, capsys):
    assert cli_error(capsys, "evaluate", str(with_prompts), "--tasks", "qa,squad") == (
        "--tasks: unknown task 'squad'; expected one of: arc_easy, heldout, hellaswag, piqa, qa, summarize, translate")


# -- generate --task --------------------------------------------------------------------------
def test_generate_task_lays_the_input_out_as_the_evaluation(with_prompts, capsys):
    main(["generate", str(with_prompts), "--task", "qa", "--context", EN[1], "--prompt", "Who?",
          "--temperature", "0", "--max-new-tokens", "6"])
    model, tokenizer = load_model(str(with_prompts))
    ids, _ = input_ids(tokenizer, model.cfg, "qa", "Who?", EN[1], 6)
    assert capsys.readouterr().out == tokenizer.decode(decode(model, ids, "qa", 6, tokenizer.eos_id)) + "\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["--prompt", "Who?", "--context", "A passage."],
     "--context is the passage of a task's input; give the task too (--task qa)"),
    (["--prompt", "Who?", "--task", "chat"], "--task: unknown task 'chat'; expected one of: qa, summarize, translate"),
    (["--prompt", "  ", "--task", "qa", "--context", "A passage."],
     "--prompt is empty; with --task qa it is the question or text, expected some text"),
    (["--prompt", "Who?", "--task", "qa", "--prompting", "causal"],
     "--prompting and --task: task qa lays its input out itself; give one of them"),
])
def test_generate_task_refuses_bad_input(argv, message, tmp_path, capsys):
    # Checked before the model is read: the source need not exist.
    assert cli_error(capsys, "generate", str(tmp_path / "none"), *argv) == message


def test_generate_task_refuses_an_input_longer_than_the_model(with_prompts, capsys):
    message = cli_error(capsys, "generate", str(with_prompts), "--task", "qa", "--context", " ".join(EN * 20),
                        "--prompt", "Who?", "--max-new-tokens", "8")
    assert message.startswith("--task qa: the input is ") and message.endswith(
        "tokens; with 8 new tokens the model's maximum length 256 leaves room for 244")


# -- the prompt book --------------------------------------------------------------------------
def _book(tmp_path: Path, entries: list[dict]) -> Path:
    (tmp_path / PROMPTS_FILE).write_text(yaml.safe_dump({"prompts": entries}, allow_unicode=True, sort_keys=False))
    return tmp_path


QA = {"id": "who", "author": "@someone", "text": "Who has a good fortune?", "max_tokens": 5, "task": "qa",
      "context": EN[0]}


def test_a_book_entry_may_name_a_task_and_complete_book_lays_it_out(with_prompts, tmp_path):
    plain = {"id": "plain", "author": "@a", "text": EN[1][:20], "max_tokens": 3}
    prompts = load_prompts(_book(tmp_path, [QA, plain]))
    assert prompts == [Prompt(**QA), Prompt(**plain)] and prompts[1].task is None
    model, tokenizer = load_model(str(with_prompts))
    book = complete_book(model, tokenizer, prompts, 3)
    ids, _ = input_ids(tokenizer, model.cfg, "qa", QA["text"], QA["context"], 5)
    assert book["completions"][0] == {**QA, "completion": tokenizer.decode(decode(model, ids, "qa", 5, tokenizer.eos_id))}
    assert "task" not in book["completions"][1]


def test_proposals_check_counts_a_task_entrys_context_and_prompt(with_prompts, tmp_path, capsys):
    long = {**QA, "context": " ".join(EN), "max_tokens": 100}
    path = _book(tmp_path, [long])
    write_proposal(path, 1, status="draft")
    bound = len(input_text(long["text"], long["context"]).encode()) + 1
    with pytest.raises(SystemExit):  # without a model: UTF-8 bytes + 1 of the context and the question
        main(["proposals", "check", str(path)])
    assert capsys.readouterr().out.splitlines() == [
        f"{path / PROMPTS_FILE}:2: prompts[0] (id who): text: at most {bound} tokens (its UTF-8 bytes + 1) + max_tokens "
        f"100 = {bound + 100}, above --max-len 256 (--against CKPT counts the model's own tokens)"]
    model, tokenizer = load_model(str(with_prompts))
    tokens = len(tokenizer.encode(input_text(QA["text"], QA["context"])))
    long = {**QA, "max_tokens": 257 - tokens - PROMPT_LEN}
    _book(path, [long])
    with pytest.raises(SystemExit):  # with it: its tokens and the task's prompt positions
        main(["proposals", "check", str(path), "--against", str(with_prompts)])
    assert capsys.readouterr().out.splitlines() == [
        f"{path / PROMPTS_FILE}:2: prompts[0] (id who): text: {tokens} tokens + {PROMPT_LEN} task prompt tokens + "
        f"max_tokens {long['max_tokens']} = 257, above the model's maximum length 256"]


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "chat"}, "task: unknown task 'chat'; expected one of: qa, summarize, translate"),
    ({"task": None}, "context: the passage of a task's input; give the task too (task: qa)"),
    ({"context": ""}, "context: expected non-empty text, got ''"),
])
def test_a_bad_task_entry_fails_with_its_line(change, message, tmp_path):
    entry = {k: v for k, v in {**QA, **change}.items() if v is not None}
    with pytest.raises(UserError) as e:
        load_prompts(_book(tmp_path, [entry]))
    assert str(e.value).startswith(f"{tmp_path / PROMPTS_FILE}:") and str(e.value).endswith(
        f"prompts[0] (id who): {message}")


# -- training, releases and the site ----------------------------------------------------------
@pytest.mark.slow
def test_the_tasks_reach_the_training_metrics_a_release_card_and_the_site(tmp_path, mlflow_server, monkeypatch,
                                                                          capsys):
    """Registered in evaluation.TASKS, a task goes where the others go: the `eval` group's
    callback logs eval/qa/* (as `evaluate` scores the checkpoint), `release --eval-tasks` tags and
    lists them on the card, and the site charts them and shows them with the release."""
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])  # LightningCLI warns about pytest's arguments
    uri = mlflow_server.uri
    config = write_config(tmp_path / "config.yaml", write_corpus(tmp_path), **{
        "model.arch.num_tasks": 6, "model.arch.prompt_len": PROMPT_LEN, "trainer.max_steps": 2,
        "trainer.val_check_interval": 100, "checkpoint.every_n_steps": 2, "data.cache_dir": str(tmp_path / "cache"),
        "tracking.uri": uri, "tracking.experiment": "tasks", "eval.every_n_steps": 2, "eval.tasks": ["qa"],
        "eval.limit": 2})
    main(["fit", "--config", str(config)])
    capsys.readouterr()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002.ckpt"
    main(["evaluate", str(ckpt), "--tasks", "qa,translate", "--limit", "2", "--json"])
    scores = json.loads(capsys.readouterr().out)
    client = MlflowClient(uri)
    run_id = client.search_runs([client.get_experiment_by_name("tasks").experiment_id])[0].info.run_id
    logged = {m: client.get_metric_history(run_id, f"eval/qa/{m}") for m in ("exact_match", "f1")}
    assert {m: [(h.step, h.value) for h in history] for m, history in logged.items()} == {
        m: [(2, pytest.approx(v, rel=1e-6))] for m, v in scores["qa"].items()}

    (tmp_path / "registry").mkdir()
    main(["release", str(ckpt), "--name", "task-lm", "--eval-tasks", "qa,translate", "--eval-limit", "2",
          "--out", str(tmp_path / "released"), "--proposals", str(tmp_path / "registry"), "--tracking-uri", uri])
    tags = client.get_model_version("task-lm", "1").tags
    expected = {f"eval/{t}/{m}": f"{v:.4f}" for t, metrics in scores.items() for m, v in metrics.items()}
    assert {k: v for k, v in tags.items() if k.startswith("eval/")} == expected
    card = (tmp_path / "released" / "MODEL_CARD.md").read_text()
    assert all(f"- {k.removeprefix('eval/')}: {v}\n" in card for k, v in expected.items())

    main(["report", "site", "--experiment", "tasks", "--registry", str(tmp_path / "registry"),
          "--out", str(tmp_path / "site"), "--tracking-uri", uri])
    assert "<h2>Evaluation: qa</h2>" in (tmp_path / "site" / "metrics.html").read_text()
    releases = (tmp_path / "site" / "releases.html").read_text()
    assert f"<li>qa/f1: {expected['eval/qa/f1']}</li>" in releases and "<li>translate/chrf: " in releases
