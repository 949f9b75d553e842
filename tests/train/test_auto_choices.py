"""`trainer.precision: auto` and `model.parallel.compile: auto` (issue 25 items 2 and 3): the
rules, the probe that feeds the first, the loss kept in fp32 under bf16 autocast, and `fit`
resolving both on a tiny config."""

from __future__ import annotations

import conftest
import pytest
import torch

from cpm_lightning.cli import fit
from cpm_lightning.core import perf
from cpm_lightning.core.loss import cross_entropy


@pytest.mark.parametrize(("device", "cuda_bf16", "speedup", "chosen"), [
    ("cuda", True, None, "bf16-mixed"),
    ("cuda", False, None, "32-true"),  # a V100: no bf16 units
    ("cpu", False, 5.3, "bf16-mixed"),  # AMX
    ("cpu", False, perf.BF16_SPEEDUP, "bf16-mixed"),
    ("cpu", False, 1.1, "32-true"),  # a tie under load does not switch
    ("cpu", False, 0.2, "32-true"),  # no bf16 units: emulated, slower
    ("mps", False, None, "32-true"),
])
def test_auto_is_bf16_where_the_hardware_has_it_and_fp32_elsewhere(device, cuda_bf16, speedup, chosen):
    assert perf.precision_for(device, cuda_bf16, speedup) == chosen
    # Under FSDP2 its MixedPrecisionPolicy says what the blocks compute in (bf16 on CUDA).
    assert perf.precision_for(device, cuda_bf16, speedup, sharded=True) == "32-true"


def test_the_probe_measures_once_and_gives_a_valid_choice(monkeypatch):
    speedup = perf.cpu_bf16_speedup()
    assert speedup > 0 and perf.cpu_bf16_speedup() is speedup  # cached: once per process
    assert perf.auto_precision("cpu") == perf.precision_for("cpu", False, speedup)
    monkeypatch.setattr(perf, "cpu_bf16_speedup", lambda: pytest.fail("measured for an explicit non-CPU device"))
    assert perf.auto_precision("mps") == "32-true"
    assert perf.auto_precision("cpu", "fsdp") == "32-true"


def test_the_loss_and_z_loss_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, table = torch.randn(64, 32), torch.randn(500, 32)
    targets = torch.randint(0, 500, (64,))
    targets[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (hidden @ table.T).requires_grad_()  # bf16, as the output projection gives them
        loss = cross_entropy(logits, targets, z_loss=1e-2)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    reference = logits.detach().float().requires_grad_()
    keep = targets != -100
    lse = reference.logsumexp(-1)
    expected = ((lse - reference.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) + 1e-2 * lse.square())[keep]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # a bf16 logsumexp would be off by ~1e-3
    loss.backward()
    expected.backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), reference.grad, rtol=1e-2, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("speedup", "chosen"), [(8.0, "bf16-mixed"), (0.3, "32-true")])
def test_fit_resolves_auto_the_default_before_the_trainer_is_built(tmp_path, corpus, monkeypatch, speedup, chosen):
    monkeypatch.setattr(perf, "cpu_bf16_speedup", lambda: speedup)
    config = conftest.write_config(tmp_path / "c.yaml", corpus, **{"trainer.max_steps": 2, "trainer.logger": False,
                                                                   "trainer.val_check_interval": 2})
    conftest.RECORDED.clear()
    cli = fit.run(["fit", "--config", str(config), "--trainer.callbacks+=conftest.RecordBatches"])
    assert cli.trainer.precision == chosen
    assert cli.config.fit.trainer.precision == chosen  # what config.yaml records
    assert len(conftest.RECORDED) == 2 and all(torch.isfinite(torch.tensor([loss for *_, loss in conftest.RECORDED])))


def test_a_precision_lightning_does_not_know_is_one_line_naming_auto(tmp_path, corpus, capsys):
    config = conftest.write_config(tmp_path / "c.yaml", corpus)
    line = conftest.cli_error(capsys, "fit", "--config", str(config), "--trainer.precision=fp8")
    assert "trainer.precision" in line and "auto" in line and "bf16-mixed" in line, line


@pytest.mark.parametrize(("device", "steps", "chosen"), [
    ("cuda", perf.COMPILE_MIN_STEPS, True),
    ("cuda", 160, False),  # a short run saves less than the compile costs
    ("cpu", 10**6, False),  # measured here: 0.98x fp32, 1.12x bf16-mixed, less than the compile repays
    ("mps", 10**6, False),
])
def test_auto_compiles_on_cuda_where_a_segment_is_long_enough_to_win_its_compile_time(device, steps, chosen):
    assert perf.compile_for(device, steps) is chosen


@pytest.mark.slow
@pytest.mark.parametrize(("min_steps", "compiled"), [(2, True), (3, False)])
def test_fit_resolves_compile_auto_on_the_steps_it_trains(tmp_path, corpus, monkeypatch, min_steps, compiled):
    """A 2-step fit compiles its blocks when 2 steps are enough on a device auto compiles on
    (recorded, not compiled: the rule's plumbing is tested here, compiled blocks in
    tests/model/test_attention.py)."""
    monkeypatch.setattr(perf, "COMPILE_MIN_STEPS", min_steps)
    monkeypatch.setattr(perf, "compile_for", lambda device, steps: steps >= perf.COMPILE_MIN_STEPS)  # as on CUDA
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(type(self).__name__))
    config = conftest.write_config(tmp_path / "c.yaml", corpus, **{"trainer.max_steps": 2, "trainer.logger": False,
                                                                   "trainer.val_check_interval": 2})
    cli = fit.run(["fit", "--config", str(config)])
    assert cli.config.fit.model.parallel.compile is compiled  # what config.yaml records: never "auto"
    assert calls == (["Block"] * len(cli.model.model.blocks) if compiled else [])
