"""GGUF for llama.cpp (issue 23): `convert to-gguf` writes every tensor of the Llama export in
llama.cpp's layout and the tokenizer in the file, read back with `gguf`'s own reader; llama.cpp
(llama-cpp-python) loads the file and computes our logits and greedy tokens; and the bad inputs,
each one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import EN, ZH, cli_error, english_text
from safetensors.torch import load_file
from sentencepiece import sentencepiece_model_pb2
from test_hf import cpm_ant_vocab, project_model, step_logits, write_project_dir

from cpm_lightning.checkpoint.modeldir import write_model_dir
from cpm_lightning.cli.main import main
from cpm_lightning.core.precision import Precision
from cpm_lightning.core.tokenizer import CpmAntTokenizer, train_tokenizer
from cpm_lightning.inference.generate import sample
from cpm_lightning.inference.gguf import gguf_greedy, gguf_logits
from cpm_lightning.inference.hf.mapping import _halves

ROTARY = dict(position="rotary", ffn="swiglu")
# Grouped-query, and heads wider than dim / num_heads (CPM-Ant's are their own width): what
# llama.cpp must read from the file rather than derive.
SHAPE = dict(num_kv_heads=2, head_dim=32)
VOCAB = 416  # above the tokenizer's pieces: the file pads its token list with fillers
PROMPTS = [EN[0][:60], ZH[0][:20], "Emma Woodhouse, handsome, clever, and rich"]


@pytest.fixture(scope="module")
def sp():
    return train_tokenizer([english_text(60)] + [z * 3 for z in ZH], 400)


@pytest.fixture(scope="module")
def model(sp):
    return project_model(VOCAB, **ROTARY, **SHAPE)


@pytest.fixture(scope="module")
def model_dir(model, sp, tmp_path_factory) -> Path:
    return write_project_dir(tmp_path_factory.mktemp("gguf") / "model", model, sp)


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory) -> dict[str, Path]:
    """The model converted at each weight type, and its Llama export (to-hf)."""
    root = tmp_path_factory.mktemp("files")
    out = {}
    for weights, flags in (("float32", []), ("float16", ["--dtype", "float16"]), ("q8_0", ["--quantize", "q8_0"]),
                           ("q4_0", ["--quantize", "q4_0"])):
        out[weights] = root / f"{weights}.gguf"
        main(["convert", "to-gguf", str(model_dir), str(out[weights]), *flags])
    main(["convert", "to-hf", str(model_dir), str(root / "hf")])
    out["hf"] = root / "hf"
    return out


def read(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def as_float(t: gguf.ReaderTensor) -> np.ndarray:
    """A tensor of the file as float32, in numpy's row-major shape (rows = output features)."""
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))


