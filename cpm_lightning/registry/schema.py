"""The proposal file format (docs/ARCHITECTURE.md, "The registry"): strict YAML into a typed `Proposal`.

Only plain YAML data is accepted: `yaml.SafeLoader` refuses tags that build Python objects, and
on top of it this loader refuses aliases, duplicate keys, impossible dates, files that are not
UTF-8 or larger than `MAX_BYTES`. Every problem carries the file and line it comes from. Run
configs are read by the same loader (`registry/run_args.py`), without the size limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import stat
import typing
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml

from cpm_lightning.core.errors import closest
from cpm_lightning.core.strict_yaml import StrictLoader, walk
from cpm_lightning.core.text import escaped, unsafe_text
from cpm_lightning.registry.typecheck import mismatch, python_name, strings

MAX_BYTES = 1 << 20
FILE_NAME = re.compile(r"^(\d{4})-[a-z0-9]+(?:-[a-z0-9]+)*\.yaml$")
ACCEPTED = "accepted"
DECIDED = ("accepted", "rejected", "superseded", "retired")  # statuses that need `decided`
_HANDLE = re.compile(r"^@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
_URL = re.compile(r"^https://\S+$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
EVIDENCE_KEYS = ("run", "verdict")  # of an `evidence` entry that is a mapping

Kind = Literal["architecture", "training", "data"]
Status = Literal["draft", "discussion", "accepted", "rejected", "withdrawn", "superseded", "retired"]
KINDS: tuple[str, ...] = typing.get_args(Kind)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a proposal or the registry, printed as `path:line: field: message`."""

    path: str
    """The file (or directory) at fault."""
    line: int | None
    """1-based line in `path`; None when the problem has no line (the file as a whole)."""
    field: str
    """The proposal field, dotted into `changes` (changes.model.arch.dim), or `file`/`yaml`."""
    message: str
    """What is wrong and what was expected."""
    column: int | None = None
    """1-based column of a YAML syntax error; run config errors show it (registry/run_args.py)."""
    also: tuple[int, ...] = ()
    """The other proposals of a problem between proposals (a conflict, a key set twice), whose
    files may be fine on their own: leaving out either side settles it."""

    @property
    def ids(self) -> set[int]:
        """The proposals the problem is about: the one its file holds (by the file's NNNN) and `also`."""
        m = FILE_NAME.match(Path(self.path).name)
        return {int(m[1]), *self.also} if m else set(self.also)

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.field}: {self.message}"


@dataclass(kw_only=True)
class Proposal:
    """One community proposal. The init fields are exactly the fields of a proposal file."""

    id: int
    """Number of the proposal, the NNNN of its file name NNNN-slug.yaml."""
    title: str
    """One line saying what changes."""
    kind: Kind
    """architecture (model.arch.*), training (model.optim/schedule/loss.*) or data (data.*, and model.arch.num_tasks: the prompt rows of the tasks it adds)."""
    status: Status
    """Only accepted proposals are applied; superseded ones are named in another's `supersedes`."""
    authors: list[str]
    """GitHub handles, e.g. ["@handle"]."""
    discussion: str | None = None
    """https URL of the discussion thread; required once the proposal leaves draft."""
    created: date
    """Date the proposal was opened (YYYY-MM-DD)."""
    decided: date | None = None
    """Date it was accepted, rejected, superseded or retired; required for those statuses."""
    effective_from_step: int = 0
    """Optimizer step from which a run applies it (a run resolves the registry at one step)."""
    requires: list[int] = field(default_factory=list)
    """Ids that must be accepted and applied with this one."""
    conflicts: list[int] = field(default_factory=list)
    """Ids that must not be accepted together with this one."""
    supersedes: list[int] = field(default_factory=list)
    """Ids whose keys this one may set too; where both apply, this one's value wins."""
    summary: str
    """One paragraph: what changes."""
    motivation: str = ""
    """Why, with the evidence."""
    evidence: list[str | dict[str, str]] = field(default_factory=list)
    """The trials behind the proposal: {run: MLflow run id (32 hex digits), verdict: one line},
    as `proposals trial --write` appends them, or a bare run id."""
    changes: dict[str, Any] = field(default_factory=dict)
    """Dotted run-config keys and their values; nested mappings are read as dotted keys."""

    path: Path = field(init=False, default=Path(), compare=False)
    """The file it was read from."""
    sha256: str = field(init=False, default="", compare=False)
    """sha256 of the file's bytes, as read (what `proposals.lock` records)."""
    lines: dict[str, int] = field(init=False, default_factory=dict, compare=False, repr=False)
    """Line of each field, and of each key of `changes` as `changes.KEY`."""

    @property
    def label(self) -> str:
        return f"{self.id:04d}"

    def line(self, name: str) -> int | None:
        return _line(self.lines, name)

    def problem(self, name: str, message: str, also: tuple[int, ...] = ()) -> Problem:
        return Problem(str(self.path), self.line(name), name, message, also=also)


