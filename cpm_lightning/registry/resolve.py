"""The registry as a whole: load a directory, check proposals against each other, and resolve
the accepted ones at a step into run-config values with provenance (docs/ARCHITECTURE.md, "Configuration", "The registry")."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpm_lightning.core.errors import UserError
from cpm_lightning.inference.book import APPS_FILE, PROMPTS_FILE
from cpm_lightning.registry.keys import ConfigSchema, check_changes
from cpm_lightning.registry.limits import Limits
from cpm_lightning.registry.schema import ACCEPTED, FILE_NAME, KINDS, Problem, Proposal, load_proposal

TEMPLATE = "TEMPLATE.yaml"
NOT_PROPOSALS = (TEMPLATE, PROMPTS_FILE, APPS_FILE)


@dataclass
class Registry:
    """Every proposal of a directory that passed its own checks, and all problems found."""

    path: Path
    proposals: dict[int, Proposal] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def get(self, pid: int) -> Proposal:
        if pid not in self.proposals:
            raise UserError(f"no proposal {pid} in {self.path}")
        return self.proposals[pid]

    def raise_problems(self, what: str) -> None:
        """One UserError listing every problem, one per line."""
        if self.problems:
            lines = "\n".join(str(p) for p in self.problems)
            raise UserError(f"{len(self.problems)} problem(s) in the proposal registry {self.path}; "
                            f"{what}:\n{lines}")


def proposal_files(directory: Path) -> list[Path]:
    """The proposal files of a registry directory: every .yaml/.yml entry but the template and
    the prompt book and applications list (book.py), also those that are not regular files
    (load_registry refuses them)."""
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.name not in NOT_PROPOSALS)


def _link_out(path: Path, directory: Path) -> Problem | None:
    """A proposal that is a symbolic link out of the registry directory, refused unread: the
    registry is what its pull requests show (one such link pointed at /proc/self/pagemap)."""
    real = os.path.realpath(path)
    if path.is_symlink() and not Path(real).is_relative_to(os.path.realpath(directory)):
        return Problem(str(path), None, "file", f"a symbolic link to {os.readlink(path)}, outside the "
                                                f"registry {directory}; a proposal is a file in the registry")
    return None


def load_registry(directory: str | Path, schema: ConfigSchema, limits: Limits | None = None) -> Registry:
    """Load and check every proposal of `directory`, and the proposals against each other;
    their changes within `limits` (the defaults unless given: a run passes its config's)."""
    limits = limits or Limits()
    reg = Registry(Path(directory))
    if not reg.path.is_dir():
        reg.problems.append(Problem(str(reg.path), None, "registry", "no such directory; set registry.path "
                                    "to the proposal registry, or null to run without one"))
        return reg
    files = proposal_files(reg.path)
    if not files:
        reg.problems.append(Problem(str(reg.path), None, "registry",
                                    "no proposals; expected NNNN-slug.yaml files (see TEMPLATE.yaml)"))
    broken = set()  # numbers of the files with problems: references to them are not reported again
    for path in files:
        link = _link_out(path, reg.path)
        proposal, problems = (None, [link]) if link else load_proposal(path)
        if proposal is not None and not problems:
            problems = check_changes(proposal, schema, limits)
        reg.problems += problems
        if proposal is None or problems:
            broken |= {int(m[1])} if (m := FILE_NAME.match(path.name)) else set()
            continue
        if (other := reg.proposals.get(proposal.id)) is not None:
            reg.problems.append(proposal.problem("id", f"{proposal.id} is also the id of {other.path}"))
            continue
        reg.proposals[proposal.id] = proposal
    reg.problems += _cross_checks(reg.proposals, broken)
    return reg


def _cross_checks(proposals: dict[int, Proposal], broken: set[int]) -> list[Problem]:
    """Problems between the valid proposals; those with files in `broken` are left out."""
    out = []
    for p in proposals.values():
        for name in ("requires", "conflicts", "supersedes"):
            out += [p.problem(name, f"no proposal {i} in the registry") for i in getattr(p, name)
                    if i not in proposals and i not in broken]
    if out:
        return out
    for name in ("requires", "supersedes"):
        out += _cycles(proposals, name)
    accepted = {i: p for i, p in proposals.items() if p.status == ACCEPTED}
    for p in proposals.values():
        if (p.status == "superseded" and not broken
                and not any(p.id in q.supersedes for q in proposals.values())):
            out.append(p.problem("status", "superseded, but no proposal lists it in `supersedes`"))
    for p in accepted.values():
        for i in p.requires:
            q = proposals.get(i)
            if q is not None and q.status != ACCEPTED:
                out.append(p.problem("requires", f"proposal {i} ({q.path}) is {q.status}, not accepted"))
        for i in p.conflicts:
            # A pair that names each other is reported once, at the smaller id.
            if i in accepted and not (i < p.id and p.id in accepted[i].conflicts):
                out.append(p.problem("conflicts", f"proposal {i} ({proposals[i].path}) is accepted too", also=(i,)))
    if not out:
        out += _collisions(list(accepted.values()), proposals)
    return out


def _cycles(proposals: dict[int, Proposal], name: str) -> list[Problem]:
    """One problem per cycle of the `name` relation found by a depth-first search (iterative:
    a registry may hold thousands of proposals)."""
    out, state = [], {}  # state: 1 on the current path, 2 finished
    for root in sorted(proposals):
        if root in state:
            continue
        path, todo = [root], [iter(getattr(proposals[root], name))]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is not None and nxt not in proposals:  # a broken file's number
                continue
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt):]
                chain = " -> ".join(f"{i:04d}" for i in [*cycle, nxt])
                files = ", ".join(str(proposals[i].path) for i in cycle)
                out.append(proposals[nxt].problem(name, f"cycle {chain} ({files})"))
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(getattr(proposals[nxt], name)))
    return out


