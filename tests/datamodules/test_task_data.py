"""Task sources: the layout of a sample, the loss mask, packing several samples into a window
without one seeing another, exact resume with a task source in the mixture, and the bad input."""

from __future__ import annotations

import json

import conftest
import pytest
import torch
import yaml

from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.loss import IGNORE, cross_entropy
from cpm_lightning.core.tasks import INPUT_SEGMENT, OUTPUT_SEGMENT, TASK_PROMPTS, input_text
from cpm_lightning.model import ArchConfig, CPMAnt
from datamodules.pretrain import PretrainDataModule
from datamodules.sources import SourceConfig
from datamodules.tasks import TaskPrompts

QUESTIONS = [("Who is in want of a wife?", "a single man"),
             ("What is little known?", "the feelings or views"),
             ("Who spoke to him one day?", "his lady")]
PROMPT_LEN = 4


def task_lines(n: int = 60) -> list[dict]:
    """QA on the opening of Pride and Prejudice, and translation of the Analects' first lines
    (as sentences: the test is of layout, not of translation quality)."""
    out = []
    for i in range(n):
        if i % 2:
            q, a = QUESTIONS[i % 3]
            out.append({"task": "qa", "context": conftest.EN[i % 3][:40], "input": q, "output": a})
        else:
            out.append({"task": "translate", "input": conftest.ZH[i % 3][:6], "output": conftest.EN[i % 3][:24]})
    return out


def write_tasks(path, lines) -> str:
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n")
    return str(path)


@pytest.fixture
def tasks_file(tmp_path):
    return write_tasks(tmp_path / "tasks.jsonl", task_lines())


def task_dm(corpus, url, num_tasks=6, seq_len=160, **data) -> PretrainDataModule:
    dm = PretrainDataModule({"en": SourceConfig(url=str(corpus["en"])), "tasks": SourceConfig(url=url, format="task")},
                            tokenizer_vocab_size=300, seq_len=seq_len, val_windows=2, **data)
    dm.prompts = TaskPrompts(dm.vocab_size, num_tasks, PROMPT_LEN)
    dm.prepare_data()
    dm.setup()
    return dm


def tiny(dm, position="relative_buckets", num_tasks=6) -> CPMAnt:
    torch.manual_seed(0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=dm.vocab_size, num_tasks=num_tasks, prompt_len=PROMPT_LEN,
                              position=position))
    model.init_weights()
    return model.eval()


def packed(model, w) -> torch.Tensor:
    return model(w["input_ids"][None], segment_ids=w["segment_ids"][None], context=w["context"][None],
                 sample_ids=w["sample_ids"][None])[0]


def spans(w) -> list[torch.Tensor]:
    """The positions of each sample of a window, in order."""
    return [torch.nonzero(w["sample_ids"] == k).flatten() for k in range(1, int(w["sample_ids"].max()) + 1)]


def test_a_sample_is_the_tasks_prompt_then_its_input_as_context_then_its_output(corpus, tasks_file):
    dm = task_dm(corpus, tasks_file)
    tok, V = dm.text_tokenizer, dm.vocab_size
    w = dm.window("tasks", 0)
    first = spans(w)[0]
    line = task_lines()[0]  # translate
    ids = tok.encode(input_text(line["input"], line.get("context")))
    out = tok.encode(line["output"])
    row = TASK_PROMPTS["translate"]
    assert w["input_ids"][first].tolist() == [V + row * PROMPT_LEN + j for j in range(PROMPT_LEN)] + ids + out
    assert w["targets"][first].tolist() == [IGNORE] * (PROMPT_LEN + len(ids) - 1) + out + [tok.eos_id]
    assert w["segment_ids"][first].tolist() == [0] * PROMPT_LEN + [INPUT_SEGMENT] * len(ids) + [OUTPUT_SEGMENT] * len(out)
    assert w["context"][first].tolist() == [True] * (PROMPT_LEN + len(ids)) + [False] * len(out)
    # A window holds whole samples, then padding that no sample sees and no loss counts.
    assert len(spans(w)) >= 2
    pad = w["sample_ids"] == 0
    assert (w["targets"][pad] == IGNORE).all() and int(pad.sum()) < len(dm.window("tasks", 1)["input_ids"])
    # Text windows in a mixture with tasks: one causal sample in segment 0.
    text = dm.window("en", 0)
    assert text["sample_ids"].unique().tolist() == [1] and not text["context"].any() and not text["segment_ids"].any()


@pytest.mark.parametrize("position", ["relative_buckets", "rotary"])
def test_a_packed_samples_logits_are_those_of_the_sample_alone(corpus, tasks_file, position):
    dm = task_dm(corpus, tasks_file)
    model = tiny(dm, position)
    V = dm.vocab_size
    with torch.no_grad():
        for i in range(3):
            w = dm.window("tasks", i)
            logits = packed(model, w)
            for span in spans(w):
                ids, seg, ctx = w["input_ids"][span], w["segment_ids"][span], w["context"][span]
                row = int(ids[0] - V) // PROMPT_LEN
                alone = model(ids[None, PROMPT_LEN:], segment_ids=seg[None, PROMPT_LEN:], context=ctx[None, PROMPT_LEN:],
                              task=torch.tensor([row]))[0]
                torch.testing.assert_close(logits[span[PROMPT_LEN:]], alone, atol=1e-5, rtol=0)


