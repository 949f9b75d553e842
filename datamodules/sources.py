"""Data sources: fsspec URLs or globs of text, JSON-lines or Python files (docs/ARCHITECTURE.md, "Data").

A source yields documents. Problems that a user can fix are UserErrors naming the source's
config key; problems with single lines or bytes are counted and reported, not fatal.
"""

from __future__ import annotations

import ast
import codecs
import json
import lzma
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import fsspec
from fsspec.utils import infer_compression
from tqdm.auto import tqdm

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.ranges import ranged
from cpm_lightning.core.tasks import input_text

STDLIB = "stdlib://"  # the running Python's standard library: real text on every machine


@dataclass(kw_only=True)
class SourceConfig:
    """One data source of the mixture."""

    url: str
    """fsspec URL or glob (file://, s3://, https://, memory://, a relative path), plain or .gz.
    stdlib://GLOB matches files of the running Python's standard library."""
    weight: float = ranged(1.0, gt=0, le=1_000_000)
    """Share of training samples drawn from this source, relative to the other weights."""
    format: Literal["text", "jsonl", "python_docstrings", "task"] = "text"
    """text: each file is one document. jsonl: each line is a JSON object, one document.
    python_docstrings: each docstring of each Python file is one document. task: each line is a
    task sample, {"task": NAME, "input": TEXT, "output": TEXT, "context": TEXT (optional)}
    (datamodules/tasks.py)."""
    field: str = "text"
    """jsonl: the key that holds the document's text."""


@dataclass
class ReadStats:
    """What was skipped or repaired while reading a source."""

    bad_lines: int = 0
    replaced_bytes: int = 0
    documents: int = 0


# What a store reports that changes when a file's contents change: local and NFS files (mtime),
# HTTP servers (ETag, Last-Modified), S3 (ETag, LastModified), GCS (md5Hash, generation),
# memory:// (created). Size alone is not enough: an edit can keep it.
STABLE_KEYS = ("mtime", "ETag", "Content-MD5", "Digest", "Last-Modified", "LastModified", "last_modified",
               "md5Hash", "crc32c", "generation", "updated", "created")
READ_BYTES = 1 << 22
"""Bytes read from a file at a time (4 MiB): preparing a source holds a few of these, not its files."""
SEGMENT_CHARS = 1 << 18
"""A longer document reaches the tokenizer in segments of about this many characters (256 Ki),
cut where no token crosses (SAFE_CUT), so that its tokens equal those of the whole."""
SAFE_CUT = re.compile(r"(?<=\S)(?= )|(?<=\n)(?=\S)")
"""Where a document may be cut: before a space that follows a non-space, or after a newline
that a non-space follows. Both tokenizers start a new word there: SentencePiece splits words
at whitespace ("\\n" is a piece of its own), jieba yields each whitespace character alone."""
FORCED_CUT = 2
"""A run of more than FORCED_CUT x SEGMENT_CHARS characters with no SAFE_CUT in it (no
whitespace: minified code, base64, a long CJK line) is cut at SEGMENT_CHARS anyway: its tokens
may differ from the whole's at that cut, but the build stays within its memory bound."""
REPLACEMENT = "\ufffd".encode()


def stable_metadata(info: dict) -> dict | None:
    """Size and the STABLE_KEYS of a store's report on a file (json-able), or None if it has none
    of them."""
    stable = {k: str(info[k]) for k in STABLE_KEYS if info.get(k) is not None}
    return {"size": int(info.get("size") or 0), **stable} if stable else None


@dataclass
class SourceFile:
    """A file of a source, with what its store reported about it when it was listed."""

    file: fsspec.core.OpenFile
    info: dict

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def size(self) -> int:
        return int(self.info.get("size") or 0)

    def metadata(self) -> dict | None:
        return stable_metadata(self.info)

    def still_the_same(self) -> bool:
        """Whether the store reports the same metadata as when the file was listed."""
        try:
            return stable_metadata(self.file.fs.info(self.file.path)) == self.metadata()
        except OSError:  # gone
            return False


