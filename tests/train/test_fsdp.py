"""FSDP2 sharded training and exact, reshardable resume (issue 4), on CPU with 2 gloo processes.

Every run is a real `cpm-lightning fit` subprocess (Lightning launches the second rank). Runs are
slow to start, so a few of them serve several tests:
  straight2   2 ranks, 2N steps, checkpoints at N and 2N, keeps 1  (a) (b) (c) (f), evaluation
  straight1   1 process, no sharding, 2N steps                     (a), evaluation
  sigterm     2 ranks, SIGTERM to rank 0 after step N              (b) (d)
  killed      2 ranks, resumes by itself (checkpoint.resume=auto) from the SIGTERM checkpoint,
              SIGKILLed while writing the checkpoint of step 2N    (b) (e)
  resumed1    1 process, --ckpt_path last: the step-N checkpoint   (b) (e)
  grown2      2 ranks, straight2's last checkpoint with ff_dim grown (a migration, issue 13),
              to step 4N, checkpoints at 3N and 4N
  grown1      1 process, grown2's checkpoint of step 3N, to step 4N
The probes are in fsdp_probe.py. benchmarks/gpu_check.sh runs the resume test on GPU through
the CPM_FSDP_TEST_* variables below (bf16 compute: losses agree to a looser tolerance there).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import RESUME_OVERRIDES, assert_optimizer_used, override_args, write_config, write_corpus, write_proposal
from fsdp_probe import PROBE_INPUT

from cpm_lightning.checkpoint.config import CheckpointConfig
from cpm_lightning.checkpoint.directory import resolve_ckpt_path, roll_back
from cpm_lightning.checkpoint.store import Checkpoints, read_meta
from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.inference.book import PROMPTS_FILE

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)

N = 3  # steps before the resume point; runs take 2N
REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300  # a hung collective fails the test instead of hanging it
ACCELERATOR = os.environ.get("CPM_FSDP_TEST_ACCELERATOR", "cpu")
WORLD = int(os.environ.get("CPM_FSDP_TEST_DEVICES", "2"))  # ranks of the sharded runs
LOSS_ATOL = float(os.environ.get("CPM_FSDP_TEST_LOSS_ATOL", "1e-5"))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])


class Runs:
    """Writes the run configs and runs `fit` in subprocesses, all under one directory."""

    def __init__(self, root: Path, corpus: dict[str, Path]):
        self.root, self.corpus = root, corpus

    def config(self, name: str, devices: int, strategy: str = "fsdp", **overrides) -> Path:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return write_config(self.root / f"{name}.yaml", self.corpus, **{
            "trainer.default_root_dir": str(self.root / name), "trainer.max_steps": 2 * N,
            "trainer.accelerator": ACCELERATOR, "trainer.devices": devices, "trainer.strategy": strategy,
            "trainer.logger": False, "checkpoint.every_n_steps": N, "data.cache_dir": str(self.root / "cache"),
            "registry.path": None, **({"trainer.deterministic": "warn"} if ACCELERATOR == "gpu" else {}),
            # auto is 32-true under fsdp but bf16-mixed for one process on a CPU with bf16 units:
            # the comparisons here are of sharding alone.
            "trainer.precision": "32-true",
            **overrides})

    def fit(self, name: str, devices: int, *args: str, callbacks=(), expect_rc: int | None = 0, **overrides):
        """Run `fit`; `callbacks`: (class name in fsdp_probe, init args) pairs. Returns the
        process and the steps the Record probe saw."""
        out = self.root / name
        probes = [("Record", {"out": str(out)}), *callbacks]
        cfg = self.config(name, devices, **overrides, **{"trainer.callbacks": [
            {"class_path": f"fsdp_probe.{cls}", "init_args": init} for cls, init in probes]})
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "cpm_lightning.cli", "fit", "--config", str(cfg), *args],
                                cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            try:  # the rank Lightning launched is in this session; leave nothing behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if expect_rc is not None:
            assert proc.returncode == expect_rc, output[-3000:]
        steps_file = out / "steps.jsonl"
        steps = [json.loads(line) for line in steps_file.read_text().splitlines()] if steps_file.exists() else []
        return output, steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("fsdp")
    return Runs(root, write_corpus(root))


def evaluated(runs: Runs, name: str) -> dict:
    """Evaluation every N steps (issue 15), logged by a CSV logger: eval/* of a sharded run must
    be those of one process. Three windows per source: the two ranks get uneven shares. And the
    prompt book of a registry of one draft proposal, completed there and when training ends
    (RecordBook)."""
    registry = runs.root / "book-registry"
    if not registry.exists():
        write_proposal(registry, 1, status="draft")
        (registry / PROMPTS_FILE).write_text(json.dumps({"prompts": BOOK}))
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(runs.root / name)}}
    return {"eval.every_n_steps": N, "eval.tasks": ["heldout"], "eval.limit": 3, "trainer.logger": logger,
            "registry.path": str(registry)}


BOOK = [{"id": "truth", "author": "@someone", "text": "It is a truth", "max_tokens": 5},
        {"id": "analects", "author": "@someone", "text": "子曰：", "max_tokens": 5}]


def book_probe(runs: Runs, name: str) -> tuple[str, dict]:
    return "RecordBook", {"out": str(runs.root / name), "registry": str(runs.root / "book-registry")}


@pytest.fixture(scope="module")
def straight2(runs):
    return runs.fit("straight2", WORLD, callbacks=[book_probe(runs, "straight2")], **{"checkpoint.keep_last": 1},
                    **evaluated(runs, "straight2"))[1]


@pytest.fixture(scope="module")
def straight1(runs):
    return runs.fit("straight1", 1, strategy="auto", callbacks=[book_probe(runs, "straight1")],
                    **evaluated(runs, "straight1"))[1]


@pytest.fixture(scope="module")
def preempted(runs):
    """The SIGTERM run, then the run that resumes from it by itself and is SIGKILLed while
    saving, then a 1-process `--ckpt_path last`."""
    sigterm_out, sigterm = runs.fit("sigterm", WORLD, callbacks=[("SignalAt", {"step": N})],
                                    **{"checkpoint.every_n_steps": 100})
    shutil.copytree(runs.root / "sigterm" / "checkpoints", runs.root / "killed" / "checkpoints", symlinks=True)
    killed_out, killed = runs.fit("killed", WORLD, callbacks=[("KillWhileSaving", {"step": 2 * N})], expect_rc=None,
                                  **{"checkpoint.resume": "auto"})
    shutil.copytree(runs.root / "killed" / "checkpoints", runs.root / "resumed1" / "checkpoints", symlinks=True)
    _, resumed1 = runs.fit("resumed1", 1, "--ckpt_path", "last", **{"model.parallel.activation_checkpointing": True})
    return {"sigterm": sigterm, "sigterm_out": sigterm_out, "killed": killed, "killed_out": killed_out,
            "resumed1": resumed1}


@pytest.fixture(scope="module")
def grown(runs, straight2):
    grow = {"model.arch.ff_dim": 192, "trainer.max_steps": 4 * N, "checkpoint.keep_last": 2}
    shutil.copytree(runs.root / "straight2" / "checkpoints", runs.root / "grown2" / "checkpoints", symlinks=True)
    out, grown2 = runs.fit("grown2", WORLD, "--ckpt_path", "last", **grow)
    shutil.copytree(runs.root / "grown2" / "checkpoints", runs.root / "grown1" / "checkpoints", symlinks=True)
    _, grown1 = runs.fit("grown1", 1, "--ckpt_path", str(runs.root / "grown1" / "checkpoints" / f"step-{3 * N:08d}.ckpt"),
                         **grow)
    return SimpleNamespace(out=out, grown2=grown2, grown1=grown1)


def assert_same_steps(got: list[dict], want: list[dict]):
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for g, w in zip(got, want, strict=True):
        assert g["samples"] == w["samples"], f"step {g['step']}: different samples"
        assert g["loss"] == pytest.approx(w["loss"], abs=LOSS_ATOL), f"step {g['step']}"


def test_a_sharded_training_matches_one_process(straight2, straight1):
    assert [s["step"] for s in straight2] == list(range(1, 2 * N + 1))
    assert_same_steps(straight2, straight1)
    assert len(straight2[0]["samples"]) == 4  # data.batch_size is the global batch


def test_a_sharded_run_with_chunked_attention_trains_as_one_process_with_sdpa(runs, straight1):
    """Chunks of 12 of the 32 positions, the last one partial: each chunk's bias, rebuilt in the
    backward, reads the bias table FSDP2 holds unsharded on the root."""
    _, steps = runs.fit("chunked2", WORLD, **{"model.parallel.attention": "chunked",
                                             "model.parallel.attention_chunk": 12})
    assert_same_steps(steps, straight1)


def eval_scores(root: Path) -> dict[int, dict[str, float]]:
    """The eval/* metrics the CSV logger under `root` wrote, by step."""
    out: dict[int, dict[str, float]] = {}
    for row in csv.DictReader(next(root.rglob("metrics.csv")).open()):
        for key, value in row.items():
            if key.startswith("eval/") and value:
                out.setdefault(int(row["step"]), {})[key] = float(value)
    return out


def test_evaluation_of_a_sharded_run_scores_as_one_process(runs, straight2, straight1):
    sharded, single = eval_scores(runs.root / "straight2"), eval_scores(runs.root / "straight1")
    assert sorted(sharded) == [N, 2 * N]
    assert set(sharded[N]) == {f"eval/heldout/{s}/{m}" for s in ("en", "zh") for m in ("loss", "bpb")}
    for step, scores in sharded.items():
        assert scores == pytest.approx(single[step], abs=LOSS_ATOL), step


def test_a_sharded_run_completes_the_prompt_book_as_one_process(runs, straight2, straight1):
    """Every rank takes the same greedy tokens (the forward passes stay collective), and they
    are the unsharded run's."""
    books = [json.loads((runs.root / name / f"book-rank{r}.json").read_text())
             for name, ranks in (("straight2", WORLD), ("straight1", 1)) for r in range(ranks)]
    assert all(book == books[0] for book in books) and books[0]["step"] == 2 * N
    assert [c["id"] for c in books[0]["completions"]] == ["truth", "analects"]


def test_b_d_e_resume_on_two_and_one_processes_after_sigterm_and_sigkill(runs, straight2, preempted):
    # (d) SIGTERM: a checkpoint of the step it arrived at, a clean exit, nothing else saved.
    assert "SIGTERM: saved" in preempted["sigterm_out"]
    assert [s["step"] for s in preempted["sigterm"]] == list(range(1, N + 1))
    assert sorted(p.name for p in (runs.root / "sigterm" / "checkpoints").iterdir()) == [
        "last.ckpt", f"step-{N:08d}.ckpt"]
    # (b) on 2 processes: resumed by checkpoint.resume=auto, on the same samples and losses.
    assert_same_steps(preempted["sigterm"] + preempted["killed"], straight2)
    # (e) killed while writing step 2N: the partial write is there, under a name never resumed.
    killed_dir = runs.root / "killed" / "checkpoints"
    assert (killed_dir / f".step-{2 * N:08d}.ckpt.partial").is_dir()
    assert not (killed_dir / f"step-{2 * N:08d}.ckpt").exists()
    assert (killed_dir / "last.ckpt").resolve().name == f"step-{N:08d}.ckpt"
    # (b) on 1 process, with activation checkpointing: `last` is step N, not the partial one.
    assert_same_steps(preempted["sigterm"] + preempted["resumed1"], straight2)
    resumed_dir = runs.root / "resumed1" / "checkpoints"
    assert sorted(p.name for p in resumed_dir.iterdir()) == ["last.ckpt", f"step-{N:08d}.ckpt", f"step-{2 * N:08d}.ckpt"]
    cpm = read_meta(resumed_dir / "last.ckpt")["cpm"]
    assert cpm["tokens_seen"] == 2 * N * 4 * 32  # steps x global batch x seq_len, across the resume
    assert {"arch", "tokenizer", "rng"} <= cpm.keys()


def test_only_the_last_k_checkpoints_are_kept(runs, straight2):
    found = sorted(p.name for p in (runs.root / "straight2" / "checkpoints").iterdir())
    assert found == ["last.ckpt", f"step-{2 * N:08d}.ckpt"]


def test_resume_resolution(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert resolve_ckpt_path(None, ckpts, "auto") is None  # auto with nothing to resume: a fresh start
    assert resolve_ckpt_path(None, ckpts, "never") is None
    with pytest.raises(UserError, match="--ckpt_path last: no checkpoint to resume in"):
        resolve_ckpt_path("last", ckpts, "never")
    ckpts.mkdir()
    for step in (5, 10):
        (ckpts / f"step-{step:08d}.ckpt").mkdir()
        os.utime(ckpts / f"step-{step:08d}.ckpt", ns=(step, step))
    (ckpts / ".step-00000015.ckpt.partial").mkdir()
    assert resolve_ckpt_path("last", ckpts, "never") == ckpts / "step-00000010.ckpt"  # no link: newest
    (ckpts / "last.ckpt").symlink_to("step-00000005.ckpt")  # killed after step 10's rename, before the link's
    assert resolve_ckpt_path(None, ckpts, "auto") == ckpts / "step-00000010.ckpt"
    os.utime(ckpts / "step-00000005.ckpt", ns=(20, 20))  # written again, after resuming from step 0
    assert resolve_ckpt_path(None, ckpts, "auto") == ckpts / "step-00000005.ckpt"
    for step in (5, 10):
        (ckpts / f"step-{step:08d}.ckpt").rmdir()
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").mkdir()  # a copy that followed the link, all a sync left
    assert resolve_ckpt_path("last", ckpts, "never") == ckpts / "last.ckpt"
    with pytest.raises(UserError, match="checkpoint 'nope' does not exist"):
        resolve_ckpt_path("nope", ckpts, "auto")


def test_preemption_signals_are_caught_during_training_only():
    callback, before = Checkpoints(Path("unused"), CheckpointConfig()), signal.getsignal(signal.SIGUSR1)
    callback.on_train_start(SimpleNamespace(global_step=0), None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback._signal == signal.SIGUSR1  # saved and stopped at the next step boundary
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the checkpoint
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) is before


def test_c_each_rank_holds_half_the_parameter_and_optimizer_bytes(runs, straight2):
    measured = json.loads((runs.root / "straight2" / "bytes.json").read_text())
    full = measured["full_params"]
    assert len(measured["per_rank"]) == WORLD
    for params, optim in measured["per_rank"]:
        assert params == pytest.approx(full / WORLD, rel=0.1)
        assert optim == pytest.approx(2 * full / WORLD, rel=0.1)  # AdamW: two moments per parameter


def test_f_consolidated_checkpoint_gives_the_same_logits(runs, straight2, tmp_path, capsys):
    ckpt = runs.root / "straight2" / "checkpoints" / "last.ckpt"
    main(["checkpoint", "consolidate", str(ckpt), str(tmp_path / "model")])
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    model, _ = load_model(str(tmp_path / "model"))
    with torch.no_grad():
        logits = model(PROBE_INPUT)
    assert torch.allclose(logits, torch.load(runs.root / "straight2" / "logits.pt"), rtol=0, atol=1e-5)
    capsys.readouterr()
    main(["generate", str(tmp_path / "model"), "--prompt", "It is a truth", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("It is a truth")


def test_f_sharded_checkpoint_converts_to_hf(runs, straight2, tmp_path):
    """convert to-hf reads the DCP shards one tensor at a time; transformers computes the same."""
    from transformers import AutoModelForCausalLM

    from cpm_lightning.inference.generate import prompt_inputs

    ckpt = runs.root / "straight2" / "checkpoints" / "last.ckpt"
    main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")])
    model, _ = load_model(str(ckpt))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = PROBE_INPUT.masked_fill(PROBE_INPUT == 0, 5)  # CpmAnt reads id 0 as padding
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids, **prompt_inputs(model, ids, "cpm-ant"))
    assert (got - expected).abs().max() <= 1e-4


def user_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) >= 1 and err[-1].startswith("error: "), err
    return err[-1]


def test_overrides_of_a_sharded_resume_are_what_trains(runs, straight2):
    """Every optimizer and schedule field class overridden at a resume of the 2-rank checkpoint,
    read back from AdamW (the single-file path is in test_resume_config.py)."""
    ckpt = runs.root / "straight2" / "checkpoints" / "last.ckpt"
    out = runs.root / "overridden"
    runs.fit("overridden", 1, "--ckpt_path", str(ckpt), *override_args(RESUME_OVERRIDES),
             callbacks=[("RecordOptimizer", {"out": str(out)})], **{"trainer.max_steps": 2 * N + 2})
    assert_optimizer_used(out / "optim.jsonl", 2 * N)


def test_a_sharded_run_grows_ff_dim_and_a_resume_on_one_process_is_exact(runs, straight2, grown):
    assert "migrating to this run's model.arch: grow_ff_dim (model.arch.ff_dim 128 -> 192)" in grown.out
    # The migrated, resharded model computes what the checkpoint's did.
    before = torch.load(runs.root / "straight2" / "logits.pt")
    after = torch.load(runs.root / "grown2" / "logits-start.pt")
    assert (after - before).abs().max() <= 1e-5
    assert [s["step"] for s in grown.grown2] == list(range(2 * N + 1, 4 * N + 1))
    assert all(math.isfinite(s["loss"]) for s in grown.grown2)
    assert_same_steps(grown.grown1, grown.grown2[N:])
    ckpt = runs.root / "grown2" / "checkpoints" / f"step-{4 * N:08d}.ckpt"
    meta = read_meta(ckpt)
    assert meta["cpm"]["arch"]["ff_dim"] == 192
    assert meta["cpm"]["migrations"] == [{"name": "grow_ff_dim", "key": "ff_dim", "old": 128, "new": 192,
                                          "exact": True, "step": 2 * N}]


def test_a_grown_checkpoint_tells_its_shape_its_migrations_and_what_else_folds_in(runs, grown, capsys):
    from cpm_lightning.checkpoint.store import trained_model
    from cpm_lightning.tracking.make_release import _card

    ckpt = runs.root / "grown2" / "checkpoints" / f"step-{4 * N:08d}.ckpt"
    main(["model", "info", str(ckpt)])
    out = capsys.readouterr().out
    assert "ff_dim 192, 2 attention + 2 FFN layers" in out
    assert f"step {2 * N}: grow_ff_dim (model.arch.ff_dim 128 -> 192)" in out
    card = _card("cpm-demo", trained_model(ckpt), {}, {}, None, [], "", None, REPO / "proposals", [])
    assert "## Migrations\n\nArchitecture changes folded" in card and f"- step {2 * N}: grow_ff_dim" in card
    # The seed registry against it: the migration, or why none, for each architecture proposal.
    main(["proposals", "check", str(REPO / "proposals"), "--against", str(ckpt)])
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines()[2:])
    assert lines["0001"].endswith("training: no migration needed")
    assert lines["0002"].endswith("folds in by max_len (model.arch.max_len 256 -> 1024)")
    assert lines["0004"].endswith("folds in by split_qk_scale (model.arch.split_qk_scale False -> True)")
    assert lines["0005"].endswith("cannot be folded in: model.arch.position 'relative_buckets' -> 'rotary': it changes "
                                  "what every layer computes and belongs to the next model generation")
    assert lines["0006"].endswith("cannot be folded in: model.arch.ffn 'gated_gelu' -> 'swiglu': it changes what every "
                                  "layer computes and belongs to the next model generation")
    assert lines["0009"].endswith("folds in by pool_kv_heads (model.arch.num_kv_heads 4 -> 2, not exact)")
    assert len(lines) == len(list((REPO / "proposals").glob("[0-9]*.yaml")))


def test_checkpoint_of_another_architecture(runs, straight2, capsys):
    ckpt = runs.root / "straight2" / "checkpoints" / "last.ckpt"
    cfg = runs.config("other_arch", 2, **{"model.arch.ff_dim": 96})
    line = user_error(capsys, ["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    assert line == (f"error: checkpoint {ckpt} cannot resume with this run's model.arch: model.arch.ff_dim 128 -> 96: "
                    "a migration only grows it (128 -> 96 would drop what the model learned)")


def test_unwritable_checkpoint_directory(runs, straight2, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cfg = runs.config("unwritable", 1, strategy="auto", **{"trainer.default_root_dir": str(tmp_path / "a_file")})
    line = user_error(capsys, ["fit", "--config", str(cfg)])
    assert "checkpoint directory" in line and "not writable" in line


def test_global_batch_the_world_size_does_not_divide(runs, straight2, capsys):
    cfg = runs.config("odd_batch", 2, **{"data.batch_size": 3})
    line = user_error(capsys, ["fit", "--config", str(cfg)])
    assert line == ("error: data.batch_size=3 (the global batch) does not split over 2 device(s) x "
                    "trainer.accumulate_grad_batches=1; use a multiple of 2")


def test_checkpoints_at_keep_steps_outlive_keep_last(tmp_path):
    """live keeps the checkpoint a proposal took effect at while a suspension may return to it."""
    saver = Checkpoints(tmp_path, CheckpointConfig(every_n_steps=1, keep_last=1), keep_steps=[2])
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, strategy=SimpleNamespace(barrier=lambda name: None),
                              save_checkpoint=lambda path: torch.save({}, path))
    for step in (1, 2, 3, 4):
        trainer.global_step = step
        saver.save(trainer)
    kept = ["step-00000002.ckpt", "step-00000004.ckpt"]  # their hashes inside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", *kept]


def test_a_rollback_removes_the_later_checkpoints(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (2, 4, 6):
        (ckpts / f"step-{step:08d}.ckpt").write_bytes(b"")
        os.utime(ckpts / f"step-{step:08d}.ckpt", ns=(step, step))
    (ckpts / "last.ckpt").symlink_to("step-00000006.ckpt")
    assert roll_back(ckpts, ckpts / "step-00000002.ckpt") == [ckpts / "step-00000004.ckpt", ckpts / "step-00000006.ckpt"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000002.ckpt"]
    assert resolve_ckpt_path("last", ckpts, "never") == ckpts / "step-00000002.ckpt"