def _supersedes(a: Proposal, b: Proposal, proposals: dict[int, Proposal]) -> bool:
    """Whether a supersedes b, directly or through a chain of supersedes."""
    seen, todo = set(), list(a.supersedes)
    while todo:
        i = todo.pop()
        if i == b.id:
            return True
        if i not in seen and i in proposals:
            seen.add(i)
            todo += proposals[i].supersedes
    return False


def _collisions(accepted: list[Proposal], proposals: dict[int, Proposal]) -> list[Problem]:
    """Two accepted proposals that set one key, neither superseding the other."""
    out, setters = [], {}
    for p in sorted(accepted, key=lambda p: p.id):
        for key in p.changes:
            for q in setters.get(key, []):
                if not (_supersedes(p, q, proposals) or _supersedes(q, p, proposals)):
                    out.append(p.problem(f"changes.{key}", f"also set by accepted proposal {q.id} ({q.path}:"
                                                           f"{q.line('changes.' + key)}) and neither supersedes "
                                                           f"the other; add `supersedes: [{q.id}]` or drop the key",
                                              also=(q.id,)))
            setters.setdefault(key, []).append(p)
    return out


@dataclass
class Resolution:
    """The accepted proposals applied at one step, and the config values they set."""

    at_step: int
    applied: list[Proposal]
    """In application order: (effective_from_step, id)."""
    values: dict[str, Any]
    """Dotted run-config key -> value, for every key a proposal set."""
    provenance: dict[str, Proposal]
    """Dotted key -> the proposal whose value it has."""

    @property
    def ids(self) -> str:
        """The `cpm.proposals` tag: applied ids, comma-separated."""
        return ",".join(p.label for p in self.applied)

    def lock(self) -> str:
        """`proposals.lock`: id -> file name and sha256 of the bytes applied."""
        return json.dumps({p.label: {"file": p.path.name, "sha256": p.sha256} for p in self.applied}, indent=2) + "\n"


@dataclass(frozen=True)
class InEffect:
    """Which proposals of a set are in effect at one step of a run, and the next step at which
    that changes: the one answer `fit` (at its first step) and `live`'s supervisor (at every
    segment and registry read) apply."""

    step: int
    due: Mapping[int, int]
    """Id -> the step it takes effect at in this run: the step it took effect at already
    (`since`), else its effective_from_step, and never before those it requires. A proposal that
    requires one outside the set never takes effect and is not here."""

    @property
    def ids(self) -> list[int]:
        """In effect at `step`."""
        return sorted(i for i, d in self.due.items() if d <= self.step)

    @property
    def next_change(self) -> int | None:
        """The first step after `step` at which a proposal takes effect."""
        return min((d for d in self.due.values() if d > self.step), default=None)


