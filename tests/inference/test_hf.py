"""Hugging Face both ways (issue 11): the model computes what transformers' CpmAnt port computes,
`convert to-hf` writes directories transformers opens with equal logits and generations,
`convert from-hf` reads them back, the tokenizers agree id for id, and the bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import EN, ZH, cli_error, english_text, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer, CpmAntConfig, CpmAntForCausalLM

from cpm_lightning.checkpoint.modeldir import open_model_dir, write_model_dir
from cpm_lightning.cli.main import main
from cpm_lightning.core.loss import cross_entropy
from cpm_lightning.core.tokenizer import CpmAntTokenizer, train_tokenizer
from cpm_lightning.inference.generate import prompt_inputs, sample
from cpm_lightning.inference.hf.convert import read_hf
from cpm_lightning.model import ArchConfig, CPMAnt, KVCache

# Text none of the tokenizers here was trained on: other Analects, other Austen, whitespace runs,
# digits, a rare character and an emoji (byte fallback).
HELD_OUT = ["子曰：「溫故而知新，可以為師矣。」", "學而不思則罔，思而不學則殆。 龘 😀",
            "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.",
            "  two spaces\n\nand\ttabs, 1999 digits; 中文 mixed with English.", "\nstarts with a newline", ""]
CPM_ANT_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "</_>", "</n>", "<d>", "</d>"]


@pytest.fixture(scope="module")
def sp():
    return train_tokenizer([english_text(60)] + [z * 3 for z in ZH], 400)


def cpm_ant_vocab(path: Path, size: int) -> Path:
    """A CPM-Ant vocab.txt of `size` tokens: its special tokens, words and characters of the test
    corpora, then fillers."""
    words = sorted({w for t in EN for w in re.findall(r"[A-Za-z]+", t)} | set("".join(ZH)) | set("abcdefghijklmnopqrstuvwxyz,."))
    tokens = CPM_ANT_SPECIALS + words
    tokens += [f"<extra_{i}>" for i in range(size - len(tokens))]
    path.write_text("\n".join(tokens[:size]) + "\n")
    return path


def project_model(vocab_size: int, seed: int = 0, **arch) -> CPMAnt:
    """A tiny model with random weights that make varied logits: norms away from 1, embeddings
    with equal row norms (no token wins everywhere)."""
    torch.manual_seed(seed)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=vocab_size, **arch))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name in ("segment_embedding", "prompt_embedding"):
                p.normal_()
        model.embedding.normal_()
        model.embedding.mul_(32 / model.embedding.norm(dim=1, keepdim=True))
    return model.eval()


def write_project_dir(path: Path, model: CPMAnt, tokenizer) -> Path:
    write_model_dir(path, model.state_dict(), model.cfg.to_dict(), tokenizer)
    return path


def step_logits(model: CPMAnt, prompt: list[int], continuation: list[int], prompting: str) -> torch.Tensor:
    """Our logits at each step of decoding `continuation` after `prompt` with the KV cache."""
    cache = KVCache(model, 1, model.cfg.max_len)
    ids = torch.tensor([prompt])
    out = [model(ids, **prompt_inputs(model, ids, prompting), cache=cache)[0, -1]]
    for token in continuation[:-1]:
        ids = torch.tensor([[token]])
        out.append(model(ids, **prompt_inputs(model, ids, prompting, first=False), cache=cache)[0, -1])
    return torch.stack(out)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


# -- fidelity -----------------------------------------------------------------------------------
def random_cpmant(tmp_path: Path, vocab_size: int = 300, tie: bool = True) -> tuple[CpmAntForCausalLM, Path]:
    """transformers' CpmAntForCausalLM with random non-trivial weights, saved with a vocab.txt."""
    config = CpmAntConfig(vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, dim_head=16, dim_ff=128,
                          num_hidden_layers=2, position_bias_num_buckets=32, position_bias_max_distance=128,
                          prompt_types=4, prompt_length=8, segment_types=4)
    torch.manual_seed(0)
    hf = CpmAntForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name or "embedding" in name:
                p.normal_()
            else:
                p.normal_(0, p.shape[1] ** -0.5)
        hf.lm_head.weight.copy_(hf.cpmant.input_embedding.weight[:vocab_size])
        if not tie:
            hf.lm_head.weight.add_(0.1)
    hf.save_pretrained(tmp_path / "cpmant")
    cpm_ant_vocab(tmp_path / "cpmant" / "vocab.txt", vocab_size)
    return hf, tmp_path / "cpmant"


