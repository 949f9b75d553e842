"""Damaged and crafted files (issue 10): one flipped byte in any file of a checkpoint or of a
cached token shard is one error line naming the file (exit 2), never a model that samples or
trains on it; a crafted checkpoint runs no code wherever it is opened.

Two checkpoints of the tiny preset are written once for the module: a sharded one (FSDP2 in one
process: __0_0.distcp, .metadata, meta.pt, hashes.json) and a single file (step-N.ckpt, its
record in its zip comment). Each test damages a copy. Commands that fail before training run
in-process; those that fail inside the strategy's load of DCP shard files run `fit` in a
subprocess, as FSDP2 needs a process group.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import write_config, write_corpus
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cpm_lightning.checkpoint.files import REMEDY, ZIP_END, ZIP_END_LEN, CheckpointReader
from cpm_lightning.cli.main import main
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import CHUNK_BYTES, HASHES_FILE, RECORD_TAG, hash_file, write_hashes
from datamodules.shards import Shard

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)

REPO = Path(__file__).resolve().parents[2]
STEP = "step-00000001.ckpt"
TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> SimpleNamespace:
    """A sharded checkpoint (`fit` in a subprocess) and a single-file one (in-process, keeping
    only the last of 2), and the run configs that wrote them; one token cache for all."""
    root = tmp_path_factory.mktemp("integrity").resolve()
    corpus = write_corpus(root)

    def config(name: str, **overrides) -> Path:
        return write_config(root / f"{name}.yaml", corpus, **{
            "trainer.default_root_dir": str(root / name), "trainer.logger": False, "trainer.max_steps": 1,
            "checkpoint.every_n_steps": 1, "data.cache_dir": str(root / "cache"), **overrides})

    sharded = config("sharded", **{"trainer.strategy": "fsdp", "trainer.devices": 1, "trainer.accelerator": "cpu"})
    code, err = run_subprocess("fit", "--config", sharded, cwd=root)
    assert code == 0, err[-3000:]
    single = config("single", **{"trainer.max_steps": 2, "checkpoint.keep_last": 1})
    with mock.patch.object(sys, "argv", ["cpm-lightning"]):
        main(["fit", "--config", str(single)])
    return SimpleNamespace(root=root, corpus=corpus, config=config, sharded_config=sharded, single_config=single,
                           sharded=root / "sharded" / "checkpoints" / STEP,
                           single=root / "single" / "checkpoints" / "step-00000002.ckpt")


def run_subprocess(*argv, cwd: Path) -> tuple[int, str]:
    """(exit status, stderr) of `cpm-lightning ARGV` in a new process."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cpm_lightning.cli", *map(str, argv)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stderr


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of `cpm-lightning ARGV` in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def resume(capsys, config: Path, ckpt: Path, run: Path, in_subprocess: bool = False) -> tuple[int, str]:
    """`fit --ckpt_path CKPT` for one more step, writing under `run`."""
    argv = ["fit", "--config", config, "--trainer.max_steps=2", f"--trainer.default_root_dir={run}", "--ckpt_path", ckpt]
    return run_subprocess(*argv, cwd=run.parent) if in_subprocess else run_cli(capsys, *argv)


def assert_error(code: int, err: str, expected: str) -> None:
    """Exit 2 and exactly one error line, `error: EXPECTED`; no traceback."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error")] == [f"error: {expected}"], err[-3000:]


def flip(path: Path, offset: int) -> None:
    """Flip the high bit of one byte, as a failing disk or a bad copy does."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x80
    path.write_bytes(data)


def chunk_of(offset: int, size: int) -> str:
    """The bytes of the chunk that holds byte `offset` of a file of `size` bytes, as errors say."""
    first = offset // CHUNK_BYTES * CHUNK_BYTES
    return f"bytes {first}-{min(first + CHUNK_BYTES, size) - 1}"


def written_checkpoints(run: Path) -> list[Path]:
    return list((run / "checkpoints").glob("step-*"))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint alone: a file carries its record, a directory its hashes.json."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def unsealed(src: Path, dst: Path) -> Path:
    """The single-file checkpoint `src` as torch.save wrote it, before its record: what other
    software writes, and cpm-lightning before issue 22."""
    data = src.read_bytes()
    end = data.rindex(ZIP_END)
    dst.write_bytes(data[:end + ZIP_END_LEN - 2] + b"\0\0")
    return dst


