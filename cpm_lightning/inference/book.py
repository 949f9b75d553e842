"""The prompt book and the applications list of a registry (docs/ARCHITECTURE.md, "The prompt
book"): `prompts.yaml` and `apps.yaml` at the registry root, beside the proposals, read strictly
into typed entries.

Each file is plain YAML, read as strictly as a proposal (strict_yaml: no aliases, duplicate keys
or tags): a mapping with one key holding a list (`prompts:` or `apps:`); every entry has exactly
the fields of `Prompt` or `App`, typed, with unique ids (names, for apps). A problem is one line
naming the file and line, the entry (index and id) and the field. Imports only yaml, strict_yaml
and the standard library: callbacks, releases, the registry's check and the site all read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cpm_lightning.core.errors import UserError, closest
from cpm_lightning.core.strict_yaml import StrictLoader, walk
from cpm_lightning.core.tasks import TASK_PROMPTS
from cpm_lightning.core.text import escaped, unsafe_text

PROMPTS_FILE = "prompts.yaml"
APPS_FILE = "apps.yaml"
# The greedy completions of the book as JSON (generate.complete_book): on a release's MLflow
# run, and on a training run every eval.every_n_steps.
COMPLETIONS_ARTIFACT = "prompts/completions.json"
STEP_ARTIFACT = "prompts/step-{step:08d}.json"
MAX_BYTES = 1 << 20  # as a proposal file: the book is read by every run and every release
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_LINK = re.compile(r"^https?://[^\s/?#]+[^\s]*$")
_RELEASE = re.compile(r"^models:/[^\s/@]+(?:/[1-9][0-9]*|@[A-Za-z0-9_-]+)$")


@dataclass(frozen=True)
class Prompt:
    """A community prompt: every release, and a training run every eval.every_n_steps, completes
    it greedily."""

    id: str
    """A short slug (lowercase words joined by -), unique in the book."""
    author: str
    """Who contributed it, e.g. a GitHub handle like "@someone"."""
    text: str
    """The prompt, as the model reads it (UTF-8, not empty)."""
    max_tokens: int
    """New tokens to generate (greedy), at least 1; fewer when the model's maximum length is
    reached."""
    task: str | None = None
    """Optional: a task (qa, summarize, translate) whose input `text` is, completed as that task
    lays a sample out (its prompt, the input as context, the output after it)."""
    context: str | None = None
    """Optional, with `task`: the passage a question is about, read before `text`."""
    where: str = field(default="", compare=False, repr=False, kw_only=True)
    """`file:line: prompts[i] (id ...)`, for messages about the prompt (not a field of the file)."""


@dataclass(frozen=True)
class App:
    """An application the community built on a release."""

    name: str
    """Its name, unique in the list."""
    authors: list[str]
    """Who built it (at least one)."""
    link: str
    """Where it is: an http(s) URL."""
    release: str
    """The release it builds on (it was tuned on, with `adapter`): models:/NAME/VERSION or
    models:/NAME@ALIAS."""
    adapter: str | None = None
    """Optional: its adapter, an adapter version (`release --adapter`) models:/NAME/VERSION or
    models:/NAME@ALIAS; every nightly release re-scores it on the new weights (its tasks, on the
    site's applications page)."""


# kind -> (file name, its list's key, the field that names an entry)
_BOOKS: dict[type, tuple[str, str, str]] = {Prompt: (PROMPTS_FILE, "prompts", "id"), App: (APPS_FILE, "apps", "name")}
BOOK_FILES: dict[str, type] = {PROMPTS_FILE: Prompt, APPS_FILE: App}


def load_prompts(registry_dir: Path) -> list[Prompt]:
    """The prompts of the registry at `registry_dir`; [] when it has no prompts.yaml. A file with
    a problem is a UserError (one line: the first problem)."""
    return _load(Path(registry_dir), Prompt)


def load_apps(registry_dir: Path) -> list[App]:
    """The applications of the registry at `registry_dir`; as load_prompts, for apps.yaml."""
    return _load(Path(registry_dir), App)


def completions_json(completions: dict) -> str:
    """The text of a completions artifact: UTF-8 JSON, the characters as they are."""
    return json.dumps(completions, ensure_ascii=False, indent=1)


def _load(directory: Path, kind: type) -> list:
    entries, problems = read_book(directory, kind)
    if problems:
        more = (f" (and {len(problems) - 1} more; `cpm-lightning proposals check {directory}` lists them)"
                if len(problems) > 1 else "")
        raise UserError(problems[0] + more)
    return entries


def read_book(directory: Path, kind: type) -> tuple[list, list[str]]:
    """(entries, problems) of the file of `kind` (Prompt or App) in registry `directory`: both
    empty when there is no such file, no entries when there is a problem."""
    raw, problems = book_bytes(directory, kind)
    return ([], problems) if raw is None else parse_book(raw, str(Path(directory) / _BOOKS[kind][0]), kind)


def book_bytes(directory: Path, kind: type) -> tuple[bytes | None, list[str]]:
    """(the bytes of the file of `kind` in `directory`, []), or (None, why they cannot be read);
    (None, []) when there is no such file."""
    path = Path(directory) / _BOOKS[kind][0]
    if not os.path.lexists(path):
        return None, []
    try:
        if not path.is_file() or path.is_symlink():  # a FIFO would block the read, a link leave the registry
            return None, [f"{path}: file: not a regular file; expected a plain YAML file"]
        if (size := path.stat().st_size) > MAX_BYTES:
            return None, [f"{path}: file: {size} bytes; expected at most {MAX_BYTES}"]
        return path.read_bytes(), []
    except OSError as e:
        return None, [f"{path}: file: cannot read ({e.strerror or e})"]


def parse_book(raw: bytes, path: str, kind: type) -> tuple[list, list[str]]:
    """(entries, problems) of the bytes of a book file of `kind` read from `path`."""
    try:
        text, bad = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        # Read with the bad bytes replaced, to tell which entry and field hold them.
        text, bad = raw.decode("utf-8", errors="replace"), e
    loader, refused = StrictLoader(text), []
    try:
        node = loader.get_single_node()
        if node is not None:
            walk(node, "", {}, set(), refused)
        data = loader.construct_document(node) if node is not None and not refused else None
    except yaml.MarkedYAMLError as e:
        if bad is not None:
            return [], [_not_utf8(path, raw, bad, None, kind)]
        mark = e.problem_mark or e.context_mark
        return [], [f"{path}:{mark.line + 1}: yaml: {' '.join(filter(None, (e.context, e.problem)))}"]
    except yaml.YAMLError as e:
        return [], [f"{path}: yaml: {' '.join(str(e).split())}"]
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        return [], [f"{path}: yaml: nested too deeply for {kind.__name__.lower()} entries"]
    finally:
        loader.dispose()
    if bad is not None:
        return [], [_not_utf8(path, raw, bad, node, kind)]
    if refused:
        line, name, message = refused[0]
        return [], [f"{path}:{line}: {name}: {message}"]
    key = _BOOKS[kind][1]
    expected = f"expected a mapping with one key, `{key}:`, holding a list"
    if not isinstance(data, dict):
        return [], [f"{path}:1: file: {expected}, got {type(data).__name__ if data is not None else 'nothing'}"]
    if unknown := [k for k in data if k != key]:
        return [], [f"{path}:{_key_line(node, unknown[0])}: {unknown[0]}: unknown key; {expected}"]
    if key not in data:
        return [], [f"{path}:1: file: no `{key}:`; {expected}"]
    items = data[key] or []
    list_node = next(v for k, v in node.value if k.value == key)
    if not isinstance(items, list):
        return [], [f"{path}:{list_node.start_mark.line + 1}: {key}: {expected}, got {type(items).__name__}"]
    problems, entries, seen = [], [], {}
    id_field = _BOOKS[kind][2]
    for i, (item, item_node) in enumerate(zip(items, list_node.value if items else [], strict=True)):
        entry, found = _entry(item, item_node, f"{path}:{{line}}: {key}[{i}]", kind)
        problems += found
        if entry is None:
            continue
        name = getattr(entry, id_field)
        if name in seen:
            problems.append(f"{path}:{_key_line(item_node, id_field)}: {key}[{i}] ({id_field} {_one_line(name)}): {id_field}: "
                            f"also the {id_field} of {key}[{seen[name]}]; expected each once")
            continue
        seen[name] = i
        entries.append(entry)
    return ([], problems) if problems else (entries, [])


_FIELDS = {kind: [f for f in dataclasses.fields(kind) if not f.kw_only] for kind in _BOOKS}
_HINTS = {kind: typing.get_type_hints(kind) for kind in _BOOKS}


def _entry(item, node, at: str, kind: type):
    """(the entry, []) of one list item, or (None, its problems); `at` has `{line}` to fill in."""
    id_field = _BOOKS[kind][2]
    label = at + (f" ({id_field} {_one_line(item[id_field])})" if isinstance(item, dict)
                  and isinstance(item.get(id_field), str) else "")
    line = lambda name=None: (_key_line(node, name) if name else None) or node.start_mark.line + 1  # noqa: E731
    names = [f.name for f in _FIELDS[kind]]
    if not isinstance(item, dict):
        return None, [f"{label.format(line=line())}: expected a mapping of {', '.join(names)}, got {type(item).__name__}"]
    problems = []
    for name in item:
        if name not in names:
            problems.append(f"{label.format(line=line(name))}: {name}: unknown field{closest(str(name), names)}; "
                            f"expected: {', '.join(names)}")
    for f in _FIELDS[kind]:
        name = f.name
        if name not in item:
            if f.default is dataclasses.MISSING:
                problems.append(f"{label.format(line=line(name))}: {name}: missing (required)")
            continue
        wrong = _wrong(item[name], _HINTS[kind][name]) or _check(kind, name, item[name])
        if wrong:
            problems.append(f"{label.format(line=line(name))}: {name}: {wrong}")
    if kind is Prompt and "context" in item and "task" not in item:
        problems.append(f"{label.format(line=line('context'))}: context: the passage of a task's input; give the "
                        f"task too (task: qa)")
    if problems:
        return None, problems
    return kind(**item, **({"where": label.format(line=line())} if kind is Prompt else {})), []


def _wrong(value, hint) -> str | None:
    """What is wrong with a value for a field of type `hint` (str, int, list[str], or str | None:
    text when given), or None."""
    if hint == str | None:
        hint = str
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"expected an integer, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) and value.strip() else f"expected non-empty text, got {value!r}"
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        return f"expected a non-empty list of names, got {value!r}"
    return None


def _check(kind: type, name: str, value) -> str | None:
    """Checks of single fields beyond their types."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and (wrong := unsafe_text(text, multiline=kind is Prompt and name in ("text", "context"))):
            return wrong
    if kind is Prompt and name == "id" and not _SLUG.match(value):
        return f"expected a short slug (lowercase letters and digits, words joined by -), got {value!r}"
    if kind is Prompt and name == "task" and value not in TASK_PROMPTS:
        return f"unknown task {value!r}; expected one of: {', '.join(sorted(TASK_PROMPTS))}"
    if kind is Prompt and name == "max_tokens" and value < 1:
        return f"expected at least 1 new token, got {value}"
    if kind is App and name == "link" and not _LINK.match(value):
        return f"expected an http(s):// URL, got {value!r}"
    if kind is App and name == "release" and not _RELEASE.match(value):
        return f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {value!r}"
    if kind is App and name == "adapter" and not _RELEASE.match(value):
        return (f"expected an adapter version (`cpm-lightning release --adapter`), models:/NAME/VERSION or "
                f"models:/NAME@ALIAS, got {value!r}")
    return None


def _one_line(text: str) -> str:
    """An entry's id or name as it is named in a message: one line, at most 60 characters."""
    return escaped(" ".join(text.split()))[:60]


def _key_line(node, name) -> int | None:
    """Line of key `name` in mapping node `node` (its last occurrence, the one YAML keeps)."""
    lines = [k.start_mark.line + 1 for k, _ in node.value if k.value == name]
    return lines[-1] if lines else None


def _not_utf8(path: str, raw: bytes, e: UnicodeDecodeError, node, kind: type) -> str:
    """The problem of bytes that are not UTF-8, naming the entry and field that hold them when
    the file's structure tells (`node`: the file read with them replaced)."""
    line = raw[: e.start].count(b"\n") + 1
    where, name = f"{path}:{line}", "file"
    key = _BOOKS[kind][1]
    list_node = next((v for k, v in node.value if k.value == key), None) if isinstance(node, yaml.MappingNode) else None
    for i, item in enumerate(list_node.value if isinstance(list_node, yaml.SequenceNode) else []):
        for k, v in item.value if isinstance(item, yaml.MappingNode) else []:
            if v.start_mark.line + 1 <= line <= v.end_mark.line + 1:
                ids = [iv.value for ik, iv in item.value if ik.value == _BOOKS[kind][2] and isinstance(iv, yaml.ScalarNode)]
                where += f": {key}[{i}]" + (f" ({_BOOKS[kind][2]} {_one_line(ids[0])})" if ids else "")
                name = k.value
    return f"{where}: {name}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8"
