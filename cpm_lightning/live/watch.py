"""Following the registry while a run goes on (docs/ARCHITECTURE.md, "Live training").

Each read pulls the registry when it is a git working copy with an upstream (so that accepted
can mean merged), loads it, and keeps what a running run can apply: a proposal whose file has a
problem (`proposals check` fails) is left out, keeping the version of it read last time if there
was a good one; both sides of a conflict that a new proposal brings are left out. What remains
is written as a snapshot directory, which the segments apply (`registry.path`): it never has a
problem, and it stays when the registry directory disappears or cannot be read. The snapshot
carries the prompt book and the applications list (book.py) too, each its last good version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cpm_lightning.inference.book import BOOK_FILES, book_bytes, parse_book
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.limits import Limits
from cpm_lightning.registry.resolve import Registry, load_registry
from cpm_lightning.registry.schema import ACCEPTED, FILE_NAME

GIT_TIMEOUT_S = 120


@dataclass(frozen=True)
class File:
    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Rejection:
    """Proposals left out of a read, and why (once per version of their files)."""

    ids: list[int]
    shas: dict[int, str]
    reason: str


@dataclass
class Reading:
    """One read of the registry."""

    raw: dict[int, File] = field(default_factory=dict)
    """The proposal files as read, by id."""
    files: dict[int, File] = field(default_factory=dict)
    """Every proposal file a run can apply together, by id."""
    raw_book: dict[str, File] = field(default_factory=dict)
    """The prompt book and applications list as read, by file name."""
    book: dict[str, File] = field(default_factory=dict)
    """Those a run can read: a file with a problem is its last good version, or left out."""
    registry: Registry = field(default_factory=lambda: Registry(Path()))
    """Those files loaded (from the snapshot)."""
    snapshot: Path | None = None
    """Where they are; None when there is none to apply."""
    rejected: list[Rejection] = field(default_factory=list)
    warning: str | None = None
    """A failed `git pull`: the working copy was read as it is."""
    error: str | None = None
    """Why the registry could not be read at all (then the other fields are unset)."""


def git_pull(directory: Path) -> str | None:
    """`git pull --ff-only` when `directory` holds files of a git working copy whose branch has an
    upstream; an error message when that fails, else None. The whole working copy is pulled: a
    registry followed this way is best a clone of its own (in a checkout of the project, the
    code would be updated too). A directory inside a working copy but not in it (under runs/,
    ignored) is read as it is."""
    def git(*args):
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)

    try:
        upstream = git("rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}")
        if upstream.returncode or not git("ls-files", "--", ".").stdout:
            return None  # not in a working copy, not tracked by one, or no upstream
        pulled = git("pull", "--ff-only", "--quiet")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"git pull in {directory}: {e}"
    if pulled.returncode:
        return f"git pull --ff-only in {directory} failed: {' '.join(pulled.stderr.split())[:300]}"
    return None


def read(directory: Path, last: Reading, snapshots: Path, schema: ConfigSchema, limits: Limits) -> Reading:
    """Read the registry at `directory` within the run's `limits`; `last` is the last good reading."""
    warning = git_pull(directory)
    try:
        raw = {int(m[1]): File(p.name, p.read_bytes()) for p in sorted(directory.iterdir())
               if (m := FILE_NAME.match(p.name))} if directory.is_dir() else None
        raw_book, book, book_rejected = _read_book(directory, last) if raw is not None else ({}, {}, [])
        if raw is not None and raw == last.raw and raw_book == last.raw_book:  # nothing changed since
            return dataclasses.replace(last, rejected=[], warning=warning)
        reg = load_registry(directory, schema, limits)
    except OSError as e:
        return Reading(error=f"{directory}: registry: cannot be read ({e.strerror or e})")
    out = Reading(raw=raw or {}, raw_book=raw_book, book=book, warning=warning)
    files, good = dict(raw or {}), last.files
    # Each pass leaves out (or takes back to their last good version) the files a problem is
    # about, preferring the new ones, then loads what is left; a pass with no problem ends.
    rejected: dict[tuple[int, ...], Rejection] = {}
    for _ in range(2 * len(files) + 2):
        if blind := [p for p in reg.problems if not p.ids]:
            # About the registry as a whole: no directory, no proposal files, a misnamed file, ...
            return Reading(error="; ".join(map(str, blind)))
        if not reg.problems:
            break
        for problem in reg.problems:
            new = {i for i in problem.ids if i in files and files[i] != good.get(i)}
            blamed = tuple(sorted(new or problem.ids))
            if any(_maybe_accepted(files.get(i)) for i in blamed):  # a broken draft changes no run
                entry = rejected.setdefault(blamed, Rejection(list(blamed), {i: files[i].sha256 for i in blamed
                                                                               if i in files}, ""))
                entry.reason = f"{entry.reason}; {problem}" if entry.reason else str(problem)
            for i in blamed:
                if i in good and files.get(i) != good[i]:
                    files[i] = good[i]
                else:
                    files.pop(i, None)
        reg = load_registry(_snapshot(files, book, snapshots), schema, limits) if files else Registry(directory)
    out.rejected = list(rejected.values()) + book_rejected
    out.files = files
    if files:
        out.snapshot, out.registry = _snapshot(files, book, snapshots), reg
    return out