def embedding_offset(ckpt: Path) -> int:
    """A byte in the middle of the model's embedding in the sharded checkpoint's data file:
    generate reads it (a byte of the optimizer state it would not read)."""
    storage = CheckpointReader(ckpt).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn == "state_dict.model.embedding")
    assert info.relative_path == "__0_0.distcp"
    return info.offset + info.length // 2


# -- writing ----------------------------------------------------------------------------------

def test_every_file_of_a_checkpoint_is_hashed_when_it_is_written(made):
    listed = json.loads((made.sharded / HASHES_FILE).read_text())["files"]
    assert sorted(listed) == [".metadata", "__0_0.distcp", "meta.pt"] == sorted(
        p.name for p in made.sharded.iterdir() if p.name != HASHES_FILE)
    assert all(listed[name] == hash_file(made.sharded / name) for name in listed)
    # keep_last=1 removed step 1; the single file carries its record inside, nothing beside it.
    assert sorted(p.name for p in made.single.parent.iterdir()) == ["last.ckpt", "step-00000002.ckpt"]
    assert made.single.read_bytes()[-200:].decode("ascii", "replace").count(RECORD_TAG) == 1


# -- a flipped byte in a checkpoint -----------------------------------------------------------

CASES = {  # name: (which checkpoint, file within a sharded one)
    "single-file": ("single", None),
    "distcp": ("sharded", "__0_0.distcp"),
    "meta.pt": ("sharded", "meta.pt"),
    ".metadata": ("sharded", ".metadata"),
}


@pytest.mark.parametrize("command", ["generate", "fit"])
@pytest.mark.parametrize("case", CASES)
def test_a_flipped_byte_in_a_checkpoint_is_named(made, tmp_path, capsys, case, command):
    kind, name = CASES[case]
    src = getattr(made, kind)
    ckpt = copy_checkpoint(src, tmp_path / src.name)
    file = ckpt / name if name else ckpt
    offset = embedding_offset(ckpt) if name == "__0_0.distcp" else file.stat().st_size // 2
    flip(file, offset)
    expected = (f"{file} is damaged: {chunk_of(offset, file.stat().st_size)} do not match the sha256 recorded in "
                f"{ckpt / HASHES_FILE} when it was written; {REMEDY}" if name else
                f"{file} is damaged: its bytes do not match the sha256 recorded in it when it was written; {REMEDY}")
    if command == "generate":
        code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is", "--max-new-tokens", "3")
    else:  # a DCP data file is read by the strategy's load, after Lightning set up FSDP2
        config = made.sharded_config if kind == "sharded" else made.single_config
        code, err = resume(capsys, config, ckpt, tmp_path / "run", in_subprocess=name == "__0_0.distcp")
    assert_error(code, err, expected)
    assert written_checkpoints(tmp_path / "run") == []


def test_damaged_hashes_are_named(made, tmp_path, capsys):
    ckpt = copy_checkpoint(made.sharded, tmp_path / "ckpt")
    flip(ckpt / HASHES_FILE, 100)
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    assert_error(code, err, f"{ckpt / HASHES_FILE} is damaged: it does not match the sha256 of its own listing; {REMEDY}")


@pytest.mark.parametrize("kind", ["sharded", "single"])
def test_a_checkpoint_without_a_record_is_read_only_with_trust_unverified(made, tmp_path, capsys, kind):
    if kind == "sharded":
        ckpt = copy_checkpoint(made.sharded, tmp_path / "ckpt")
        (ckpt / HASHES_FILE).unlink()
        what = f"the sharded checkpoint (no {HASHES_FILE})"
    else:
        ckpt, what = unsealed(made.single, tmp_path / "foreign.ckpt"), "the checkpoint"
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    assert_error(code, err, f"{ckpt}: {what} has no integrity record (written by other software or by an older "
                            "cpm-lightning); pass --trust-unverified to read it unverified (fit and live: "
                            "checkpoint.trust_unverified: true)")
    main(["generate", str(ckpt), "--prompt", "It is", "--max-new-tokens", "3", "--trust-unverified"])
    out = capsys.readouterr()
    assert out.out.startswith("It is")
    assert out.err.splitlines() == [
        f"warning: {ckpt}: {what} has no integrity record; its bytes are not verified (--trust-unverified)"]


