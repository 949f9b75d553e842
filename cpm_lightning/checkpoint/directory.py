"""The checkpoint directory as files (docs/ARCHITECTURE.md, "Checkpoints"): names, which one is
the latest, `last.ckpt`, and a rollback. Plain file operations without Lightning, which the
`live` supervisor, which never trains, does not import; store.py writes and reads the
checkpoints themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import HASHES_FILE

STEP_NAME = re.compile(r"step-(\d+)\.ckpt")
# Stop with a checkpoint at the next step: Kubernetes/SLURM preemption, Ctrl-C, SLURM --signal. Here,
# without torch, because the live supervisor passes the same ones on to its segment.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
LAST = "last.ckpt"


def step_of(path: Path) -> int:
    """The optimizer step in a checkpoint's name, step-NNNNNNNN.ckpt."""
    return int(STEP_NAME.fullmatch(Path(path).name)[1])


def complete_checkpoints(dirpath: Path) -> list[Path]:
    """The finished checkpoints in `dirpath`, oldest written first."""
    found = [p for p in dirpath.glob("step-*.ckpt") if STEP_NAME.fullmatch(p.name)] if dirpath.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def latest(dirpath: Path) -> Path | None:
    """The newest finished checkpoint; `last.ckpt` only when it is all there is (a copy).

    Not the link's target: a checkpoint is renamed into place before the link moves, so a kill
    between the two leaves a finished checkpoint newer than the one the link names."""
    found = complete_checkpoints(dirpath)
    if found:
        return found[-1]
    link = dirpath / LAST
    return link.resolve() if link.exists() else None


def resolve_ckpt_path(ckpt_path: str | None, dirpath: Path, resume: str) -> Path | None:
    """The checkpoint `fit` starts from: --ckpt_path (a path, or `last`), else with
    checkpoint.resume=auto the latest in `dirpath` if any, else none."""
    if ckpt_path == "last" or (ckpt_path is None and resume == "auto"):
        found = latest(dirpath)
        if found is None and ckpt_path == "last":
            raise UserError(f"--ckpt_path last: no checkpoint to resume in {dirpath}")
        return found
    if ckpt_path is not None and not Path(ckpt_path).exists():
        raise UserError(f"--ckpt_path: checkpoint {ckpt_path!r} does not exist")
    return Path(ckpt_path) if ckpt_path else None


def hashes_path(ckpt: Path) -> Path:
    """Where the hashes of checkpoint `ckpt` are: inside a sharded one, beside a single file."""
    return ckpt / HASHES_FILE if ckpt.is_dir() else ckpt.with_name(f"{ckpt.name}.{HASHES_FILE}")


def remove(path: Path) -> None:
    """A checkpoint (file with its hashes beside it, or directory), a partial one or a link, if it is there."""
    if path.is_symlink():  # last.ckpt: the checkpoint it names keeps its hashes
        path.unlink()
    elif path.is_file():
        path.unlink()
        hashes_path(path).unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def pin(ckpt: Path, dirpath: Path) -> Path:
    """A copy of checkpoint `ckpt` (with its hashes) in `dirpath` made of hard links, so that
    pruning the original leaves it whole (a plain copy where the file system has no links); one
    pinned before under the same name is replaced. Returns the pinned path."""
    dirpath.mkdir(parents=True, exist_ok=True)
    pinned, tmp = dirpath / ckpt.name, dirpath / f".{ckpt.name}"
    remove(tmp)
    remove(pinned)
    if ckpt.is_file() and hashes_path(ckpt).is_file():  # beside it (a sharded one has them inside)
        _link(hashes_path(ckpt), hashes_path(pinned))
    _link(ckpt, tmp)
    os.replace(tmp, pinned)
    return pinned


def _link(src: Path, dst: Path) -> None:
    """A copy of file or directory `src` at `dst` made of hard links (a copy where the file
    system has none)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(src, dst)


def point_last(dirpath: Path, target: Path) -> None:
    """Make `last.ckpt` a link to `target` (in `dirpath`), replacing it in one rename."""
    link, last = dirpath / f".{LAST}.new", dirpath / LAST
    link.unlink(missing_ok=True)
    link.symlink_to(target.name)
    if not last.is_symlink():  # a copy that followed the link (cp -L, object-store sync)
        remove(last)
    os.replace(link, last)


def roll_back(dirpath: Path, to: Path) -> list[Path]:
    """Remove every checkpoint at a later step than `to` and point `last.ckpt` at it, so that
    nothing resumes the abandoned stretch; returns what was removed."""
    later = [p for p in complete_checkpoints(dirpath) if step_of(p) > step_of(to)]
    for path in later:
        remove(path)
    point_last(dirpath, to)
    return later