FIELDS = {f.name: f for f in dataclasses.fields(Proposal) if f.init}
_HINTS = typing.get_type_hints(Proposal)


def read_yaml(path: Path) -> tuple[Any, bytes, dict[str, int], list[Problem]]:
    """(data, raw bytes, line of each key, problems) of one proposal file."""
    fail = lambda line, name, msg: (None, b"", {}, [Problem(str(path), line, name, msg)])  # noqa: E731
    try:
        info = path.stat()
    except OSError as e:  # a dangling or looping symbolic link
        return fail(None, "file", f"cannot read: {e.strerror}")
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, a device never end it
        return fail(None, "file", "not a regular file; a proposal is a plain YAML file")
    if info.st_size > MAX_BYTES:
        return fail(None, "file", f"{info.st_size} bytes; a proposal is at most {MAX_BYTES} bytes")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, b"", {}, [not_utf8(str(path), raw, e)]
    data, lines, problems = parse_yaml(text, str(path), "a proposal")
    if data is None and not problems:
        problems = [Problem(str(path), None, "file", "empty; expected a proposal (see proposals/TEMPLATE.yaml)")]
    return data, raw, lines, problems


def parse_yaml(text: str, path: str, what: str) -> tuple[Any, dict[str, int], list[Problem]]:
    """(data, line of each key, problems) of YAML `text` from `path`, read as this module's
    docstring says; data is None when the text holds nothing. `what` (a proposal, a run config)
    is named in the messages. Also used for run configs (registry/run_args.py)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        lines: dict[str, int] = {}
        walk_problems: list[tuple[int, str, str]] = []
        walk(node, "", lines, set(), walk_problems)
        if walk_problems:
            return None, lines, [Problem(path, *p) for p in walk_problems]
        return loader.construct_document(node), lines, []
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = " ".join(filter(None, (e.context, e.problem)))
        if "could not determine a constructor for the tag" in message:
            message = (f"YAML tag {mark_tag(e.problem)} is not allowed: {what} is plain data "
                       "(strings, numbers, lists, mappings, dates)")
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        return None, {}, [Problem(path, line, "yaml", message, column)]
    except yaml.YAMLError as e:
        return None, {}, [Problem(path, None, "yaml", str(e).replace("\n", " "))]
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        return None, {}, [Problem(path, None, "yaml", f"nested too deeply for {what}")]
    finally:
        loader.dispose()


def not_utf8(path: str, raw: bytes, e: UnicodeDecodeError) -> Problem:
    line = raw[: e.start].count(b"\n") + 1
    return Problem(path, line, "file", f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8")


def mark_tag(problem: str) -> str:
    """The tag named in SafeLoader's 'could not determine a constructor' message."""
    tag = problem.rpartition("tag ")[2].strip("'")
    return tag.replace("tag:yaml.org,2002:", "!!")


def load_proposal(path: Path) -> tuple[Proposal | None, list[Problem]]:
    """Read and check one proposal file's fields (not yet its `changes` keys, see keys.py)."""
    data, raw, lines, problems = read_yaml(path)
    if problems:
        return None, problems
    at = lambda name, msg: Problem(str(path), _line(lines, name) or 1, name, msg)  # noqa: E731
    if not isinstance(data, dict):
        return None, [at("file", f"expected a mapping of proposal fields, got {type(data).__name__}")]
    for name in data:
        if name not in FIELDS:
            problems.append(Problem(str(path), _line(lines, str(name)) or 1, escaped(str(name)),
                                    f"unknown field{closest(str(name), FIELDS)}; expected: {', '.join(FIELDS)}"))
    for name, f in FIELDS.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(at(name, "missing (required)"))
        elif (wrong := mismatch(data[name], _HINTS[name])) is not None:
            problems.append(at(name, wrong))
    for name, value in data.items():
        if name == "changes":  # checked key by key against the run config (keys.py)
            continue
        for s in strings(value):
            if module := python_name(s):
                problems.append(at(str(name), f"{s!r} names Python code (module {module!r}); "
                                              "a proposal is data and cannot refer to code"))
            # Line breaks are text here: the one-line fields have checks of their own.
            if wrong := unsafe_text(s, multiline=True):
                problems.append(at(str(name), wrong))
    if problems:
        return None, problems
    changes, twice = _flatten(data.get("changes", {}))
    proposal = Proposal(**{**data, "changes": changes})
    proposal.path, proposal.sha256, proposal.lines = path, hashlib.sha256(raw).hexdigest(), lines
    twice = [at(f"changes.{k}", "set twice (once as a dotted key, once nested)") for k in twice]
    return proposal, twice + _check_fields(proposal)