# flex: FlexAttention's compiled CPU kernel (model/attention.py), one compile. chunked: chunks of
# 6 of the 20 (prompt and text) positions, the last one partial.
@pytest.mark.parametrize("attention", ["sdpa", "chunked", pytest.param("flex", marks=pytest.mark.slow)])
def test_model_computes_what_cpmant_for_causal_lm_computes(tmp_path, attention):
    """Same weights, a batch with the task prompt (segment 0), text (segment 2) and left padding:
    equal logits wherever there is text."""
    hf, directory = random_cpmant(tmp_path)
    model = read_hf(directory).build()
    model.attention_kernel, model.attention_chunk = attention, 6
    ids = torch.randint(1, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = 0  # left padding
    ids[1, :9] = 0
    mask = ids != 0
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids, **prompt_inputs(model, ids, "cpm-ant", attention_mask=mask))
    assert expected[mask].abs().max() > 10
    assert (got - expected)[mask].abs().max() <= 1e-4


# -- to-hf ----------------------------------------------------------------------------------------
TARGETS = {
    "LlamaForCausalLM": dict(position="rotary", ffn="swiglu", num_kv_heads=2, split_qk_scale=True, num_ffn_layers=1),
    "CpmAntForCausalLM": dict(num_tasks=4, prompt_len=8, num_attn_layers=1),
}