def _read_book(directory: Path, last: Reading) -> tuple[dict[str, File], dict[str, File], list[Rejection]]:
    """(the prompt book and applications list of `directory` as read, the versions a run can
    read, the rejections of those with a problem: the last good version of such a file stays)."""
    raw, book, rejected = {}, {}, []
    for name, kind in BOOK_FILES.items():
        data, problems = book_bytes(directory, kind)
        if data is not None:
            raw[name] = File(name, data)
            problems = parse_book(data, str(directory / name), kind)[1]
        kept = raw.get(name) if not problems else last.book.get(name)
        if kept is not None:
            book[name] = kept
        if problems:
            rejected.append(Rejection([], {}, f"{problems[0]}; the run reads {'its last good version' if kept else f'no {name}'}"))
    return raw, book, rejected


def _maybe_accepted(file: File | None) -> bool:
    """Whether a proposal file may be an accepted one (when it cannot be read, it may)."""
    if file is None:
        return False
    try:
        data = yaml.safe_load(file.data)
    except yaml.YAMLError:
        return True
    return not isinstance(data, dict) or data.get("status") in (ACCEPTED, None)


def _snapshot(files: dict[int, File], book: dict[str, File], snapshots: Path) -> Path:
    """The directory holding exactly `files` and `book`, named by their contents (written once)."""
    every = [*files.values(), *book.values()]
    digest = hashlib.sha256("".join(f"{f.name}:{f.sha256}\n" for f in sorted(every, key=lambda f: f.name)).encode())
    path = snapshots / digest.hexdigest()[:16]
    if not path.is_dir():
        tmp = snapshots / f".{path.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in every:
            (tmp / f.name).write_bytes(f.data)
        os.replace(tmp, path)
    return path


def last_snapshot(snapshots: Path, schema: ConfigSchema, limits: Limits) -> Reading:
    """The snapshot the last segment applied, as the last good reading: what a new supervisor
    goes on with while the registry cannot be read."""
    found = sorted((p for p in snapshots.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime_ns) if snapshots.is_dir() else []
    if not found:
        return Reading()
    files = {int(m[1]): File(p.name, p.read_bytes()) for p in found[-1].iterdir() if (m := FILE_NAME.match(p.name))}
    book = {name: File(name, (found[-1] / name).read_bytes()) for name in BOOK_FILES if (found[-1] / name).is_file()}
    return Reading(files=files, book=book, registry=load_registry(found[-1], schema, limits), snapshot=found[-1])


def prune_snapshots(snapshots: Path, keep: Path | None) -> None:
    """Remove every snapshot but `keep` (between segments: no segment reads them)."""
    for path in snapshots.iterdir() if snapshots.is_dir() else []:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
