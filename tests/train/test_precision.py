"""`trainer.precision: auto` (issue 25 item 2): the rule, the probe that feeds it, the loss kept in
fp32 under bf16 autocast, and `fit` with auto on a tiny config."""

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
