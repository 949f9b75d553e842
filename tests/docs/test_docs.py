"""The documentation against the code (README.md and docs/*.md): every relative link and anchor
resolves, every module a page cites exists (and the names it cites in it), and every
`cpm-lightning` verb and `make` target a command shows is one the CLI and the Makefile have. A page
that drifts from the code fails here, not in a reader's hands."""

from __future__ import annotations

import argparse
import ast
import re
from functools import cache
from pathlib import Path

import pytest

from cpm_lightning.cli.main import VERBS, Runs, verbs_parser
from cpm_lightning.live.commands import USAGE as LIVE_USAGE

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRONT_PAGE_LINES = 250

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PY_PATH = re.compile(r"`((?:[\w.]+/)*\w+\.py)\b")
DOTTED = re.compile(r"\bcpm_lightning(?:\.\w+)+")
MODULE_ATTR = re.compile(r"`(\w+)\.([A-Za-z_]\w*(?:\.\w+)*)")
FILE_NAME = re.compile(r"\.(model|json|jsonl|yaml|txt|md|png|safetensors|pt|ckpt|sig|npy|bin|py|db|hashes|cfg)\b")
VERB = re.compile(r"(?:cpm-lightning|-m cpm_lightning\.cli) +([^\s`]+)(?: +([^\s`]+))?")
MAKE = re.compile(r"(?:^|[\s`(;&])make +([\w-]+)", re.M)
# `module.name` where module is a run-config group is a config key (`checkpoint.keep_last`), not code.
GROUPS = {"model", "data", "trainer", "checkpoint", "registry", "tracking", "live", "eval", "config", "commands"}


def prose(text: str) -> str:
    """The page without its fenced blocks and quoted artifacts (`> ...`: a rendered report, whose
    links are the report's own)."""
    text = FENCE.sub("", text)
    return "\n".join(line for line in text.splitlines() if not line.startswith(">"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+)$", prose(page.read_text()), re.M):
        base = slug(heading)
        out.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return frozenset(out)


def link_problems(page: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


@cache
def project_files() -> dict[str, list[Path]]:
    """Every Python file of the project by its name (setup.py at the root too)."""
    found: dict[str, list[Path]] = {path.name: [path] for path in ROOT.glob("*.py")}
    for folder in ("cpm_lightning", "datamodules", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            found.setdefault(path.name, []).append(path)
    return found


def path_exists(cited: str) -> bool:
    """`cpm_lightning/x/y.py`, `datamodules/y.py`, or a path inside a package (`live/watch.py`,
    `hf/mapping.py`) or a bare file name that some project file has."""
    if "/" not in cited:
        return cited in project_files()
    return any(str(p.relative_to(ROOT)).endswith(cited) for p in project_files().get(cited.rsplit("/", 1)[1], []))


@cache
def defined_names(path: Path, inside: str | None = None) -> frozenset[str]:
    """The names a module (or one of its classes) defines at its top level, imports included."""
    body = ast.parse(path.read_text()).body
    if inside is not None:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == inside), [])
    names = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def attribute_exists(module: Path, attrs: list[str]) -> bool:
    """`attrs[0]` defined in the module; `attrs[1]`, when there is one and attrs[0] is a class
    there, defined in that class (a method, a field)."""
    if not attrs or attrs[0] not in defined_names(module):
        return not attrs
    cls = defined_names(module, attrs[0])
    return len(attrs) == 1 or not cls or attrs[1] in cls


def dotted_exists(dotted: str) -> bool:
    """`cpm_lightning.train.sharding.FSDP2Strategy`: packages down to a module, then its names."""
    parts = dotted.split(".")
    here = ROOT
    for i, part in enumerate(parts):
        if (here / part).is_dir():
            here = here / part
        elif (here / f"{part}.py").is_file():
            return attribute_exists(here / f"{part}.py", parts[i + 1:])
        else:
            init = here / "__init__.py"
            return init.is_file() and attribute_exists(init, parts[i:])
    return True


def module_problems(text: str) -> list[str]:
    problems = [f"`{p}`: no such file" for p in PY_PATH.findall(text) if not path_exists(p)]
    problems += [f"{d}: no such module or name" for d in DOTTED.findall(text) if not dotted_exists(d)]
    for module, attrs in MODULE_ATTR.findall(text):
        modules = project_files().get(f"{module}.py", [])
        if module in GROUPS or not modules or FILE_NAME.search(f".{attrs}"):
            continue
        if not any(attribute_exists(m, attrs.split(".")) for m in modules):
            problems.append(f"`{module}.{attrs}`: {module}.py defines no {attrs.split('.')[0]}")
    return problems


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public list of a parser's subcommands.
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


@cache
def verbs() -> dict[str, set[str] | None]:
    """Each verb and its subverbs (None: the verb takes no subverb, so what follows is arguments)."""
    table: dict[str, set[str] | None] = {v: None for v, how in VERBS.items() if isinstance(how, Runs)}
    table["live"] = set(re.findall(r"cpm-lightning live ([a-z]+)", LIVE_USAGE))
    for name, sub in subcommands(verbs_parser()).items():
        table[name] = set(subcommands(sub)) or None
    return table


@cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w-]+) *:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def commands(text: str) -> list[str]:
    """The lines of the fenced blocks, and the inline code spans, that show a command."""
    lines = [line for _, body in FENCE.findall(text) for line in body.splitlines()]
    return lines + CODE_SPAN.findall(prose(text))