def test_without_prompt_rows_a_sample_has_no_prompt_positions_and_a_warning_says_so(corpus, tasks_file, capsys):
    dm = task_dm(corpus, tasks_file, num_tasks=0)
    assert "the samples of qa, translate have no prompt positions" in capsys.readouterr().err
    w = dm.window("tasks", 0)
    assert (w["input_ids"] < dm.vocab_size).all()
    model = tiny(dm, num_tasks=0)
    with torch.no_grad():
        logits = packed(model, w)
        for span in spans(w):
            alone = model(w["input_ids"][None, span], segment_ids=w["segment_ids"][None, span],
                          context=w["context"][None, span])[0]
            torch.testing.assert_close(logits[span], alone, atol=1e-5, rtol=0)


def test_the_loss_counts_only_the_outputs(corpus, tmp_path, tasks_file):
    lines = task_lines()
    changed_input = [dict(line) for line in lines]
    changed_input[0]["input"] = "子曰：「溫故而知新，可以為師矣。」"
    changed_output = [dict(line) for line in lines]
    changed_output[0]["output"] = "Is it not pleasant to learn with a constant perseverance?"
    base = task_dm(corpus, tasks_file).window("tasks", 0)
    inp = task_dm(corpus, write_tasks(tmp_path / "inp.jsonl", changed_input)).window("tasks", 0)
    outp = task_dm(corpus, write_tasks(tmp_path / "outp.jsonl", changed_output)).window("tasks", 0)
    output_targets = lambda w: w["targets"][w["targets"] != IGNORE].tolist()  # noqa: E731
    assert output_targets(inp) == output_targets(base)  # an input token is no target
    assert output_targets(outp) != output_targets(base)
    # The gradient of the loss reaches only the positions that predict an output token or EOS.
    dm = task_dm(corpus, tasks_file)
    logits = packed(tiny(dm), base).detach().requires_grad_()
    cross_entropy(logits, base["targets"]).backward()
    predicts_output = base["targets"] != IGNORE
    assert (logits.grad[~predicts_output] == 0).all()
    assert (logits.grad[predicts_output].abs().sum(-1) > 0).all()
    assert ((base["segment_ids"] == OUTPUT_SEGMENT) <= predicts_output).all()


def test_an_input_token_sees_later_input_an_output_token_no_later_output_and_no_sample_another(corpus, tasks_file):
    dm = task_dm(corpus, tasks_file)
    model = tiny(dm)
    w = dm.window("tasks", 0)
    a, b = spans(w)[:2]
    with torch.no_grad():
        before = packed(model, w)

        def after_changing(position):
            ids = w["input_ids"].clone()
            ids[position] = (ids[position] + 1) % dm.vocab_size
            return packed(model, {**w, "input_ids": ids})

        in_b = b[(w["segment_ids"][b] == INPUT_SEGMENT)]
        out_b = b[(w["segment_ids"][b] == OUTPUT_SEGMENT)]
        changed = after_changing(in_b[-1])  # the last input token of sample b
        assert not torch.allclose(changed[in_b[0]], before[in_b[0]])  # seen by b's first input token
        torch.testing.assert_close(changed[a], before[a], atol=0, rtol=0)  # not by sample a's context
        changed = after_changing(out_b[-1])
        torch.testing.assert_close(changed[out_b[:-1]], before[out_b[:-1]], atol=0, rtol=0)
        assert not torch.allclose(changed[out_b[-1]], before[out_b[-1]])
        changed = after_changing(a[PROMPT_LEN])  # sample a's first input token
        torch.testing.assert_close(changed[b], before[b], atol=0, rtol=0)


def test_long_inputs_are_cut_from_the_left_with_a_count_or_refused(corpus, tmp_path, capsys):
    long = {"task": "summarize", "input": " ".join([conftest.EN[0]] * 6), "output": "a truth"}
    url = write_tasks(tmp_path / "long.jsonl", [long, *task_lines(80)[::2]])  # translations
    dm = task_dm(corpus, url, seq_len=64)
    assert "cut the inputs of 1 of 41 samples from the left to fit data.seq_len=64" in capsys.readouterr().err
    w = dm.window("tasks", 0)
    first = spans(w)[0]
    tok = dm.text_tokenizer
    full = tok.encode(long["input"])
    kept = w["input_ids"][first][PROMPT_LEN:][w["segment_ids"][first][PROMPT_LEN:] == INPUT_SEGMENT].tolist()
    assert len(first) == 64 and kept == full[len(full) - len(kept):]
    with pytest.raises(UserError, match=r"data.sources.tasks: 1 of 41 samples are longer than data.seq_len=64 "
                                        r"\(the first: sample 0\)"):
        task_dm(corpus, url, seq_len=64, task_overflow="refuse")
    too_long = write_tasks(tmp_path / "out.jsonl", [{**long, "input": "Sum up.", "output": long["input"]}, *task_lines(80)[::2]])
    with pytest.raises(UserError, match=r"data.sources.tasks: sample 0 has an output of \d+ tokens: with its prompt \(4\) "
                                        r"and an input token it does not fit data.seq_len=64"):
        task_dm(corpus, too_long, seq_len=64)