def hf_names(num_blocks: int) -> dict[str, str]:
    """GGUF name -> the Llama export's name, by llama.cpp's own table."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_blocks)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(num_blocks):
        names += [f"model.layers.{i}.{n}.weight" for n in (
            "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return {table.get_name(n, try_suffixes=(".weight",)): n for n in names}


def test_every_tensor_is_the_llama_exports_with_q_and_k_in_adjacent_pair_order(files, model):
    hf = load_file(files["hf"] / "model.safetensors")
    tensors = read(files["float32"])
    names = hf_names(model.cfg.num_blocks)
    assert set(tensors) == set(names) and len(tensors) == len(hf)
    head = model.cfg.head_dim
    for name, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        ours, theirs = torch.from_numpy(as_float(t)), hf[names[name]]
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            # to-hf puts each head's even rows first (rotate-half); llama.cpp turns adjacent pairs.
            assert not torch.equal(ours, theirs)
            ours = ours.unflatten(0, (-1, head))[:, _halves(head)].flatten(0, 1)
        assert torch.equal(ours, theirs), name


def test_float16_and_quantized_files_hold_the_float32_weights_within_their_rounding(files):
    exact = {name: as_float(t) for name, t in read(files["float32"]).items()}
    # The largest error of one weight, relative to its row's largest magnitude: float16 rounds
    # to 11 bits; q8_0 rounds to half a step of max/127 per block of 32; q4_0 has steps of max/8
    # from -8 to 7, so a weight of the other sign than the block's largest clips to 7/8 of it;
    # both keep their scale in float16.
    bounds = {"float16": 2**-11, "q8_0": 0.5 / 127 + 2**-10, "q4_0": 1 / 8 + 2**-10}
    for weights, bound in bounds.items():
        for name, t in read(files[weights]).items():
            if len(t.shape) == 1:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32, name  # norms: F32, as llama.cpp's
                assert np.array_equal(as_float(t), exact[name])
                continue
            expected = {"float16": "F16", "q8_0": "Q8_0", "q4_0": "Q8_0" if name == "output.weight" else "Q4_0"}
            assert t.tensor_type.name == expected[weights], name
            rows = exact[name]
            scale = np.abs(rows).max(axis=1, keepdims=True)
            assert (np.abs(as_float(t) - rows) <= bound * scale).all(), (weights, name)


def test_the_tokenizer_and_hyperparameters_are_in_the_file(files, sp, model):
    reader = gguf.GGUFReader(files["q8_0"])
    field = {name: f.contents() for name, f in reader.fields.items()}
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.model_bytes)
    fillers = VOCAB - len(proto.pieces)
    assert fillers > 0
    assert field["tokenizer.ggml.model"] == "llama"
    assert field["tokenizer.ggml.tokens"] == [p.piece for p in proto.pieces] + [f"[PAD{i}]" for i in range(len(proto.pieces), VOCAB)]
    assert np.allclose(field["tokenizer.ggml.scores"], [p.score for p in proto.pieces] + [-1000.0] * fillers)
    types = field["tokenizer.ggml.token_type"]
    assert types == [int(p.type) for p in proto.pieces] + [gguf.TokenType.UNUSED] * fillers
    assert {types[sp.sp.unk_id()], types[sp.sp.bos_id()], types[sp.sp.piece_to_id("<0x41>")],
            types[sp.sp.piece_to_id("\n")]} == {gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.BYTE,
                                                gguf.TokenType.USER_DEFINED}
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.eos_token_id"],
            field["tokenizer.ggml.unknown_token_id"], field["tokenizer.ggml.padding_token_id"]) == (
        sp.sp.bos_id(), sp.sp.eos_id(), sp.sp.unk_id(), sp.sp.pad_id())
    assert field["tokenizer.ggml.add_bos_token"] is False and field["tokenizer.ggml.add_space_prefix"] is True
    cfg = model.cfg
    assert (field["general.architecture"], field["llama.block_count"], field["llama.embedding_length"],
            field["llama.feed_forward_length"], field["llama.attention.head_count"],
            field["llama.attention.head_count_kv"], field["llama.attention.key_length"],
            field["llama.rope.dimension_count"], field["llama.context_length"], field["llama.vocab_size"]) == (
        "llama", cfg.num_blocks, cfg.dim, cfg.ff_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim,
        cfg.max_len, VOCAB)
    assert field["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field["llama.rope.freq_base"] == cfg.rope_base and np.isclose(field["llama.attention.layer_norm_rms_epsilon"],
                                                                          cfg.norm_eps)


# -- llama.cpp ----------------------------------------------------------------------------------
NEW_TOKENS = 24
# The largest difference of llama.cpp's last-position logits from ours, relative to the largest
# logit (measured: 9.5e-4, 2.0e-3 and 3.5e-2): llama.cpp keeps its KV cache in float16 and, for
# float16 and q8_0 weights, rounds the activations to the weights' type before each product.
LOGIT_BOUNDS = {"float32": 2e-3, "float16": 5e-3, "q8_0": 6e-2}


@pytest.fixture(scope="module")
def ours(model, sp):
    prompts = [sp.encode(p) for p in PROMPTS]
    greedy = [sample(model, p, NEW_TOKENS, temperature=0.0, eos_id=sp.eos_id) for p in prompts]
    return prompts, greedy


@pytest.mark.parametrize("weights", ["float32", "float16", "q8_0"])
def test_llama_cpp_computes_our_logits_and_greedy_tokens(files, model, sp, ours, weights):
    prompts, greedy = ours
    logits = gguf_logits(files[weights], prompts, threads=1)
    for prompt, theirs in zip(prompts, logits, strict=True):
        expected = model(torch.tensor([prompt]))[0, -1].detach().numpy()
        assert np.abs(theirs - expected).max() <= LOGIT_BOUNDS[weights] * np.abs(expected).max()
    assert gguf_greedy(files[weights], prompts, NEW_TOKENS, eos_id=sp.eos_id, threads=1) == greedy


def test_llama_cpp_q4_0_stays_near_our_logits(files, model, ours):
    """4 bits a weight change the logits visibly; the greedy agreement is stated in
    docs/inference.md, not asserted. What is asserted: the logits stay correlated with ours."""
    prompts, _ = ours
    for prompt, theirs in zip(prompts, gguf_logits(files["q4_0"], prompts, threads=1), strict=True):
        expected = model(torch.tensor([prompt]))[0, -1].detach().numpy()
        assert np.corrcoef(theirs, expected)[0, 1] > 0.9


def test_llama_cpp_logits_along_a_continuation_are_ours(files, model, ours):
    """Position by position along our greedy continuation (the rotary angle grows with each):
    the last-position logits of each prefix are ours with the KV cache."""
    (prompt, *_), (greedy, *_) = ours
    expected = step_logits(model, prompt, greedy, "causal").detach().numpy()
    prefixes = [prompt + greedy[:i] for i in range(len(greedy))]
    theirs = np.stack(gguf_logits(files["float32"], prefixes, threads=1))
    assert np.abs(theirs - expected).max() <= LOGIT_BOUNDS["float32"] * np.abs(expected).max()


def test_llama_cpp_reads_the_tokenizer(files, sp):
    """llama.cpp decodes our ids to our text, and its own tokens of a text decode to that text.
    Its ids are not always SentencePiece's: it merges pieces greedily by score where SentencePiece
    finds the likeliest split (docs/inference.md), so comparisons go through token ids."""
    from llama_cpp import Llama

    llm = Llama(str(files["q8_0"]), vocab_only=True, verbose=False)
    for text in PROMPTS + EN + ZH:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        # A leading "▁" stands for the space SentencePiece puts before every text.
        assert llm.detokenize(ids).decode() == llm.detokenize(sp.encode(text)).decode() == " " + text
        assert sp.decode(ids) == text


# -- bad input ----------------------------------------------------------------------------------
def converting(capsys, tmp_path: Path, source: Path, *flags: str, out: str = "out.gguf") -> str:
    """The one-line error of converting `source` into tmp_path/out, with nothing written there."""
    before = sorted(tmp_path.rglob("*"))
    message = cli_error(capsys, "convert", "to-gguf", str(source), str(tmp_path / out), *flags)
    assert sorted(tmp_path.rglob("*")) == before
    return message


def test_models_llama_cpp_cannot_run_are_refused_naming_what_it_lacks(capsys, tmp_path, sp):
    cases = {
        "buckets": ({}, sp, "model.arch.position is relative_buckets: llama.cpp has no T5-style relative position "
                    "buckets with segment biases (CPM-Ant's); only rotary models convert to GGUF (convert to-hf writes "
                    "this one as CpmAntForCausalLM)"),
        "gelu": ({"position": "rotary"}, sp, "model.arch.ffn is gated_gelu: llama.cpp's llama architecture gates its FFN "
                 "with SiLU only (swiglu), and its GeLU-gated architectures use the tanh approximation, not the exact "
                 "GeLU this model computes"),
        "tasks": ({**ROTARY, "num_tasks": 4}, sp, "model.arch.num_tasks is 4: llama.cpp's llama architecture has no task "
                  "prompts"),
        "vocab": (ROTARY, CpmAntTokenizer(cpm_ant_vocab(tmp_path / "vocab.txt", VOCAB).read_bytes()),
                  "the tokenizer is CPM-Ant's vocab.txt: llama.cpp has no tokenizer for it (it reads SentencePiece, "
                  "BPE and WordPiece vocabularies); only a SentencePiece model converts"),
    }
    (tmp_path / "out").mkdir()
    for name, (arch, tokenizer, message) in cases.items():
        source = write_project_dir(tmp_path / "models" / name, project_model(VOCAB, **arch), tokenizer)
        assert converting(capsys, tmp_path / "out", source) == f"{source}: {message}"


def test_a_quantization_the_model_cannot_take_is_refused(capsys, tmp_path, sp):
    source = write_project_dir(tmp_path / "model", project_model(VOCAB, ff_dim=144, **ROTARY), sp)
    out = tmp_path / "out"
    out.mkdir()
    assert converting(capsys, out, source, "--quantize", "q4_0") == (
        f"{source}: model.arch.ff_dim is 144, not a multiple of 32: llama.cpp's q4_0 stores rows in blocks of 32")


def test_unknown_names_and_conflicting_flags_are_refused(capsys, tmp_path, model_dir):
    assert converting(capsys, tmp_path, model_dir, "--quantize", "q5_k") == "--quantize 'q5_k': expected one of q8_0, q4_0"
    assert converting(capsys, tmp_path, model_dir, "--dtype", "int8") == (
        "--dtype 'int8': expected one of float32, float16, bfloat16")
    assert converting(capsys, tmp_path, model_dir, "--dtype", "float16", "--quantize", "q8_0") == (
        "--dtype float16 and --quantize q8_0: give one; a GGUF file's matrices are either floats or quantized blocks "
        "(llama.cpp chooses the precision it computes in)")


def test_a_quantized_model_directory_is_refused(capsys, tmp_path, model, sp):
    source = tmp_path / "int8"
    write_model_dir(source, model.state_dict(), model.cfg.to_dict(), sp, precision=Precision(quantize="int8"))
    out = tmp_path / "out"
    out.mkdir()
    assert converting(capsys, out, source) == (
        f"{source}: its weights are stored as int8 weights, bfloat16 activations; convert the float weights (a "
        "release's float32 variant) and choose the GGUF file's with --quantize")


def test_out_must_be_a_new_file_in_an_existing_directory(capsys, tmp_path, model_dir):
    existing = tmp_path / "out.gguf"
    existing.write_bytes(b"keep")
    assert converting(capsys, tmp_path, model_dir) == f"{existing}: exists; expected a new file (--force replaces it)"
    assert existing.read_bytes() == b"keep"
    missing = tmp_path / "no" / "out.gguf"
    assert converting(capsys, tmp_path, model_dir, out="no/out.gguf") == (
        f"{missing.parent}: no such directory; expected an existing directory for out.gguf")
    (tmp_path / "dir.gguf").mkdir()
    assert converting(capsys, tmp_path, model_dir, out="dir.gguf") == (
        f"{tmp_path / 'dir.gguf'}: is a directory; expected the path of the .gguf file to write")

    main(["convert", "to-gguf", str(model_dir), str(existing), "--quantize", "q8_0", "--force"])
    assert gguf.GGUFReader(existing).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "out.gguf"]  # no partial file left