def command_problems(text: str) -> list[str]:
    problems = []
    for line in commands(text):
        for match in VERB.finditer(line):
            if line[:match.start()].split()[-1:] and line[:match.start()].split()[-1].startswith("-"):
                continue  # `lm_eval --model cpm-lightning`: the name as an option's value
            verb, sub = match.groups()
            for one in verb.split("\\|"):
                if one not in verbs():
                    problems.append(f"{line.strip()}: cpm-lightning has no verb {one}")
                elif verbs()[one] is not None and sub and not sub.startswith(("-", "(")):
                    problems += [f"{line.strip()}: `cpm-lightning {one}` has no {s}"
                                 for s in sub.split("\\|") if s not in verbs()[one]]
        problems += [f"{line.strip()}: the Makefile has no target {t}" for t in MAKE.findall(line)
                     if t not in make_targets()]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_matches_the_code(page):
    text = page.read_text()
    assert link_problems(page, text) + module_problems(text) + command_problems(text) == []


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= FRONT_PAGE_LINES


def test_every_docs_page_is_on_the_readme_map():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in readme] == []


@pytest.mark.parametrize("text, problem", [
    ("[x](docs/nowhere.md)", "docs/nowhere.md: no such file"),
    ("[x](docs/live.md#no-such-heading)", "docs/live.md#no-such-heading: no heading #no-such-heading in docs/live.md"),
    ("`checkpoint_files.py` opens it", "`checkpoint_files.py`: no such file"),
    ("see cpm_lightning.sharding.FSDP2Strategy", "cpm_lightning.sharding.FSDP2Strategy: no such module or name"),
    ("see cpm_lightning.train.sharding.NoSuchStrategy",
     "cpm_lightning.train.sharding.NoSuchStrategy: no such module or name"),
    ("`run_config.no_such_function`", "`run_config.no_such_function`: run_config.py defines no no_such_function"),
    ("```\ncpm-lightning frobnicate --config x\n```", "cpm-lightning frobnicate --config x: cpm-lightning has no verb frobnicate"),
    ("```\ncpm-lightning proposals frob 3\n```", "cpm-lightning proposals frob 3: `cpm-lightning proposals` has no frob"),
    ("`cpm-lightning live stats --root x`", "cpm-lightning live stats --root x: `cpm-lightning live` has no stats"),
    ("```\nmake deploy\n```", "make deploy: the Makefile has no target deploy"),
])
def test_a_page_that_drifts_is_caught(text, problem):
    page = ROOT / "README.md"
    assert problem in link_problems(page, text) + module_problems(text) + command_problems(text)


def test_what_is_right_passes():
    text = ("[x](docs/live.md#growing-the-model-while-it-trains) `checkpoint/directory.py` `hf/mapping.py` "
            "cpm_lightning.train.sharding.FSDP2Strategy `run_config.GROUPS` `tokenizer.model`\n"
            "```\ncpm-lightning proposals check proposals/\ncpm-lightning live status --root r\nmake test-fast\n```\n"
            "`cpm-lightning fit\\|validate\\|test --config FILE`")
    page = ROOT / "README.md"
    assert link_problems(page, text) + module_problems(text) + command_problems(text) == []
