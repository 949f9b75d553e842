"""The math the speed work touches: rotary, split q/k scaling and the fused cross entropy."""

import dataclasses
import math

import pytest
import torch

from cpm_lightning.core.loss import IGNORE, cross_entropy
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.model.layers import Rotary


def rotary(head_dim=8):
    return Rotary(ArchConfig(preset="tiny", position="rotary", head_dim=head_dim).resolved())


def test_rotary_turns_each_pair_by_position_times_frequency():
    q = torch.randn(1, 1, 3, 8)
    pos = torch.tensor([0, 5, 11])
    out, _ = rotary().rotate(q, q, pos)
    i, t = 1, 2  # pair (x[2], x[3]) at position 11
    angle = 11 * 10000.0 ** (-2 * i / 8)
    x1, x2 = q[0, 0, t, 2 * i], q[0, 0, t, 2 * i + 1]
    expected = torch.stack([x1 * math.cos(angle) - x2 * math.sin(angle), x1 * math.sin(angle) + x2 * math.cos(angle)])
    torch.testing.assert_close(out[0, 0, t, 2 * i:2 * i + 2], expected)
    torch.testing.assert_close(out[..., 0, :], q[..., 0, :])  # position 0 is not turned


def test_rotary_scores_depend_only_on_the_distance():
    q, k = torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16)
    rope = rotary(16)

    def score(i, j):
        qi, _ = rope.rotate(q, q, torch.tensor([i]))
        _, kj = rope.rotate(k, k, torch.tensor([j]))
        return (qi * kj).sum(-1)

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))


@pytest.mark.parametrize("position", ["relative_buckets", "rotary"])
def test_split_qk_scale_gives_the_same_logits(position):
    cfg = ArchConfig(preset="tiny", vocab_size=512, position=position)
    torch.manual_seed(0)
    plain = CPMAnt(cfg)
    plain.init_weights()
    split = CPMAnt(dataclasses.replace(cfg, split_qk_scale=True))
    split.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 512, (2, 24))
    torch.testing.assert_close(split(ids), plain(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_cross_entropy_matches_autograd_through_logsumexp(z_loss):
    logits = torch.randn(12, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (12,))
    targets[[0, 5]] = IGNORE
    keep = targets != IGNORE
    lse = logits.logsumexp(-1)[keep]
    expected = (lse - logits[keep, targets[keep]]).mean() + z_loss * lse.square().mean()
    got = cross_entropy(logits, targets, z_loss)
    torch.testing.assert_close(got, expected)
    grad, = torch.autograd.grad(got * 3, logits)  # an upstream gradient other than 1
    expected_grad, = torch.autograd.grad(expected * 3, logits)
    torch.testing.assert_close(grad, expected_grad)
    assert grad[0].abs().max() == 0  # an ignored row gets no gradient


@pytest.mark.parametrize("position", ["relative_buckets", "rotary"])
def test_a_window_of_one_sample_reads_as_the_plain_window_and_prompt_ids_are_prompt_rows(position):
    torch.manual_seed(0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=64, num_tasks=2, prompt_len=3, position=position))
    model.init_weights()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        plain = model(ids)
        torch.testing.assert_close(model(ids, sample_ids=torch.ones_like(ids)), plain, atol=1e-6, rtol=0)
        # Task 1's prompt as ids past the vocabulary, in a window: what task=1 prepends.
        prompt = 64 + 1 * 3 + torch.arange(3).expand(2, 3)
        zeros, ones = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
        window = model(torch.cat([prompt, ids], 1), segment_ids=torch.cat([zeros, torch.zeros_like(ids)], 1),
                       context=torch.cat([ones, torch.zeros_like(ids, dtype=torch.bool)], 1),
                       sample_ids=torch.ones(2, 15, dtype=torch.long))[:, 3:]
        torch.testing.assert_close(window, model(ids, task=torch.tensor([1, 1])), atol=1e-5, rtol=0)
