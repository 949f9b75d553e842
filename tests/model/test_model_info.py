"""`cpm-lightning model info` for every preset: parameters, FLOPs per token by the docs/ARCHITECTURE.md ("MLflow")
convention (checked against a count made here from the preset's numbers) and memory per device; with
`--inference`, the memory to run it at each precision and whether it fits `--memory`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_error

from cpm_lightning.cli.main import main
from cpm_lightning.cli.tools import INFERENCE_PRECISIONS as INFERENCE
from cpm_lightning.model import CPMAnt, KVCache
from cpm_lightning.model.config import PRESETS, ArchConfig
from cpm_lightning.model.quantize import resident_bytes, torch_dtype
from cpm_lightning.model.stats import model_stats, param_count

KEYS = {"params", "non_embedding_params", "flops_per_token", "bytes_per_device"}


def info(capsys, preset: str, devices: int = 1) -> dict:
    main(["model", "info", "--preset", preset, "--devices", str(devices), "--json"])
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def expected_counts(preset: str) -> tuple[int, int, int]:
    """(params, non-embedding params, training FLOPs per token at the preset's maximum length),
    counted from the preset's numbers: CPM-Ant blocks without biases, a tied output projection,
    32 segments and the relative-position bias of docs/ARCHITECTURE.md ("The model") (512 buckets unless the preset
    says otherwise); 6·N_matmul + 12·L·d·S with d the attention width (heads × head_dim)."""
    p = PRESETS[preset]
    dim, heads, head_dim, ff = p["dim"], p["num_heads"], p["head_dim"], p["ff_dim"]
    attn_layers, ffn_layers, vocab = p["num_attn_layers"], p["num_ffn_layers"], p["vocab_size"]
    max_len, buckets, segments = p.get("max_len", 512), p.get("num_buckets", 512), 32
    attention = 4 * dim * heads * head_dim  # q, k, v, out (multi-head: as many k/v heads as q)
    ffn = 3 * dim * ff  # gated: w_0, w_1, w_out
    matmul = attn_layers * attention + ffn_layers * ffn + vocab * dim  # output projection included
    norms = (attn_layers + ffn_layers + 1) * dim  # one per sublayer, and the final norm
    position = (buckets + segments**2) * heads
    non_embedding = matmul - vocab * dim + norms + position
    params = non_embedding + (vocab + segments) * dim  # token and segment embeddings
    return params, non_embedding, 6 * matmul + 12 * attn_layers * heads * head_dim * max_len


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset(preset, capsys):
    one = info(capsys, preset)
    assert KEYS <= one.keys()
    params, non_embedding, flops = expected_counts(preset)
    assert (one["params"], one["non_embedding_params"], one["flops_per_token"]) == (params, non_embedding, flops)
    memory = one["bytes_per_device"]
    assert memory == {"params": 4 * params, "gradients": 4 * params, "optimizer": 8 * params, "total": 16 * params}


def test_cpm_ant_10b_has_about_10_billion_parameters(capsys):
    assert 9e9 < info(capsys, "cpm-ant-10b")["params"] < 11e9


@pytest.mark.parametrize("preset", ["tiny", "cpm-ant-10b"])
def test_bytes_per_device_halve_from_one_to_two_devices(preset, capsys):
    one, two = info(capsys, preset, 1), info(capsys, preset, 2)
    assert two["params"] == one["params"]
    for key, value in one["bytes_per_device"].items():
        assert two["bytes_per_device"][key] == pytest.approx(value / 2, abs=1), key


def test_text_output_states_the_convention(capsys):
    main(["model", "info", "--preset", "cpm-ant-10b", "--devices", "8"])
    out = capsys.readouterr().out
    params, non_embedding, flops = expected_counts("cpm-ant-10b")
    assert f"parameters             {params:,} ({non_embedding:,} non-embedding)" in out.splitlines()
    assert f"training FLOPs/token   {flops:,} at length 512 (6 x matmul weights + 12 x layers x width x length)" in out
    assert "over 8 device(s)" in out


VARIANTS = [{}, {"position": "rotary"}, {"num_kv_heads": 2}, {"norm": "layernorm"}, {"ffn": "swiglu"},
            {"num_tasks": 3, "prompt_len": 5}, {"num_ffn_layers": 0}, {"num_attn_layers": 3, "num_ffn_layers": 1},
            {"num_segments": 7, "num_buckets": 16, "vocab_size": 300}]


@pytest.mark.parametrize("preset", PRESETS)
def test_param_count_is_what_the_built_model_holds(preset):
    """The registry sizes models by arithmetic (param_count, cheap for any size); the count
    must be that of the model built on the meta device, for every preset and component."""
    for variant in VARIANTS if preset == "tiny" else [{}]:
        cfg = ArchConfig(preset=preset, **variant)
        assert param_count(cfg) == model_stats(cfg).params, variant


# -- model info --inference -----------------------------------------------------------------------
def inference(capsys, *argv: str) -> dict:
    main(["model", "info", "--inference", "--json", *argv])
    return json.loads(capsys.readouterr().out)


def sized(preset: str) -> ArchConfig:
    return ArchConfig(preset=preset, vocab_size=PRESETS[preset]["vocab_size"]).resolved()


def kv_cache_bytes(preset: str, dtype: torch.dtype) -> int:
    """What KVCache allocates for batch 1 at the preset's max_len, counted on the meta device."""
    with torch.device("meta"):
        model = CPMAnt(sized(preset)).to(dtype)
        cache = KVCache(model, 1, model.cfg.max_len)
    return sum(t.nbytes for t in [*cache.k, *cache.v, cache.segment_ids, cache.attention_mask])


def test_inference_memory_of_every_preset(capsys):
    """Without a preset: every preset, at each precision the weights that model/quantize.py
    holds plus the KV cache that KVCache allocates; float32 and bfloat16 weights are 4 and 2
    bytes a parameter, and int8 and int4 weigh less again."""
    out = inference(capsys)
    assert list(out["presets"]) == list(PRESETS) and out["memory"] is None
    for preset, facts in out["presets"].items():
        entries = facts["inference"]
        assert list(entries) == ["float32", "bfloat16", "int8", "int4"]
        for name, entry in entries.items():
            if preset == "tiny" and name == "int4":  # dim 64: no int4 group of 128
                assert entry == {"error": "--quantize int4: tiny's blocks.0.attn.project_q takes 64 inputs, not a "
                                          "multiple of the group size 128; choose --group-size 32 or 64"}
                continue
            precision = INFERENCE[name]
            assert entry["weights"] == resident_bytes(sized(preset), precision), (preset, name)
            assert entry["kv_cache"] == kv_cache_bytes(preset, torch_dtype(precision)), (preset, name)
            assert entry["total"] == entry["weights"] + entry["kv_cache"] and entry["fits"] is None
        assert entries["float32"]["weights"] == 4 * facts["params"]
        assert entries["bfloat16"]["weights"] == 2 * facts["params"]
        if preset != "tiny":
            assert entries["int4"]["weights"] < entries["int8"]["weights"] < entries["bfloat16"]["weights"]


def test_the_10b_model_fits_16_gib_only_quantized(capsys):
    out = inference(capsys, "--preset", "cpm-ant-10b", "--memory", "16GiB")
    fits = {name: entry["fits"] for name, entry in out["inference"].items()}
    assert fits == {"float32": False, "bfloat16": False, "int8": True, "int4": True}
    assert out["params"] == expected_counts("cpm-ant-10b")[0]  # the usual facts are there too
    assert 5e9 < out["inference"]["int4"]["total"] < 6e9 < 9e9 < out["inference"]["int8"]["total"] < 10.5e9
    for size, limit in (("24GB", 24 * 10**9), ("16384MiB", 16 << 30), ("1.5TiB", 3 << 39), ("1000", 1000)):
        entries = inference(capsys, "--preset", "cpm-ant-10b", "--memory", size)["inference"]
        assert all(e["fits"] == (e["total"] <= limit) for e in entries.values()), size


def test_inference_text_is_a_table_of_every_preset(capsys):
    main(["model", "info", "--inference", "--memory", "16GiB"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("and whether it fits in 16.00 GiB")
    assert lines[1].split() == ["model", "float32", "bfloat16", "int8", "int4"]
    rows = {line.split()[0]: line for line in lines[2:2 + len(PRESETS)]}
    assert list(rows) == list(PRESETS)
    assert rows["cpm-ant-10b"].split() == ["cpm-ant-10b", "35.72", "GiB", "no", "17.86", "GiB", "no", "9.24", "GiB",
                                           "fits", "5.19", "GiB", "fits"]
    assert rows["tiny"].split()[-1] == "n/a"
    assert lines[-1].startswith("  n/a: tiny at int4: --quantize int4: tiny's blocks.0.attn.project_q takes 64 inputs")


def test_inference_of_a_model_directory(tmp_path, capsys):
    from cpm_lightning.checkpoint.modeldir import write_model_dir
    from cpm_lightning.core.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a few words of text, and a few more words " * 50], 300)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=tokenizer.vocab_size, dim=128).resolved())
    write_model_dir(tmp_path / "m", model.state_dict(), model.cfg.to_dict(), tokenizer)
    out = inference(capsys, str(tmp_path / "m"), "--memory", "1MiB")
    params = sum(p.numel() for p in model.parameters())
    assert out["source"] == str(tmp_path / "m") and out["params"] == params
    assert out["inference"]["float32"]["weights"] == 4 * params
    assert out["inference"]["int4"]["error"].startswith(f"--quantize int4: {tmp_path / 'm'}'s blocks.0.attn.attention_out "
                                                        "takes 64 inputs")
    assert out["inference"]["float32"]["fits"] is False and out["inference"]["int8"]["fits"] is True


@pytest.mark.parametrize("argv,message", [
    (["--inference", "--memory", "16 gigs"], "--memory '16 gigs': expected a size above zero, like 16GiB, 24GB or 512MiB"),
    (["--inference", "--memory", "0GiB"], "--memory '0GiB': expected a size above zero, like 16GiB, 24GB or 512MiB"),
    (["--inference", "--memory", "GiB"], "--memory 'GiB': expected a size above zero, like 16GiB, 24GB or 512MiB"),
    (["--preset", "demo", "--memory", "16GiB"], "--memory goes with --inference (the memory to run the model)"),
    ([], "model info: give a preset (--preset NAME) or a trained model (a checkpoint, model directory or models:/ URI), "
         "one of them"),
    (["--inference", "--preset", "nope"], None),
])
def test_inference_bad_input_is_one_line(capsys, argv, message):
    msg = cli_error(capsys, "model", "info", *argv)
    if message is None:  # the preset registry's own message lists the valid names
        assert "nope" in msg and all(name in msg for name in PRESETS)
    else:
        assert msg == message
