"""Adding an entry to a proposal's `evidence` list (`proposals trial --write`) as a text edit: every
other byte of the file stays as it was, comments included, which a YAML round trip would not
keep. The edited text is read back and must hold the same proposal with one more entry, or the
file is left alone; it replaces the file in one rename."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.schema import load_proposal, parse_yaml


def append_evidence(path: Path, run_id: str, verdict: str) -> None:
    """Append {run: run_id, verdict: verdict} to the `evidence` of proposal file `path`."""
    proposal, problems = load_proposal(path)
    if problems:
        raise UserError(f"cannot add evidence to {path}: {problems[0]}")
    entry = {"run": run_id, "verdict": " ".join(verdict.split())}
    text = path.read_bytes().decode("utf-8")
    # JSON strings are YAML double-quoted scalars: the run id stays a string even when all digits.
    flow = f"{{run: {json.dumps(entry['run'])}, verdict: {json.dumps(entry['verdict'], ensure_ascii=False)}}}"
    edited = _with_entry(text, flow)
    before, after = parse_yaml(text, str(path), "a proposal")[0], parse_yaml(edited, str(path), "a proposal")[0]
    if after != {**before, "evidence": [*before.get("evidence", []), entry]}:
        raise UserError(f"cannot add evidence to {path} by a text edit (an unusual layout of its `evidence`); "
                        f"add {entry} to it by hand")
    tmp = path.with_name(f".{path.name}.evidence")  # not *.yaml: never read as a proposal
    tmp.write_bytes(edited.encode("utf-8"))
    os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)


def _with_entry(text: str, entry: str) -> str:
    """`text` with `entry` (a YAML flow value) added at the end of its top-level `evidence` list."""
    root = yaml.compose(text)
    found = [(k, v) for k, v in root.value if k.value == "evidence"]
    if not found:  # the field is optional: add it at the end
        newline = "" if text.endswith("\n") else "\n"
        return f"{text}{newline}evidence:\n  - {entry}\n"
    key, value = found[0]
    if value.flow_style and value.value:  # [a, b] -> [a, b, entry]; [a, b,] -> [a, b, entry]
        at = value.end_mark.index - 1
        while text[at - 1].isspace():
            at -= 1
        return f"{text[:at]}{' ' if text[at - 1] == ',' else ', '}{entry}{text[at:]}"
    if value.flow_style:  # [] -> a block list on the next line; a comment after [] stays on its line
        line_end = _line_end(text, value.end_mark.index)
        head, rest = text[:value.start_mark.index], text[value.end_mark.index:line_end]
        if not rest.strip():
            head, rest = head.rstrip(" "), ""
        return f"{head}{rest}\n{' ' * (key.start_mark.column + 2)}- {entry}{text[line_end:]}"
    # A block list: a line like its items' after the last one.
    last = value.value[-1].end_mark.index
    at = last if text[last - 1] == "\n" else _line_end(text, last) + 1
    line = f"{' ' * value.start_mark.column}- {entry}\n"
    return f"{text[:at]}{line}{text[at:]}" if at <= len(text) else f"{text}\n{line}"


def _line_end(text: str, index: int) -> int:
    """The index of the newline that ends the line holding `index` (len(text) on the last line)."""
    end = text.find("\n", index)
    return len(text) if end < 0 else end