def expand(name: str, src: SourceConfig) -> list[SourceFile]:
    """The files a source's URL names, sorted, each with its store's report (one request per
    file for a remote store, no contents read), or a UserError if it names none."""
    url = src.url
    if url.startswith(STDLIB):
        url = f"{sysconfig.get_paths()['stdlib']}/{url[len(STDLIB):]}"
    try:
        fs, path = fsspec.core.url_to_fs(url)
        # Not fsspec.open_files: it asks isdir() of every match, which over HTTP downloads each file.
        found = fs.glob(path) if fsspec.core.has_magic(path) else [path]
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{where(name, 'url')}: cannot open {src.url!r}: {e}") from None
    listed = []
    for p in sorted(found):
        try:  # info() as still_the_same() asks it (a listing may word it otherwise); s3fs answers from its listing
            info = fs.info(p)
        except (OSError, ValueError):  # a plain path that does not exist, or cannot (a NUL byte)
            continue
        if info.get("type") == "file":
            listed.append(SourceFile(fsspec.core.OpenFile(fs, p, "rb", compression=infer_compression(p)), info))
    if not listed:
        raise UserError(f"{where(name, 'url')}: {src.url!r} matches no file")
    return listed


def where(name: str, field: str = "") -> str:
    """The config key of source `name` (and of its `field`), or `name` itself when it is a
    command-line flag such as --source[0]."""
    if name.startswith("--"):
        return name
    return f"data.sources.{name}" + (f".{field}" if field else "")


_ANSWERS_RANGES: dict[str, bool] = {}
"""Per HTTP source URL, whether its server answers range requests: probed once per process,
when the first of its files is read (a warm start, which reads no file, asks nothing)."""


def _answers_ranges(fs, path: str) -> bool:
    """Whether the HTTP server of `path` (2 bytes or more) answers a request for its second byte
    with that byte: one request; fsspec raises ValueError when the answer is the whole file."""
    try:
        with fs.open(path, "rb", block_size=1, cache_type="none") as fh:
            fh.seek(1)
            fh.read(1)
    except ValueError:
        return False
    return True


def _open(name: str, src: SourceConfig, f: SourceFile):
    """`f` opened for reading from its start. fsspec reads an HTTP file in blocks, by range
    requests; from a server that ignores them (python -m http.server, some CDNs) it can only
    stream a file, in one request (block_size=0), which is all a build needs: it reads in order.
    A file of one block is fetched whole from its start, so it needs no ranges, nor the probe."""
    fs = f.file.fs
    if "http" not in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol) or f.size <= fs.block_size:
        return f.file
    if src.url not in _ANSWERS_RANGES:
        _ANSWERS_RANGES[src.url] = _answers_ranges(fs, f.path)
        if not _ANSWERS_RANGES[src.url]:
            tqdm.write(f"warning: {where(name, 'url')}: the server of {src.url!r} answers no range requests; "
                       "its files are streamed, each in one request from its start", file=sys.stderr)  # above the build's bar
    if _ANSWERS_RANGES[src.url]:
        return f.file
    return fs.open(f.path, "rb", block_size=0, compression=f.file.compression)