def _line(lines: dict[str, int], name: str) -> int | None:
    """Line of a field or changes key, else of the nearest enclosing one."""
    while name and name not in lines:
        name = name.rpartition(".")[0]
    return lines.get(name)


def _flatten(changes: dict) -> tuple[dict[str, Any], list[str]]:
    """Nested mappings in `changes` become dotted keys (model.arch: {ffn: x} -> model.arch.ffn),
    so a key's line is recorded under the same dotted name either way. Also returns the keys
    written twice (once dotted, once nested)."""
    flat: dict[str, Any] = {}
    twice: list[str] = []

    def visit(key: str, value):
        if isinstance(value, dict) and value:
            for sub, item in value.items():
                visit(f"{key}.{sub}", item)
            return
        if key in flat:
            twice.append(key)
        flat[key] = value

    for key, value in changes.items():
        visit(str(key), value)
    return flat, twice


def _evidence_problems(entry: str | dict[str, str]) -> list[str]:
    """What is wrong with one `evidence` entry: a run id, or {run: RUN_ID, verdict: TEXT}."""
    if not isinstance(entry, dict):
        return [] if _RUN_ID.match(entry) else [f"expected an MLflow run id (32 hex digits), got {entry!r}"]
    out = [f"unknown key {k!r}; an entry is {{run: MLflow run id, verdict: one line}}"
           for k in entry if k not in EVIDENCE_KEYS]
    if "run" not in entry:
        out.append("no `run`; an entry is {run: MLflow run id, verdict: one line}")
    elif not _RUN_ID.match(entry["run"]):
        out.append(f"run: expected an MLflow run id (32 hex digits), got {entry['run']!r}")
    if "\n" in entry.get("verdict", "").strip():
        out.append("verdict: expected one line")
    return out


def _check_fields(p: Proposal) -> list[Problem]:
    """Checks of single fields beyond their types; the registry checks references across files."""
    out = []
    match = FILE_NAME.match(p.path.name)
    if not match:
        out.append(p.problem("id", f"file name {p.path.name!r} is not NNNN-slug.yaml (4 digits, lowercase "
                                   "words joined by -)"))
    elif int(match[1]) != p.id:
        out.append(p.problem("id", f"{p.id} disagrees with the file name {p.path.name} "
                                   f"(expected id {int(match[1])})"))
    if not 1 <= p.id <= 9999:
        out.append(p.problem("id", f"expected 1 to 9999, got {p.id}"))
    for name in ("title", "summary"):
        if not getattr(p, name).strip():
            out.append(p.problem(name, "empty; expected text"))
    if "\n" in p.title.strip():
        out.append(p.problem("title", "expected one line"))
    if not p.authors:
        out.append(p.problem("authors", "empty; expected at least one GitHub handle like '@handle'"))
    out += [p.problem(f"authors.{i}", f"expected a GitHub handle like '@handle', got {a!r}")
            for i, a in enumerate(p.authors) if not _HANDLE.match(a)]
    if p.discussion is None and p.status != "draft":
        out.append(p.problem("status", f"{p.status} proposals need a `discussion` URL"))
    if p.discussion is not None and not _URL.match(p.discussion):
        out.append(p.problem("discussion", f"expected an https:// URL, got {p.discussion!r}"))
    if p.status in DECIDED and p.decided is None:
        out.append(p.problem("status", f"{p.status} proposals need a `decided` date"))
    if p.status not in DECIDED and p.decided is not None:
        out.append(p.problem("decided", f"set, but status {p.status!r} is not decided "
                                        f"(one of: {', '.join(DECIDED)})"))
    if p.decided is not None and p.decided < p.created:
        out.append(p.problem("decided", f"{p.decided} is before created ({p.created})"))
    if p.effective_from_step < 0:
        out.append(p.problem("effective_from_step", f"expected a step >= 0, got {p.effective_from_step}"))
    for name in ("requires", "conflicts", "supersedes"):
        if p.id in getattr(p, name):
            out.append(p.problem(name, f"names the proposal itself ({p.id})"))
    if both := set(p.requires) & set(p.conflicts):
        out.append(p.problem("conflicts", f"also in requires: {sorted(both)}"))
    for i, entry in enumerate(p.evidence):
        out += [p.problem(f"evidence.{i}", message) for message in _evidence_problems(entry)]
    if p.status == ACCEPTED and not p.changes:
        out.append(p.problem("changes", "empty; an accepted proposal changes at least one key"))
    return out
