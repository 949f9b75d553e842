"""Migrations (issue 13): a trained model grown into a new architecture computes the same function,
and its AdamW state goes on training it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EN, ZH

from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.model.migrate import MIGRATIONS, NoMigration, TrainState, migrate, plan

TEXT = (" ".join(EN) + " " + " ".join(ZH)).encode()  # real text, as bytes: every id < 256 < vocab 512
GROWTH = {  # one exact migration each, from the tiny preset (ff_dim 128, 2 + 2 layers, 4 heads)
    "grow_ff_dim": {"ff_dim": 192},
    "add_attention_layers": {"num_attn_layers": 3},  # a new block on top, attention only
    "add_ffn_layers": {"num_ffn_layers": 3},
    "attention_into_ffn_blocks": {"num_attn_layers": 3, "num_ffn_layers": 4},  # block 2 gets one, block 3 is new
    "grow_num_tasks": {"num_tasks": 4},  # prompts from none: plain text computes what it did
    "max_len": {"max_len": 512},
    "split_qk_scale": {"split_qk_scale": True},
    "all_at_once": {"ff_dim": 256, "num_ffn_layers": 4, "num_attn_layers": 3, "max_len": 512, "split_qk_scale": True},
}
# Each growth alone on CPM-Ant's own components, and all of them at once on every combination of
# position encoding and FFN type (four cases, not four times each: the suite has a time budget).
CASES = [(growth, "relative_buckets", "gated_gelu") for growth in GROWTH if growth != "all_at_once"] + [
    ("all_at_once", position, ffn) for position in ("relative_buckets", "rotary") for ffn in ("gated_gelu", "swiglu")]


def _batch(seq_len: int = 48, batch: int = 4) -> torch.Tensor:
    ids = torch.tensor(list(TEXT[: seq_len * batch + 1]))
    return ids


def _loss(model: CPMAnt, ids: torch.Tensor, seq_len: int = 48) -> torch.Tensor:
    x, y = ids[:-1].view(-1, seq_len), ids[1:].view(-1, seq_len)
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _optimizer(model: CPMAnt) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def trained(arch: ArchConfig, steps: int = 4) -> tuple[CPMAnt, torch.optim.AdamW]:
    """A tiny model trained a few steps on real text: zero-initialised parts are no longer zero."""
    torch.manual_seed(0)
    model = CPMAnt(arch)
    model.init_weights()
    opt = _optimizer(model)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, _batch()).backward()
        opt.step()
    return model, opt


def state_of(model: CPMAnt, opt: torch.optim.AdamW) -> TrainState:
    names = {p: n for n, p in model.named_parameters()}
    return TrainState(arch=model.cfg.to_dict(), weights={n: p.detach().clone() for n, p in model.named_parameters()},
                      moments={names[p]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}, step=4)


def grown(state: TrainState) -> tuple[CPMAnt, torch.optim.AdamW]:
    model = CPMAnt(ArchConfig(**state.arch))
    model.load_state_dict(state.weights, strict=True)
    opt = _optimizer(model)
    params = dict(model.named_parameters())
    for name, moments in state.moments.items():
        opt.state[params[name]] = moments
    return model, opt


@pytest.mark.parametrize("growth, position, ffn", CASES)
def test_exact_migrations_keep_the_function_and_training_goes_on(growth, position, ffn):
    old = ArchConfig(preset="tiny", vocab_size=512, position=position, ffn=ffn).resolved()
    new = dataclasses.replace(old, **GROWTH[growth]).resolved()
    model, opt = trained(old)
    ids = _batch()
    with torch.no_grad():
        logits_before, loss_before = model(ids[:-1].view(-1, 48)), _loss(model, ids)
    state = state_of(model, opt)
    steps = plan(old.to_dict(), new.to_dict())
    assert {s.key for s in steps} == set(GROWTH[growth]) and all(s.exact for s in steps)
    migrate(state, steps)
    assert state.arch == new.to_dict()
    bigger, opt2 = grown(state)  # load_state_dict(strict=True): every tensor has the new shape
    with torch.no_grad():
        logits_after, loss_after = bigger(ids[:-1].view(-1, 48)), _loss(bigger, ids)
    assert (logits_after - logits_before).abs().max() <= 1e-5
    assert abs(float(loss_after) - float(loss_before)) <= 1e-4
    # Training goes on from the carried state: the loss on the batch keeps falling.
    for _ in range(3):
        opt2.zero_grad()
        _loss(bigger, ids).backward()
        opt2.step()
    with torch.no_grad():
        assert float(_loss(bigger, ids)) < float(loss_after)
    names = {p: n for n, p in bigger.named_parameters()}
    steps_done = {float(s["step"]) for p, s in opt2.state.items() if names[p] in model.state_dict()}
    assert steps_done == {7.0}  # AdamW's step count carried on from 4


def test_adamw_state_is_carried_extended_and_fresh(capsys):
    old = ArchConfig(preset="tiny", vocab_size=512).resolved()
    new = dataclasses.replace(old, ff_dim=192, num_ffn_layers=3).resolved()
    model, opt = trained(old)
    state = state_of(model, opt)
    before = {n: {k: v.clone() for k, v in m.items()} for n, m in state.moments.items()}
    migrate(state, plan(old.to_dict(), new.to_dict()))
    m = state.moments
    # Unchanged tensors: carried as they were, step count included.
    for name in ("embedding", "blocks.0.attn.project_q.weight", "norm.weight"):
        assert all(torch.equal(m[name][k], before[name][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # Grown rows: the old ones carried, the new ones zero, the step count carried.
    w0 = m["blocks.1.ffn.w_0.weight"]
    assert torch.equal(w0["exp_avg"][:128], before["blocks.1.ffn.w_0.weight"]["exp_avg"])
    assert not w0["exp_avg"][128:].any() and float(w0["step"]) == 4
    # w_out: rescaled by sqrt(192/128) against the 1/sqrt(ff_dim) of its forward; moments alike.
    c = (192 / 128) ** 0.5
    out, out_before = m["blocks.1.ffn.w_out.weight"], before["blocks.1.ffn.w_out.weight"]
    torch.testing.assert_close(out["exp_avg"][:, :128], out_before["exp_avg"] / c)
    torch.testing.assert_close(out["exp_avg_sq"][:, :128], out_before["exp_avg_sq"] / c**2)
    torch.testing.assert_close(state.weights["blocks.1.ffn.w_out.weight"][:, 128:], torch.zeros(64, 64))
    # A new sublayer: fresh moments with a step count of 0; its output projection zero, norm one.
    new_out = m["blocks.2.ffn.w_out.weight"]
    assert not new_out["exp_avg"].any() and float(new_out["step"]) == 0
    assert not state.weights["blocks.2.ffn.w_out.weight"].any()
    assert torch.equal(state.weights["blocks.2.ffn_norm.weight"], torch.ones(64))
    # New weights are drawn the same wherever they are drawn (every rank, a redone migration).
    again = state_of(model, opt)
    migrate(again, plan(old.to_dict(), new.to_dict()))
    assert all(torch.equal(again.weights[n], state.weights[n]) for n in state.weights)


def trained_on_a_task(arch: ArchConfig, task: int, steps: int = 4) -> tuple[CPMAnt, torch.optim.AdamW]:
    """A tiny model trained a few steps on plain text and on samples of `task` (its prompt rows
    trained, so they and their AdamW moments are not what the init drew)."""
    torch.manual_seed(0)
    model = CPMAnt(arch)
    model.init_weights()
    opt = _optimizer(model)
    x = _batch()[:-1].view(-1, 48)
    for _ in range(steps):
        opt.zero_grad()
        prompted = model(x, task=torch.full((x.shape[0],), task))[:, -48:]  # logits of the text after the prompt
        loss = _loss(model, _batch()) + torch.nn.functional.cross_entropy(
            prompted[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("position", ["relative_buckets", "rotary"])
def test_growing_num_tasks_is_exact_on_every_old_task_and_draws_new_rows_as_the_init(position):
    old = ArchConfig(preset="tiny", vocab_size=512, position=position, num_tasks=4, prompt_len=8).resolved()
    new = dataclasses.replace(old, num_tasks=8).resolved()
    model, opt = trained_on_a_task(old, task=3)
    x = _batch()[:-1].view(-1, 48)
    tasks = [torch.full((x.shape[0],), t) for t in range(4)]
    with torch.no_grad():
        before = [model(x)] + [model(x, task=t) for t in tasks]
    state = state_of(model, opt)
    moments_before = {k: v.clone() for k, v in state.moments["prompt_embedding"].items()}
    steps = plan(old.to_dict(), new.to_dict())
    assert [(s.name, s.old, s.new, s.exact) for s in steps] == [("grow_num_tasks", 4, 8, True)]
    migrate(state, steps)
    grown_model, _ = grown(state)
    with torch.no_grad():
        after = [grown_model(x)] + [grown_model(x, task=t) for t in tasks]
    for b, a in zip(before, after, strict=True):  # plain text, then each old task's prompt
        assert (a - b).abs().max() <= 1e-6
    rows = state.weights["prompt_embedding"]
    assert rows.shape == (8 * 8, 64) and torch.equal(rows[:32], model.prompt_embedding.detach())
    assert abs(float(rows[32:].std()) - 0.02) < 0.002 and abs(float(rows[32:].mean())) < 0.002
    # AdamW: the old rows' moments carried (task 3's trained), the new rows' zero, the step count carried.
    m = state.moments["prompt_embedding"]
    assert moments_before["exp_avg"][24:32].any()
    assert torch.equal(m["exp_avg"][:32], moments_before["exp_avg"])
    assert torch.equal(m["exp_avg_sq"][:32], moments_before["exp_avg_sq"])
    assert not m["exp_avg"][32:].any() and not m["exp_avg_sq"][32:].any() and float(m["step"]) == 4
    # Drawn the same wherever it is drawn (every rank, a redone migration).
    again = state_of(model, opt)
    migrate(again, steps)
    assert torch.equal(again.weights["prompt_embedding"], rows)


def test_a_model_without_prompts_gains_the_table_with_fresh_moments():
    old = ArchConfig(preset="tiny", vocab_size=512).resolved()  # num_tasks 0: no prompt embeddings
    new = dataclasses.replace(old, num_tasks=4).resolved()
    model, opt = trained(old)
    state = state_of(model, opt)
    migrate(state, plan(old.to_dict(), new.to_dict()))
    rows, m = state.weights["prompt_embedding"], state.moments["prompt_embedding"]
    assert rows.shape == (4 * 32, 64) and abs(float(rows.std()) - 0.02) < 0.002
    assert not m["exp_avg"].any() and not m["exp_avg_sq"].any() and float(m["step"]) == 0
    bigger, _ = grown(state)
    x = _batch()[:-1].view(-1, 48)
    with torch.no_grad():
        assert (bigger(x) - model(x)).abs().max() <= 1e-6


@pytest.mark.parametrize("position", ["relative_buckets", "rotary"])
def test_pooling_key_value_heads_is_not_exact_and_its_jump_is_measured(position, record_property):
    old = ArchConfig(preset="tiny", vocab_size=512, position=position).resolved()  # 4 heads
    new = dataclasses.replace(old, num_kv_heads=2).resolved()
    model, opt = trained(old, steps=8)
    ids = _batch()
    with torch.no_grad():
        loss_before = float(_loss(model, ids))
    state = state_of(model, opt)
    steps = plan(old.to_dict(), new.to_dict())
    assert [(s.name, s.exact) for s in steps] == [("pool_kv_heads", False)]
    migrate(state, steps)
    pooled, _ = grown(state)
    k = state.weights["blocks.0.attn.project_k.weight"].view(2, 16, 64)
    k_old = model.blocks[0].attn.project_k.weight.detach().view(2, 2, 16, 64)
    torch.testing.assert_close(k, k_old.mean(1))  # new head j: the mean of old heads 2j, 2j + 1
    with torch.no_grad():
        jump = float(_loss(pooled, ids)) - loss_before
    record_property("gqa_pooling_loss_jump", jump)
    print(f"pool_kv_heads 4 -> 2 ({position}): loss {loss_before:.4f} -> {loss_before + jump:.4f} ({jump:+.4f})")
    assert jump == jump and abs(jump) < 10  # finite: a model, not noise; not asserted to be zero


@pytest.mark.parametrize("change, reason", [
    ({"position": "rotary"}, "model.arch.position 'relative_buckets' -> 'rotary': it changes what every layer "
                             "computes and belongs to the next model generation"),
    ({"ffn": "swiglu"}, "model.arch.ffn 'gated_gelu' -> 'swiglu': it changes what every layer computes"),
    ({"ff_dim": 64}, "model.arch.ff_dim 128 -> 64: a migration only grows it (128 -> 64 would drop what the "
                     "model learned)"),
    ({"num_kv_heads": 3, "num_heads": 6}, "model.arch.num_heads 4 -> 6: no migration changes it"),
    ({"num_tasks": 0}, "model.arch.num_tasks 4 -> 0: a migration only grows it"),
    ({"dim": 128}, "model.arch.dim 64 -> 128: no migration changes it; it waits for the next model generation"),
    ({"num_kv_heads": 8, "num_heads": 8}, "model.arch.num_heads 4 -> 8"),
])
def test_a_change_without_a_migration_says_why(change, reason):
    old = ArchConfig(preset="tiny", vocab_size=512, num_tasks=4).resolved().to_dict()
    with pytest.raises(NoMigration) as e:
        plan(old, {**old, **change})
    assert str(e.value).startswith(reason)


def test_every_migration_has_a_test():
    tested = {s for growth in GROWTH.values() for s in (m for m, v in MIGRATIONS.items() if v.key in growth)}
    assert tested | {"pool_kv_heads"} == set(MIGRATIONS)