def read_text(name: str, src: SourceConfig, f: SourceFile, stats: ReadStats, hasher=None) -> Iterator[str]:
    """The text of a file, decoded as UTF-8 (invalid bytes replaced and counted) READ_BYTES at a
    time; `hasher` (a hashlib object) is updated with its bytes as they are read."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    tail, first = b"", True
    try:
        with _open(name, src, f) as fh:
            while True:
                data = fh.read(READ_BYTES)
                if first and b"\0" in data[:8192]:
                    raise UserError(f"{where(name)}: {f.path} is not text (binary data); expected UTF-8 {src.format}")
                first = False
                if hasher is not None:
                    hasher.update(data)
                literal = (tail + data).count(REPLACEMENT)  # U+FFFD in the file itself, also across reads
                tail = data[-2:]
                text = decoder.decode(data, final=not data)
                stats.replaced_bytes += text.count("\ufffd") - literal
                if text:
                    yield text
                if not data:
                    return
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # e.g. a .gz file that is not gzip
        raise UserError(f"{where(name)}: cannot read {f.path} ({type(e).__name__}: {e})") from None


def cut(pieces: Iterable[str]) -> Iterator[tuple[str, bool, bool]]:
    """One document, given as consecutive pieces of text, as (segment, first, last) of at most
    about SEGMENT_CHARS characters each, cut at SAFE_CUT (or, in a long run with no such place,
    at FORCED_CUT)."""
    buf, first, scanned, max_chars = "", True, 0, SEGMENT_CHARS
    for piece in pieces:
        buf += piece
        while len(buf) > max_chars:
            at = None
            for lo in (max_chars - 4096, 1):  # the last place to cut is nearly always near the end
                for m in SAFE_CUT.finditer(buf, max(lo, scanned, 1), max_chars + 1):
                    at = m.start()
                if at is not None:
                    break
            if at is None and (m := SAFE_CUT.search(buf, max(max_chars, scanned))):
                at = m.start()
            if at is None and len(buf) > FORCED_CUT * max_chars:
                at = max_chars
            if at is None:  # no place to cut yet: read on, without scanning this text again
                scanned = max(len(buf) - 1, 1)
                break
            yield buf[:at], first, False
            buf, first, scanned = buf[at:], False, 0
    yield buf, first, True


def segments(name: str, src: SourceConfig, f: SourceFile, stats: ReadStats, hasher=None) -> Iterator[tuple[str, bool, bool]]:
    """The documents of a file as (segment, first, last) in order (see `cut`); holds one read,
    one document of jsonl, or a whole Python file (parsed for its docstrings) at a time."""
    text = read_text(name, src, f, stats, hasher)
    if src.format == "text":  # the file is one document, unless it is blank
        out = cut(text)
        head = next(out)
        if head[2] and not head[0].strip():  # one segment, all whitespace: no document
            return
        stats.documents += 1
        yield head
        yield from out
    elif src.format == "task":  # a tokenizer trained on the source learns its inputs and outputs
        for record in task_records(name, f, lines(text), stats):
            yield from cut([record.input])
            yield from cut([record.output])
    else:
        docs = _jsonl(src.field, lines(text), stats) if src.format == "jsonl" else _docstrings("".join(text))
        for doc in docs:
            stats.documents += 1
            yield from cut([doc])


def documents(name: str, src: SourceConfig, f: SourceFile, stats: ReadStats) -> Iterator[str]:
    """The documents of one file, each whole."""
    parts = []
    for segment, _, last in segments(name, src, f, stats):
        parts.append(segment)
        if last:
            yield "".join(parts)
            parts = []


def lines(text: Iterable[str]) -> Iterator[str]:
    """The lines of text given in pieces, as str.splitlines() would split the whole."""
    rest = ""
    for piece in text:
        *done, rest = (rest + piece).split("\n")
        for line in done:
            yield from line.splitlines()
    yield from rest.splitlines()


def _jsonl(field: str, lines: Iterable[str], stats: ReadStats) -> Iterator[str]:
    for line in lines:
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


@dataclass
class TaskRecord:
    """One line of a task source: its task's name, and the input (with its context) and output texts."""

    task: str
    input: str
    output: str


def task_records(name: str, f: SourceFile, lines: Iterable[str], stats: ReadStats) -> Iterator[TaskRecord]:
    """The samples of a task file; a line that is not one is an error naming it (a sample trained
    without its output, or with half of it, would teach the task wrong)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"{where(name)}: {f.path}:{number}"
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{at}: not JSON; expected a task sample {TASK_LINE}") from None
        if not isinstance(record, dict):
            raise UserError(f"{at}: not a JSON object; expected a task sample {TASK_LINE}")
        for key in ("task", "input", "output"):
            if not isinstance(record.get(key), str):
                raise UserError(f"{at}: no string {key!r}; expected a task sample {TASK_LINE}")
            if not record[key].strip():
                raise UserError(f"{at}: the {key} is empty")
        context = record.get("context")
        if context is not None and not isinstance(context, str):
            raise UserError(f"{at}: 'context' is not a string")
        stats.documents += 1
        yield TaskRecord(record["task"], input_text(record["input"], context), record["output"])


TASK_LINE = '{"task": ..., "input": ..., "output": ..., "context": ... (optional)}'


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