@pytest.mark.parametrize("architecture", TARGETS)
def test_to_hf_opens_in_transformers_with_equal_logits_and_generations(architecture, sp, tmp_path):
    model = project_model(sp.vocab_size, **TARGETS[architecture])  # a pruned sublayer each
    main(["convert", "to-hf", str(write_project_dir(tmp_path / "ours", model, sp)), str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == architecture
    prompting = "cpm-ant" if architecture == "CpmAntForCausalLM" else "causal"

    prompt = sp.encode(EN[0])
    assert tokenizer(EN[0]).input_ids == prompt
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids, **prompt_inputs(model, ids, prompting))
    assert (got - expected).abs().max() <= 1e-4

    out = hf.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    generated = out.sequences[0, len(prompt):].tolist()
    assert len(generated) == 20 and len(set(generated)) > 1
    assert sample(model, prompt, 20, temperature=0, prompting=prompting) == generated
    with torch.no_grad():  # and the logits of every step, through the KV cache
        assert (step_logits(model, prompt, generated, prompting) - torch.cat(out.logits)).abs().max() <= 1e-4


def test_docs_snippet_runs_against_an_exported_model(sp, tmp_path):
    page = (Path(__file__).parents[2] / "docs" / "huggingface.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert len(snippet.strip().splitlines()) == 3
    main(["convert", "to-hf", str(write_project_dir(tmp_path / "ours", project_model(sp.vocab_size), sp)), str(tmp_path / "hf")])
    scope = {"PATH": str(tmp_path / "hf")}
    exec(snippet, scope)  # noqa: S102 - the page's own three lines
    assert scope["text"].startswith("It is a truth") and len(scope["text"]) > len("It is a truth")


# -- from-hf --------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", TARGETS)
def test_round_trip_project_hf_project_is_bitwise(architecture, sp, tmp_path):
    """Bitwise wherever the format can hold the weights: the folded scales are powers of two
    when dim and every linear's input width are powers of 4 (ff_dim 256 here). Llama holds no
    segment embeddings: segment 0's comes back as the difference of its two embeddings."""
    arch = {**TARGETS[architecture], "split_qk_scale": False, "ff_dim": 256}
    model = project_model(sp.vocab_size, **arch)
    main(["convert", "to-hf", str(write_project_dir(tmp_path / "ours", model, sp)), str(tmp_path / "hf")])
    main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    back = open_model_dir(tmp_path / "back")
    assert back.arch == {**model.cfg.to_dict(), "preset": "tiny"}
    assert back.tokenizer.model_bytes == sp.model_bytes
    original = model.state_dict()
    assert back.shapes.keys() == original.keys()
    for name, weight in original.items():
        if architecture == "LlamaForCausalLM" and name == "segment_embedding":
            torch.testing.assert_close(back.read(name)[0], weight[0], rtol=0, atol=1e-5)
        else:
            assert torch.equal(back.read(name), weight), name


def test_round_trip_of_other_widths_is_within_one_ulp(sp, tmp_path):
    """ff_dim 128: w_out's scale 1/sqrt(128) is no power of two; float32 cannot do better."""
    model = project_model(sp.vocab_size)
    main(["convert", "to-hf", str(write_project_dir(tmp_path / "ours", model, sp)), str(tmp_path / "hf")])
    main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    back = open_model_dir(tmp_path / "back")
    for name, weight in model.state_dict().items():
        assert ((back.read(name) - weight).abs() <= torch.finfo(torch.float32).eps * weight.abs()).all(), name


def test_cpm_ant_directory_imports_and_generates(tmp_path, capsys):
    """A CPM-Ant directory (vocab.txt tokenizer, 4 task prompts): from-hf, then `generate`
    prompts it the CPM-Ant way by default, with CPM-Ant's tokenizer."""
    hf, directory = random_cpmant(tmp_path)
    main(["convert", "from-hf", str(directory), str(tmp_path / "imported")])
    stored = open_model_dir(tmp_path / "imported")
    assert isinstance(stored.tokenizer, CpmAntTokenizer) and (tmp_path / "imported" / "vocab.txt").is_file()
    prompt = "子曰學而時習之"
    ids = stored.tokenizer.encode(prompt)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    capsys.readouterr()
    main(["generate", str(tmp_path / "imported"), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out.rstrip("\n") == stored.tokenizer.decode(ids + expected)


# -- tokenizers -----------------------------------------------------------------------------------
def test_exported_tokenizer_encodes_held_out_bilingual_text_as_sentencepiece(sp, tmp_path):
    main(["convert", "to-hf", str(write_project_dir(tmp_path / "ours", project_model(sp.vocab_size), sp)), str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in HELD_OUT:
        ids = sp.encode(text)
        assert tokenizer(text).input_ids == ids, text
        assert tokenizer.decode(ids) == text == sp.decode(ids)


def test_cpm_ant_tokenizer_matches_transformers(tmp_path):
    from transformers import CpmAntTokenizer as Reference

    vocab = cpm_ant_vocab(tmp_path / "vocab.txt", 400)
    ours, reference = CpmAntTokenizer(vocab.read_bytes()), Reference(str(vocab))
    for text in HELD_OUT + ZH + EN:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.vocab_size == reference.vocab_size


# -- fit from an imported directory ---------------------------------------------------------------
class RecordFirstBatch(L.Callback):
    """Keeps each training batch and its loss (named by class path in a run config)."""

    seen: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RecordFirstBatch.seen.append(({k: v.clone() for k, v in batch.items()}, float(outputs["loss"])))


def test_fit_from_an_imported_directory_starts_at_its_loss(sp, tmp_path, corpus):
    model = project_model(sp.vocab_size, position="rotary")
    main(["convert", "to-hf", str(write_project_dir(tmp_path / "ours", model, sp)), str(tmp_path / "hf")])
    main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "imported")])
    config = write_config(tmp_path / "config.yaml", corpus, **{
        "trainer.max_steps": 2, "trainer.logger": False, "trainer.limit_val_batches": 0,
        "trainer.precision": "32-true",  # compared with the fp32 forward below, not auto's bf16
        "trainer.callbacks": [{"class_path": "test_hf.RecordFirstBatch"}]})
    RecordFirstBatch.seen.clear()
    main(["fit", "--config", str(config), "--checkpoint.init_from", str(tmp_path / "imported")])
    (batch, loss), (_, later) = RecordFirstBatch.seen
    imported = open_model_dir(tmp_path / "imported").build()
    with torch.no_grad():
        expected = cross_entropy(imported(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten(), 0.0)
    assert loss == pytest.approx(float(expected), abs=1e-6) and later != loss


def test_fit_init_from_refuses_a_conflicting_architecture(sp, tmp_path, corpus, capsys):
    directory = write_project_dir(tmp_path / "ours", project_model(sp.vocab_size), sp)
    config = write_config(tmp_path / "config.yaml", corpus, **{"trainer.logger": False})
    assert cli_error(capsys, "fit", "--config", str(config), "--checkpoint.init_from", str(directory),
                     "--model.arch.position", "rotary") == (
        f"model.arch.position is 'rotary' in this run, but checkpoint.init_from {directory} holds a model with "
        "position 'relative_buckets'; leave it unset or give 'relative_buckets'")


# -- bad input ------------------------------------------------------------------------------------
def test_source_that_is_not_a_model(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    error = cli_error(capsys, "convert", "to-hf", str(corpus["en"]), str(out))
    assert error.startswith(f"{corpus['en']}: not a readable checkpoint")
    assert_nothing_written(out)


def test_hf_directory_of_another_architecture(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = tmp_path / "out"
    assert cli_error(capsys, "convert", "from-hf", str(tmp_path / "gpt2"), str(out)) == (
        f"{tmp_path / 'gpt2'}: a GPT2LMHeadModel model; convert from-hf reads CpmAntForCausalLM or LlamaForCausalLM")
    assert_nothing_written(out)


def test_hf_directory_without_or_with_a_mismatched_tokenizer(tmp_path, capsys):
    _, directory = random_cpmant(tmp_path)
    out = tmp_path / "out"
    (directory / "vocab.txt").rename(tmp_path / "vocab.txt")
    assert cli_error(capsys, "convert", "from-hf", str(directory), str(out)) == (
        f"{directory}: no tokenizer cpm-lightning reads: expected vocab.txt (CPM-Ant) or tokenizer.model "
        "(SentencePiece); found none")
    assert_nothing_written(out)
    cpm_ant_vocab(directory / "vocab.txt", 400)  # 400 tokens for a 300-token model
    assert cli_error(capsys, "convert", "from-hf", str(directory), str(out)) == (
        f"{directory}: the tokenizer ({directory / 'vocab.txt'}) has 400 tokens, more than the model's vocab_size "
        "300; expected the tokenizer the model was trained with")
    assert_nothing_written(out)


def test_out_dir_that_is_not_empty_needs_force(sp, tmp_path, capsys):
    source = str(write_project_dir(tmp_path / "ours", project_model(sp.vocab_size), sp))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_error(capsys, "convert", "to-hf", source, str(out)) == (
        f"{out}: exists and is not empty; expected a new or empty directory (--force replaces it)")
    assert (out / "keep.txt").read_text() == "mine" and not list(tmp_path.glob(".out.partial-*"))
    main(["convert", "to-hf", source, str(out), "--force"])
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_lm_head_not_tied_to_the_input_embedding(tmp_path, capsys):
    _, directory = random_cpmant(tmp_path, tie=False)
    out = tmp_path / "out"
    assert cli_error(capsys, "convert", "from-hf", str(directory), str(out)) == (
        f"{directory}: lm_head.weight is not tied to cpmant.input_embedding.weight; cpm-lightning's model uses one "
        "table for both")
    assert_nothing_written(out)


@pytest.mark.parametrize("arch, message", [
    (dict(norm="layernorm"), "model.arch.norm is layernorm: CpmAntForCausalLM has RMSNorm only"),
    (dict(position="rotary", norm="layernorm"), "model.arch.norm is layernorm: LlamaForCausalLM has RMSNorm only"),
    (dict(ffn="swiglu"), "model.arch.ffn is swiglu: CpmAntForCausalLM has a gated-GeLU FFN only"),
    (dict(position="rotary", num_tasks=2), "model.arch.num_tasks is 2: LlamaForCausalLM has no task prompts"),
], ids=["layernorm", "layernorm-rotary", "swiglu-buckets", "tasks-rotary"])
def test_architecture_neither_target_expresses_is_refused(arch, message, sp, tmp_path, capsys):
    source = str(write_project_dir(tmp_path / "ours", project_model(sp.vocab_size, **arch), sp))
    out = tmp_path / "out"
    assert cli_error(capsys, "convert", "to-hf", source, str(out)) == message
    assert_nothing_written(out)
