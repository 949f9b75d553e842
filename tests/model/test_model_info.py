"""`cpm-lightning model info` for every preset: parameters, FLOPs per token by the docs/ARCHITECTURE.md ("MLflow")
convention (checked against a count made here from the preset's numbers) and memory per device."""

from __future__ import annotations

import json

import pytest

from cpm_lightning.cli.main import main
from cpm_lightning.model.config import PRESETS, ArchConfig
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