def in_effect(proposals: Mapping[int, Proposal], step: int, since: Mapping[int, int] | None = None) -> InEffect:
    """The proposals of `proposals` (by id: those the run applies when due) in effect at `step`.
    `since` (id -> step) holds the steps at which proposals took effect in this run: one whose
    effective_from_step had passed when the run read it took effect at the checkpoint boundary
    where it was applied, and one the run rolled back before is due there again."""
    since = since or {}
    due: dict[int, int | None] = {}

    def of(i: int) -> int | None:
        if i not in due:
            due[i] = None  # a requires cycle cannot reach here (the registry refuses it)
            p = proposals.get(i)
            needs = [of(r) for r in p.requires] if p else [None]
            due[i] = None if None in needs else max([since.get(i, p.effective_from_step), *needs])
        return due[i]

    return InEffect(step, {i: d for i in proposals if (d := of(i)) is not None})


def resolve(reg: Registry, at_step: int = 0, kinds: list[str] | None = None,
            exclude: list[int] | None = None, trial: int | None = None) -> Resolution:
    """Accepted proposals of `kinds`, not in `exclude`, in effect at `at_step` (`in_effect`: from
    their effective_from_step, and not before those they require), ordered by
    (effective_from_step, id); then proposal `trial`, whatever its status, step and kind, whose
    values win over theirs (the treatment arm of `proposals trial`). A UserError lists every
    problem."""
    reg.raise_problems("nothing is applied")
    kinds = list(kinds) if kinds is not None else KINDS
    exclude = list(exclude or [])
    problems = [f"registry.exclude: no proposal {i} in {reg.path}" for i in exclude if i not in reg.proposals]
    accepted = {i: p for i, p in reg.proposals.items() if p.status == ACCEPTED}
    left_out = {}
    for p in accepted.values():
        if p.id in exclude:
            left_out[p.id] = "left out by registry.exclude"
        elif p.kind not in kinds:
            left_out[p.id] = f"a {p.kind} proposal, left out by registry.kinds"
    candidates = {i: p for i, p in accepted.items() if i not in left_out}
    ids = in_effect(candidates, at_step).ids
    applied = sorted((candidates[i] for i in ids), key=lambda p: (p.effective_from_step, p.id))
    if trial is not None and trial not in reg.proposals:
        problems.append(f"registry.trial: no proposal {trial} in {reg.path}")
    elif trial is not None and trial not in ids:
        applied.append(reg.proposals[trial])
        problems += trial_problems(reg.proposals[trial], applied[:-1], at_step)
    # Those due but for a proposal the run leaves out, which they require: the run config
    # contradicts the registry.
    due = [p for p in candidates.values() if p.effective_from_step <= at_step and p.id not in ids]
    for p in applied + due:
        problems += [str(p.problem("requires", f"proposal {i} ({reg.proposals[i].path}) is not applied: "
                                               f"{left_out[i]}")) for i in p.requires if i in left_out]
    if problems:
        raise UserError(f"{len(problems)} problem(s) resolving the proposal registry {reg.path}; nothing is "
                        "applied:\n" + "\n".join(problems))
    values, provenance = {}, {}
    for p in applied:
        for key, value in p.changes.items():
            holder = provenance.get(key)
            if holder is None or p.id == trial or _supersedes(p, holder, reg.proposals):
                values[key], provenance[key] = value, p
    return Resolution(at_step, applied, values, provenance)


def trial_problems(p: Proposal, applied: list[Proposal], at_step: int) -> list[str]:
    """What keeps proposal `p` from being tried on top of the `applied` ones: one it conflicts
    with is applied, or one it requires is not."""
    ids = {q.id for q in applied}
    out = [str(p.problem("conflicts", f"conflicts with proposal {q.id} ({q.path}), which is applied at step {at_step}"))
           for q in applied if q.id in p.conflicts or p.id in q.conflicts]
    out += [str(p.problem("requires", f"proposal {i} is not applied at step {at_step}"))
            for i in p.requires if i not in ids]
    return out


def set_key(tree: dict, key: str, value: Any) -> None:
    """tree[a][b][c] = value for key a.b.c, creating mappings on the way."""
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def annotate(text: str, comments: dict[str, str]) -> str:
    """YAML text with `  # comment` at the end of the line of each dotted key in `comments`."""
    node = yaml.compose(text)
    lines = text.splitlines()

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                if key in comments:
                    n = k.start_mark.line
                    lines[n] = f"{lines[n]}  # {comments[key]}"
                walk(v, key + ".")

    walk(node, "")
    return "\n".join(lines) + "\n"