def test_fit_resumes_a_checkpoint_without_a_record_only_with_checkpoint_trust_unverified(made, tmp_path, capsys):
    ckpt = unsealed(made.single, tmp_path / "foreign.ckpt")
    argv = ["fit", "--config", str(made.single_config), "--ckpt_path", str(ckpt), "--trainer.max_steps=3",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]
    code, err = run_cli(capsys, *argv)
    assert_error(code, err, f"{ckpt}: the checkpoint has no integrity record (written by other software or by an "
                            "older cpm-lightning); pass --trust-unverified to read it unverified (fit and live: "
                            "checkpoint.trust_unverified: true)")
    assert not (tmp_path / "run").exists()
    with mock.patch.object(sys, "argv", ["cpm-lightning"]):
        main([*argv, "--checkpoint.trust_unverified=true"])
    assert f"warning: {ckpt}: the checkpoint has no integrity record" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "step-00000003.ckpt").is_file()  # resumed at 2, trained step 3


def test_a_copied_and_renamed_checkpoint_verifies(made, tmp_path, capsys):
    ckpt = copy_checkpoint(made.single, tmp_path / "mine.ckpt")
    main(["generate", str(ckpt), "--prompt", "It is", "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert out.out.startswith("It is") and out.err == ""


def test_an_older_checkpoint_with_its_sidecar_renamed_verifies(made, tmp_path, capsys):
    """Written before the record: the sidecar lists the file by the name it had then."""
    old = unsealed(made.single, tmp_path / "step-00000002.ckpt")
    write_hashes(tmp_path / f"{old.name}.{HASHES_FILE}", {old.name: hash_file(old)})
    ckpt = tmp_path / "mine.ckpt"
    old.rename(ckpt)
    (tmp_path / f"{old.name}.{HASHES_FILE}").rename(tmp_path / f"mine.ckpt.{HASHES_FILE}")
    main(["generate", str(ckpt), "--prompt", "It is", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.startswith("It is")
    flip(ckpt, ckpt.stat().st_size // 2)
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    offset = ckpt.stat().st_size // 2
    assert_error(code, err, f"{ckpt} is damaged: {chunk_of(offset, ckpt.stat().st_size)} do not match the sha256 "
                            f"recorded in {tmp_path / f'mine.ckpt.{HASHES_FILE}'} when it was written; {REMEDY}")


@pytest.mark.parametrize("fraction", [0.0005, 0.25, 0.5, 0.9, 0.99995])
def test_a_truncated_checkpoint_is_named(made, tmp_path, capsys, fraction):
    ckpt = tmp_path / "cut.ckpt"
    data = made.single.read_bytes()
    ckpt.write_bytes(data[:int(len(data) * fraction)])
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    assert_error(code, err, f"{ckpt} is damaged: its zip archive has no end (a truncated copy); {REMEDY}")


def test_a_record_that_lies_about_the_size_is_named(made, tmp_path, capsys):
    ckpt = copy_checkpoint(made.single, tmp_path / "ckpt")
    data = ckpt.read_bytes()
    at = data.rindex(b"size=") + len("size=")
    size = len(data)
    ckpt.write_bytes(data[:at] + f"{size + 1:020d}".encode() + data[at + 20:])
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    assert_error(code, err, f"{ckpt} is damaged: {size} bytes, {size + 1} when it was written (its integrity record "
                            f"says); {REMEDY}")
    sharded = copy_checkpoint(made.sharded, tmp_path / "sharded")
    listing = json.loads((sharded / HASHES_FILE).read_text())["files"]
    real = listing["meta.pt"]["size"]
    listing["meta.pt"]["size"] = real - 1
    write_hashes(sharded / HASHES_FILE, listing)  # a listing whose own sha256 matches its lie
    code, err = run_cli(capsys, "generate", sharded, "--prompt", "It is")
    assert_error(code, err, f"{sharded / 'meta.pt'} is damaged: {real} bytes, {real - 1} when it was written "
                            f"(recorded in {sharded / HASHES_FILE}); {REMEDY}")


def test_a_distcp_file_swapped_for_another_writers_is_named(made, tmp_path, capsys):
    """Another rank's (or run's) data file in place of this one's: the listing names the file."""
    ckpt = copy_checkpoint(made.sharded, tmp_path / "ckpt")
    other = tmp_path / "other"
    state = {k: v for k, v in torch.load(made.single, weights_only=True)["state_dict"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": one process, as intended
        dcp.save({"state_dict": {k: v + 1 for k, v in state.items()}}, checkpoint_id=other)
    file, size = ckpt.resolve() / "__0_0.distcp", (ckpt / "__0_0.distcp").stat().st_size
    shutil.copy(other / "__0_0.distcp", file)
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    assert_error(code, err, f"{file}: {file.stat().st_size} bytes; the checkpoint's .metadata expects {size} bytes "
                            "(a truncated or incomplete copy)")
    shutil.copy(other / "__0_0.distcp", file)  # one of the same size, with other bytes
    with file.open("r+b") as f:
        f.truncate(size)
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    assert_error(code, err, f"{file} is damaged: {chunk_of(0, size)} do not match the sha256 recorded in "
                            f"{ckpt.resolve() / HASHES_FILE} when it was written; {REMEDY}")


def test_a_link_out_of_a_sharded_checkpoint_is_refused(made, tmp_path, capsys):
    ckpt = copy_checkpoint(made.sharded, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere.distcp"
    (ckpt / "__0_0.distcp").rename(outside)
    (ckpt / "__0_0.distcp").symlink_to(outside)
    code, err = run_cli(capsys, "generate", ckpt, "--prompt", "It is")
    assert_error(code, err, f"{ckpt / '__0_0.distcp'}: a symbolic link to {outside}, outside the checkpoint; refused "
                            "(copy the file in instead)")


# -- a crafted checkpoint ---------------------------------------------------------------------

class Payload:
    """Unpickled, it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def rehash(ckpt: Path) -> None:
    """A crafter writes hashes that match: the hashes catch damage, not intent."""
    write_hashes(ckpt / HASHES_FILE, {p.name: hash_file(p) for p in ckpt.iterdir() if p.name != HASHES_FILE})


def test_crafted_metadata_runs_no_code(made, tmp_path, capsys):
    ckpt, marker = copy_checkpoint(made.sharded, tmp_path / "ckpt"), tmp_path / "code-ran"
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    metadata.planner_data = Payload(f"touch {marker}")
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    rehash(ckpt)
    pickle.loads((ckpt / ".metadata").read_bytes())  # what DCP's FileSystemReader does
    assert marker.exists()  # the payload is live
    marker.unlink()

    refusal = (f"{ckpt / '.metadata'}: refused to unpickle posix.system: DCP metadata holds only DCP's own classes, "
               "sizes and dtypes (a crafted file runs code this way); not opening this checkpoint")
    assert_error(*run_subprocess("generate", ckpt, "--prompt", "It is", cwd=tmp_path), refusal)
    assert_error(*resume(capsys, made.sharded_config, ckpt, tmp_path / "run"), refusal)  # before FSDP2 starts
    assert_error(*run_cli(capsys, "checkpoint", "consolidate", ckpt, tmp_path / "model"), refusal)
    assert not marker.exists()
    assert written_checkpoints(tmp_path / "run") == [] and not (tmp_path / "model").exists()


def test_crafted_optimizer_state_runs_no_code(made, tmp_path, capsys):
    """DCP stores a checkpoint's non-tensor values (here AdamW's lr) as pickles, which its own
    planner loads with weights_only=False on resume."""
    marker = tmp_path / "code-ran"
    dcp_to_torch_save(made.sharded, tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    state["optimizer_0"]["param_groups"][0]["lr"] = Payload(f"touch {marker}")
    ckpt = tmp_path / "ckpt"
    with warnings.catch_warnings():  # "...assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(state, checkpoint_id=ckpt, no_dist=True)
    shutil.copy(made.sharded / "meta.pt", ckpt / "meta.pt")
    rehash(ckpt)
    dcp_to_torch_save(ckpt, tmp_path / "full2.pt")  # DCP's default planner
    assert marker.exists()  # the payload is live
    marker.unlink()

    code, err = resume(capsys, made.sharded_config, ckpt, tmp_path / "run", in_subprocess=True)
    assert_error(code, err, f"{ckpt / '__0_0.distcp'}: refused to load optimizer_0.param_groups.0.lr: it unpickles "
                            "posix.system, not plain data (a crafted file runs code this way); not opening this checkpoint")
    assert not marker.exists()
    assert written_checkpoints(tmp_path / "run") == []


# -- a flipped byte in a cached token shard ---------------------------------------------------

@pytest.fixture
def shard_cache(made, tmp_path) -> tuple[Path, Path]:
    """A copy of the module's token cache, and the directory of the `en` source's shard in it."""
    cache = tmp_path / "cache"
    shutil.copytree(made.root / "cache", cache)
    shard = next(p.parent for p in cache.glob("shards/*/meta.json") if json.loads(p.read_text())["source"] == "en")
    return cache, shard


@pytest.mark.parametrize("name", ["tokens.bin", "index.npy", "meta.json"])
def test_a_flipped_byte_in_a_token_shard_is_named(made, shard_cache, tmp_path, capsys, name):
    cache, shard = shard_cache
    file = shard / name
    # tokens.bin: the high byte of the first token (it was an IndexError in the embedding);
    # meta.json: its opening brace (it was a JSONDecodeError).
    offset = {"tokens.bin": 1, "index.npy": file.stat().st_size - 1, "meta.json": 0}[name]
    flip(file, offset)
    code, err = run_cli(capsys, "fit", "--config", made.single_config, f"--data.cache_dir={cache}",
                        f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert_error(code, err, f"{file} is damaged: {chunk_of(offset, file.stat().st_size)} do not match the sha256 "
                            f"recorded in {shard / HASHES_FILE} when it was written; delete {shard} (a cache entry): "
                            "it is rebuilt on the next run")
    assert written_checkpoints(tmp_path / "run") == []


def test_each_chunk_of_tokens_is_checked_when_a_window_first_reads_it(shard_cache):
    _, shard = shard_cache
    chunk = 256
    write_hashes(shard / HASHES_FILE, {n: hash_file(shard / n, chunk) for n in ("tokens.bin", "index.npy", "meta.json")},
                   chunk)
    flip(shard / "tokens.bin", 3 * chunk + 7)  # in token 391 (uint16)
    opened = Shard.open(shard)
    assert opened.read(0, 33).tolist() == opened.tokens[:33].tolist()  # chunk 0
    opened.read(120, 153)  # chunks 0 (checked already) and 1
    opened.read(600, 633)  # chunk 4: intact
    with pytest.raises(UserError) as error:
        opened.read(380, 413)  # chunks 2 and 3
    assert str(error.value).startswith(f"{shard / 'tokens.bin'} is damaged: bytes {3 * chunk}-{4 * chunk - 1} do not match")


def test_a_shard_without_hashes_is_named_and_the_remedy_works(made, shard_cache):
    from datamodules.pretrain import PretrainDataModule

    cache, shard = shard_cache
    (shard / HASHES_FILE).unlink()

    def setup() -> PretrainDataModule:
        dm = PretrainDataModule({"en": {"url": str(made.corpus["en"]), "weight": 1.0}}, seq_len=32, cache_dir=str(cache),
                                tokenizer=str(next(cache.glob("tokenizers/*.model"))))
        dm.prepare_data()
        dm.setup()
        return dm

    with pytest.raises(UserError) as error:
        setup()
    assert str(error.value) == f"{shard / HASHES_FILE} is missing; delete {shard} (a cache entry): it is rebuilt on the next run"
    shutil.rmtree(shard)
    assert len(setup().shards["en"].read(0, 33)) == 33
    assert (shard / HASHES_FILE).is_file()
