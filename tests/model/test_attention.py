"""FlexAttention and query-chunked SDPA (model/attention.py) compute what the SDPA path computes:
logits within 1e-5 in fp32 and the gradients of the bias table and of the projections, on each
preset's shape family, with segments, context, left padding and packed samples. The chunked path
runs with chunks of 16 over 40 positions, so the last chunk is a partial one.

CPM_ATTENTION_TEST_DEVICE=cuda (benchmarks/gpu_check.sh) runs them with CUDA tensors and the
compiled kernel, forward and backward. On CPU this torch has no FlexAttention backward and compiles
its forward per shape, so the matrix runs PyTorch's eager FlexAttention (the dense reference of the
same score_mod and mask_mod) and one slow test runs the compiled CPU kernel.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
from conftest import cli_error, write_config, write_corpus

from cpm_lightning.core.errors import UserError
from cpm_lightning.model import ArchConfig, CPMAnt, transformer
from cpm_lightning.model import attention as kernels
from cpm_lightning.model.attention import ChunkedMask, FlexMask, choose_kernel
from cpm_lightning.train.config import ParallelConfig
from cpm_lightning.train.sharding import apply_parallel

DEVICE = torch.device(os.environ.get("CPM_ATTENTION_TEST_DEVICE", "cpu"))

# The shape families of the presets and proposals: CPM-Ant's relative buckets, rotary (0005),
# grouped-query attention (0009), split q/k scaling (0004).
ARCHS = {
    "relative_buckets": dict(),
    "rotary": dict(position="rotary", ffn="swiglu"),
    "gqa": dict(num_kv_heads=2),
    "split_qk": dict(split_qk_scale=True),
}
CASES = ["plain", "segments_context_padding", "packed"]
KERNELS = {"flex": FlexMask, "chunked": ChunkedMask}  # the kernel, and the mask its forward builds
CHUNK = 16  # T = 40: two full chunks and a partial one


@pytest.fixture
def flex(monkeypatch):
    """On CUDA the real compiled kernel. On CPU PyTorch's eager FlexAttention, with its refusal
    of a CPU backward lifted (its dense backward is the reference PyTorch tests its kernels
    against), so the score_mod's gradient to the table is checked here too. On CUDA each test
    compiles its own graph: more than dynamo's default limit of recompiles of one function."""
    if DEVICE.type == "cuda":
        # Each test's score_mod and mask_mod are another graph of the one compiled function.
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    else:
        monkeypatch.setattr(kernels, "_kernels", lambda: (torch_flex.flex_attention,) * 3)
        monkeypatch.setattr(torch_flex, "_validate_device", lambda *args: None)
        monkeypatch.setattr(transformer, "choose_kernel", lambda choice, device, backward: choice)


def model_pair(arch: str, kernel: str = "flex"):
    torch.manual_seed(0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=64, num_segments=4, **ARCHS[arch])).to(DEVICE)
    model.init_weights()
    flex = CPMAnt(model.cfg).to(DEVICE)
    flex.load_state_dict(model.state_dict())
    flex.attention_kernel, flex.attention_chunk = kernel, CHUNK
    return model, flex