def test_a_run_config_may_name_more_tasks_with_their_rows(corpus, tmp_path):
    url = write_tasks(tmp_path / "t.jsonl", [{**line, "task": "poem"} for line in task_lines(40)])
    dm = task_dm(corpus, url, num_tasks=8, tasks={"poem": 7})
    assert dm.window("tasks", 0)["input_ids"][0] == dm.vocab_size + 7 * PROMPT_LEN
    with pytest.raises(UserError, match="data.tasks.qa: 'qa' is a built-in task"):
        PretrainDataModule({"t": SourceConfig(url=url, format="task")}, tasks={"qa": 9})
    with pytest.raises(UserError, match="data.tasks.poem: the prompt row must be an integer from 6"):
        PretrainDataModule({"t": SourceConfig(url=url, format="task")}, tasks={"poem": 2})


BAD_LINES = [
    ({"task": "qa", "input": "Who?"}, "no string 'output'; expected a task sample {\"task\": ..., \"input\": ..., "
     "\"output\": ..., \"context\": ... (optional)}"),
    ({"task": "qa", "input": "Who?", "output": " "}, "the output is empty"),
    ({"task": "qa", "output": "him"}, "no string 'input'; expected a task sample"),
    ({"task": "qa", "input": "Who?", "output": "him", "context": 3}, "'context' is not a string"),
    (["qa", "Who?"], "not a JSON object; expected a task sample"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_a_bad_task_line_is_one_line_naming_it_and_prepares_nothing(tmp_path, corpus, capsys, line, message):
    url = write_tasks(tmp_path / "tasks.jsonl", [task_lines(1)[0], line])
    config = conftest.write_config(tmp_path / "c.yaml", corpus)
    data = yaml.safe_load(config.read_text())
    data["data"]["sources"]["tasks"] = {"url": url, "format": "task"}
    config.write_text(yaml.safe_dump(data))
    err = conftest.cli_error(capsys, "data", "prepare", "--config", str(config))
    assert err.startswith(f"data.sources.tasks: {url}:2: {message}"), err
    metas = (tmp_path / "cache" / "shards").glob("*/meta.json")
    assert not [m for m in metas if json.loads(m.read_text())["source"] == "tasks"]


def fit_config(tmp_path, corpus, tasks_url, name="run", **overrides):
    config = conftest.write_config(tmp_path / f"{name}.yaml", corpus, **{
        "trainer.default_root_dir": str(tmp_path / name), "model.arch.num_tasks": 6, "model.arch.prompt_len": PROMPT_LEN,
        "data.seq_len": 64, **overrides})
    data = yaml.safe_load(config.read_text())
    data["data"]["sources"]["tasks"] = {"url": tasks_url, "format": "task", "weight": 0.5}
    config.write_text(yaml.safe_dump(data))
    return config


def test_an_unknown_task_is_refused_with_the_valid_names_before_training(tmp_path, corpus, capsys):
    url = write_tasks(tmp_path / "tasks.jsonl", [*task_lines(30), {"task": "chat", "input": "Hello", "output": "Hi"}])
    err = conftest.cli_error(capsys, "fit", "--config", str(fit_config(tmp_path, corpus, url)))
    assert err == ("data.sources.tasks: unknown task 'chat' (in " + url + "); the tasks are qa, summarize, translate "
                   "(more are named in data.tasks)")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_resume_with_a_task_source_gives_the_same_batches_and_losses(tmp_path, corpus, tasks_file):
    def run(name, *extra):
        config = fit_config(tmp_path, corpus, tasks_file, name, **{"trainer.max_steps": 6})
        data = yaml.safe_load(config.read_text())
        data["trainer"]["callbacks"] = [{"class_path": "conftest.RecordBatches"}]
        config.write_text(yaml.safe_dump(data))
        conftest.RECORDED.clear()
        main(["fit", "--config", str(config), *extra])
        return list(conftest.RECORDED)

    straight = run("straight")
    resumed = run("resumed", "--trainer.max_steps=3") + run("resumed", "--ckpt_path=last")
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4, 5, 6]
    vocab = PretrainDataModule(**yaml.safe_load((tmp_path / "straight.yaml").read_text())["data"]).vocab_size
    assert any((ids >= vocab).any() for _, ids, _ in straight)  # task prompts were trained on
    for (_, a, loss_a), (_, b, loss_b) in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
        assert loss_a == pytest.approx(loss_b, abs=1e-6)
