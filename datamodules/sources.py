"""Data sources: fsspec URLs or globs of text, JSON-lines or Python files (docs/ARCHITECTURE.md, "Data").

A source yields documents. Problems that a user can fix are UserErrors naming the source's
config key; problems with single lines or bytes are counted and reported, not fatal.
"""

from __future__ import annotations

import ast
import json
import lzma
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import fsspec

from cpm_lightning.errors import UserError
from cpm_lightning.ranges import ranged

STDLIB = "stdlib://"  # the running Python's standard library: real text on every machine


@dataclass(kw_only=True)
class SourceConfig:
    """One data source of the mixture."""

    url: str
    """fsspec URL or glob (file://, s3://, https://, memory://, a relative path), plain or .gz.
    stdlib://GLOB matches files of the running Python's standard library."""
    weight: float = ranged(1.0, gt=0, le=1_000_000)
    """Share of training samples drawn from this source, relative to the other weights."""
    format: Literal["text", "jsonl", "python_docstrings"] = "text"
    """text: each file is one document. jsonl: each line is a JSON object, one document.
    python_docstrings: each docstring of each Python file is one document."""
    field: str = "text"
    """jsonl: the key that holds the document's text."""


@dataclass
class ReadStats:
    """What was skipped or repaired while reading a source."""

    bad_lines: int = 0
    replaced_bytes: int = 0
    documents: int = 0


def expand(name: str, src: SourceConfig) -> list[fsspec.core.OpenFile]:
    """The files a source's URL names, sorted, or a UserError if it names none."""
    url = src.url
    if url.startswith(STDLIB):
        url = f"{sysconfig.get_paths()['stdlib']}/{url[len(STDLIB):]}"
    try:
        files = fsspec.open_files(url, mode="rb", compression="infer")
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{where(name, 'url')}: cannot open {src.url!r}: {e}") from None
    files = [f for f in files if f.fs.isfile(f.path)]  # a plain path that does not exist too
    if not files:
        raise UserError(f"{where(name, 'url')}: {src.url!r} matches no file")
    return sorted(files, key=lambda f: f.path)


def where(name: str, field: str = "") -> str:
    """The config key of source `name` (and of its `field`), or `name` itself when it is a
    command-line flag such as --source[0]."""
    if name.startswith("--"):
        return name
    return f"data.sources.{name}" + (f".{field}" if field else "")


def read_bytes(name: str, f: fsspec.core.OpenFile) -> bytes:
    try:
        with f as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # e.g. a .gz file that is not gzip
        raise UserError(f"{where(name)}: cannot read {f.path} ({type(e).__name__}: {e})") from None


def documents(name: str, src: SourceConfig, path: str, data: bytes, stats: ReadStats) -> Iterator[str]:
    """Documents in one file's bytes."""
    if b"\0" in data[:8192]:
        raise UserError(f"{where(name)}: {path} is not text (binary data); expected UTF-8 {src.format}")
    text = data.decode("utf-8", errors="replace")
    stats.replaced_bytes += text.count("\ufffd") - data.count("\ufffd".encode())  # new ones only
    if src.format == "text":
        docs = [text] if text.strip() else []
    elif src.format == "jsonl":
        docs = list(_jsonl(src.field, text, stats))
    else:
        docs = list(_docstrings(text))
    stats.documents += len(docs)
    yield from docs


def _jsonl(field: str, text: str, stats: ReadStats) -> Iterator[str]:
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)[field]
        except (ValueError, KeyError, TypeError, IndexError):
            stats.bad_lines += 1
            continue
        if isinstance(value, str) and value:
            yield value
        else:
            stats.bad_lines += 1


def _docstrings(text: str) -> Iterator[str]:
    try:
        tree = ast.parse(text)
    # Files that are not valid Python (test fixtures in the stdlib), or nested deeper than the
    # parser goes: CPython raises RecursionError or MemoryError for those, whatever memory is free.
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                yield doc


def check_stats(name: str, src: SourceConfig, stats: ReadStats) -> list[str]:
    """Warnings for counted problems; a UserError when nothing usable was left."""
    if stats.documents == 0:
        if stats.bad_lines:
            raise UserError(f"{where(name)}: all {stats.bad_lines} JSONL lines of {src.url!r} are "
                            f"bad (not JSON, or no string field {src.field!r})")
        raise UserError(f"{where(name)}: {src.url!r} holds no text (empty source)")
    warnings = []
    if stats.bad_lines:
        warnings.append(f"{where(name)}: skipped {stats.bad_lines} JSONL lines that are not JSON "
                        f"or lack a string field {src.field!r}")
    if stats.replaced_bytes:
        warnings.append(f"{where(name)}: replaced {stats.replaced_bytes} invalid UTF-8 sequences with U+FFFD")
    return warnings