def inputs(case: str, B: int = 3, T: int = 40) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 64, (B, T), generator=g)}
    if case != "plain":
        seg = torch.zeros(B, T, dtype=torch.long)
        seg[:, 10:] = 2
        seg[1, 25:] = 3
        batch["segment_ids"] = seg
        batch["context"] = torch.arange(T) < torch.tensor([12, 5, 30])[:, None]
    if case == "segments_context_padding":
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, :4] = mask[2, :9] = False
        batch["attention_mask"] = mask
    if case == "packed":
        starts = torch.zeros(B, T, dtype=torch.long)
        starts[0, [15, 31]] = starts[1, 7] = starts[2, [3, 20, 21]] = 1
        batch["sample_ids"] = starts.cumsum(1)
    return {k: v.to(DEVICE) for k, v in batch.items()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_logits_and_gradients_equal_the_sdpa_path(kernel, arch, case, flex):
    sdpa, flex = model_pair(arch, kernel)
    batch = inputs(case)
    weight = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits = {}
    for model in (sdpa, flex):
        logits[model.attention_kernel] = out = model(**batch)
        (out * weight).sum().backward()  # an upstream gradient that differs per logit
    mask = flex._mask(torch.arange(40, device=DEVICE), batch.get("segment_ids"), batch.get("context"),
                      batch.get("attention_mask"), None, batch.get("sample_ids"))
    assert isinstance(mask, KERNELS[kernel]) or (arch, case) == ("rotary", "plain")  # that one is SDPA's is_causal
    torch.testing.assert_close(logits[kernel], logits["sdpa"], atol=1e-5, rtol=0)
    grads = dict(sdpa.named_parameters())
    checked = [n for n, p in flex.named_parameters() if "position" in n or "project" in n or "attention_out" in n]
    assert ("position.weight" in checked) == (arch != "rotary")
    for name in checked:
        expected = grads[name].grad
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(dict(flex.named_parameters())[name].grad, expected, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_bias_table_gets_a_gradient_only_where_it_is_used(kernel, flex):
    """Rows of segment pairs that no visible (query, key) has get none: 2 -> 3 is never seen
    (sample 1's context ends before segment 3); 2 -> 0, 3 -> 0, 3 -> 2 and 0 -> 2 (through the
    context) are."""
    _, model = model_pair("relative_buckets", kernel)
    batch = inputs("segments_context_padding")
    model(**batch).sum().backward()
    grad = model.position.weight.grad  # [buckets + segments^2, heads]
    used_pairs = {32 + 0 * 4 + 2, 32 + 2 * 4 + 0, 32 + 3 * 4 + 0, 32 + 3 * 4 + 2}
    for row in range(32, 48):
        assert (grad[row].abs().max() > 0) == (row in used_pairs), row


def test_flex_without_a_mask_or_bias_is_sdpas_causal_kernel():
    _, model = model_pair("rotary")
    model.attention_kernel = "flex"
    with torch.no_grad():
        assert model._mask(torch.arange(8, device=DEVICE), None, None, None, None) is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_decoding_with_the_kv_cache_stays_on_sdpa_and_matches_the_full_forward(kernel, flex):
    from cpm_lightning.model import KVCache

    _, model = model_pair("relative_buckets", kernel)
    batch = inputs("segments_context_padding")
    with torch.no_grad():
        full = model(**batch)
        cache = KVCache(model, 3, 40)
        first = {k: v[:, :30] for k, v in batch.items()}
        model(**first, cache=cache)
        assert isinstance(model._mask(torch.arange(30, 31, device=DEVICE), batch["segment_ids"][:, 30:31], None,
                                      batch["attention_mask"][:, 30:31], KVCache(model, 3, 40)), torch.Tensor)
        last = model(**{k: v[:, 30:] for k, v in batch.items() if k != "context"}, cache=cache)
    torch.testing.assert_close(last, full[:, 30:], atol=1e-5, rtol=0)


def test_chunked_builds_one_chunk_of_mask_rows_at_a_time_and_rebuilds_them_in_the_backward(flex, monkeypatch):
    built = []

    class Recording(ChunkedMask):
        def __init__(self, rows, size):
            def recorded(start, end):
                mask = rows(start, end)
                built.append((start, end, tuple(mask.shape), torch.is_grad_enabled()))
                return mask

            super().__init__(recorded, size)

    monkeypatch.setattr(transformer, "ChunkedMask", Recording)
    _, model = model_pair("relative_buckets", "chunked")
    out = model(**inputs("segments_context_padding"))
    layers = model.cfg.num_attn_layers
    chunks = [(start, end, (3, model.cfg.num_heads, end - start, 40), True) for start, end in [(0, 16), (16, 32), (32, 40)]]
    assert built == chunks * layers
    out.sum().backward()
    assert sorted(built[len(chunks) * layers:]) == sorted(chunks * layers)  # recomputed, not kept
    with torch.no_grad():
        built.clear()
        model(**inputs("segments_context_padding"))
    assert built == [(s, e, shape, False) for s, e, shape, _ in chunks] * layers  # no checkpoint: built once


def test_which_kernel_each_choice_and_device_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_kernel("sdpa", cuda, True) == "sdpa" and choose_kernel("chunked", cuda, True) == "chunked"
    assert choose_kernel("chunked", cpu, True) == choose_kernel("chunked", cpu, False) == "chunked"
    assert choose_kernel("flex", cpu, False) == "flex" and choose_kernel("flex", cuda, True) == "flex"
    assert choose_kernel("auto", cuda, True) == choose_kernel("auto", cuda, False) == "flex"
    assert choose_kernel("auto", cpu, True) == choose_kernel("auto", cpu, False) == "sdpa"
    with pytest.raises(UserError, match=r"^model.parallel.attention: flex cannot train on CPU \(this torch has no "
                                        r"FlexAttention backward there\); use chunked, sdpa or auto$"):
        choose_kernel("flex", cpu, True)


def test_training_a_flex_model_on_cpu_is_one_line_error():
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=64))
    model.init_weights()
    model.attention_kernel = "flex"
    with pytest.raises(UserError, match="flex cannot train on CPU"):
        model(torch.randint(0, 64, (1, 8)))


def test_an_unknown_kernel_or_a_chunk_out_of_range_is_one_line_error():
    with pytest.raises(UserError, match=r"^unknown model.parallel.attention 'dense'; expected one of: auto, chunked, flex, sdpa$"):
        ParallelConfig(attention="dense")
    with pytest.raises(UserError, match=r"^model.parallel.attention_chunk must be in \[1, 1048576\], got 0$"):
        ParallelConfig(attention="chunked", attention_chunk=0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=64))
    apply_parallel(model, dataclasses.replace(ParallelConfig(), attention="flex", attention_chunk=7))
    assert model.attention_kernel == "flex" and CPMAnt.attention_kernel == "sdpa"
    assert model.attention_chunk == 7 and CPMAnt.attention_chunk == 256


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CUDA run compiles in every test above")
def test_the_compiled_cpu_kernel_reads_what_the_sdpa_path_reads():
    """The kernel `flex` runs on CPU (inductor's C++ FlexAttention, forward only), alone and
    inside compiled blocks (model.parallel.compile)."""
    sdpa, flex = model_pair("gqa")
    batch = inputs("segments_context_padding")
    with torch.no_grad():
        expected = sdpa(**batch)
        torch.testing.assert_close(flex(**batch), expected, atol=1e-5, rtol=0)
        apply_parallel(flex, ParallelConfig(compile=True, attention="flex"))
        torch.testing.assert_close(flex(**batch), expected, atol=1e-5, rtol=0)


@pytest.mark.slow  # trains the run's tokenizer and opens an MLflow store before the model is built
def test_fit_with_an_unknown_kernel_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])  # LightningCLI reads sys.argv beside its args
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    config = write_config(tmp_path / "config.yaml", write_corpus(tmp_path),
                          **{"model.parallel.attention": "dense", "registry.path": None})
    assert cli_error(capsys, "fit", "--config", str(config)) == (
        "unknown model.parallel.attention 'dense'; expected one of: auto, chunked, flex, sdpa")
    assert not (tmp_path / "run").exists()
