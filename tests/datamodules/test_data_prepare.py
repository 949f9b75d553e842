"""Preparing data at scale (issue 16): pieces keyed by file metadata, streamed, resumable, split
over machines by `data prepare --part`, and the same token stream as one shard of the whole."""

from __future__ import annotations

import errno
import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import pytest
from conftest import EN, ZH, english_text, write_config

from cpm_lightning.cli.main import main
from cpm_lightning.core.tokenizer import CpmAntTokenizer, Tokenizer, save_tokenizer, train_tokenizer
from datamodules import shards, sources
from datamodules.pretrain import PretrainDataModule, TrainStream
from datamodules.remote import RemoteCache
from datamodules.shards import open_source, prepare_source
from datamodules.sources import SourceConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    save_tokenizer(train_tokenizer([english_text(100), "\n".join(ZH * 20)], 300), str(path))
    return path


def write_files(root: Path, count: int = 6) -> Path:
    """`count` text files of a few KB, and a long one last (English and Chinese, many lines)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"part-{i}.txt").write_text(english_text(20 + 7 * i) + "\n" + ZH[i % 3] * (i + 1))
    (root / "part-9-long.txt").write_text("\n".join(f"{EN[i % 3]} {ZH[i % 3]}\n\t{i}" for i in range(300)))
    return root


def whole_stream(src: SourceConfig, tok: Tokenizer) -> list[int]:
    """The token stream of one shard of the whole source, as built before pieces: every
    document encoded whole, each followed by EOS."""
    stats, out = sources.ReadStats(), []
    for doc in shards.iter_documents("s", src, stats, progress=False):
        out += tok.encode(doc) + [tok.eos_id]
    return out


def stream(cache: Path, manifest: Path) -> list[int]:
    source = open_source(manifest, cache)
    return source.read(0, len(source)).tolist()


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of ~4 KB and segments of ~200 characters: a tiny source behaves like a large one."""
    monkeypatch.setattr(shards, "PIECE_BYTES", 4000)
    monkeypatch.setattr(sources, "SEGMENT_CHARS", 200)


def count_reads(monkeypatch) -> list[str]:
    """The files the builds read (appended to the returned list)."""
    read = []
    real = shards.segments
    monkeypatch.setattr(shards, "segments", lambda name, src, f, *a: read.append(Path(f.path).name) or real(name, src, f, *a))
    return read


def test_pieces_and_segments_give_the_stream_and_the_samples_of_one_whole_shard(tmp_path, tokenizer, small_pieces,
                                                                               monkeypatch):
    files = write_files(tmp_path / "text")
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": english_text(12 + i)}) for i in range(3)))
    tok = Tokenizer.load(str(tokenizer))
    for src in (SourceConfig(url=str(files / "*.txt")), SourceConfig(url=str(jsonl), format="jsonl")):
        manifest = prepare_source("s", src, tok, tmp_path / "cache")
        assert stream(tmp_path / "cache", manifest) == whole_stream(src, tok)
    assert len(open_source(prepare_source("s", SourceConfig(url=str(files / "*.txt")), tok, tmp_path / "cache"),
                           tmp_path / "cache").pieces) > 3

    def samples(cache: str) -> list[list[int]]:
        dm = PretrainDataModule({"a": SourceConfig(url=str(files / "*.txt"), weight=2.0),
                                 "b": SourceConfig(url=str(jsonl), format="jsonl")},
                                tokenizer=str(tokenizer), seq_len=16, cache_dir=cache)
        dm.prepare_data()
        dm.setup()
        it = iter(TrainStream(dm, 0, 1, 4))
        return [next(it)["input_ids"].tolist() for _ in range(60)]

    in_pieces = samples(str(tmp_path / "cache"))
    monkeypatch.setattr(shards, "PIECE_BYTES", 1 << 30)  # one piece per source, as before
    monkeypatch.setattr(sources, "SEGMENT_CHARS", 1 << 30)
    assert samples(str(tmp_path / "one-shard")) == in_pieces


def test_a_long_document_cut_into_segments_has_the_tokens_of_the_whole(tokenizer, monkeypatch):
    text = "\n".join(f"{EN[i % 3]}  {ZH[i % 3]}{ZH[(i + 1) % 3]}\n\n\t x{i} " for i in range(200))
    monkeypatch.setattr(sources, "SEGMENT_CHARS", 50)
    cuts = list(sources.cut(iter(text[i:i + 333] for i in range(0, len(text), 333))))
    assert len(cuts) > 100 and "".join(s for s, _, _ in cuts) == text
    words = ["<pad>", "<unk>", "<s>", "</s>", "</_>", "</n>", *sorted(set(text) - {" ", "\n"}), "It", "is", "子曰", "學而"]
    cpm_ant = CpmAntTokenizer("\n".join(words).encode() + b"\n")  # CPM-Ant's vocab.txt kind, with jieba
    for tok in (Tokenizer.load(str(tokenizer)), cpm_ant):
        ids = []
        for segment, first, _ in cuts:
            ids += tok.encode_batch([segment], continued=not first)[0]
        assert ids == tok.encode(text)


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory and records each request's (method, path); `last_modified` False
    leaves out the Last-Modified header (a store with no stable metadata)."""

    requests: list[tuple[str, str]]
    last_modified = True

    def log_message(self, *args):
        self.requests.append((self.command, self.path))

    def send_header(self, keyword, value):
        if keyword != "Last-Modified" or self.last_modified:
            super().send_header(keyword, value)


@pytest.fixture
def served(tmp_path):
    def serve(last_modified: bool = True, handler: type = CountingHandler):
        requests = []
        handler = type("Handler", (handler,), {"requests": requests, "last_modified": last_modified})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
        server.handle_error = lambda *args: None  # a client that closes early (a range probe) is no failure
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", requests

    servers = []
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_warm_start_of_an_http_source_reads_no_file(tmp_path, tokenizer, served):
    write_files(tmp_path / "web", count=4)
    url, requests = served()

    def start():
        dm = PretrainDataModule({"web": SourceConfig(url=f"{url}/web/*.txt")}, tokenizer=str(tokenizer), seq_len=16)
        dm.prepare_data()
        dm.setup()
        next(iter(TrainStream(dm, 0, 1, 2)))
        return [path for method, path in requests if method == "GET" and path.endswith(".txt")]

    assert sorted(start()) == [f"/web/part-{i}.txt" for i in range(4)] + ["/web/part-9-long.txt"]
    requests.clear()
    assert start() == []  # the files' HEAD answers (size, Last-Modified) are the cache key
    assert {method for method, _ in requests} <= {"GET", "HEAD"} and requests


def test_a_store_without_stable_metadata_is_hashed_with_a_warning(tmp_path, tokenizer, served, capsys):
    write_files(tmp_path / "web", count=1)
    url, requests = served(last_modified=False)
    dm = PretrainDataModule({"web": SourceConfig(url=f"{url}/web/part-0.txt")}, tokenizer=str(tokenizer), seq_len=16)
    dm.prepare_data()
    size = (tmp_path / "web" / "part-0.txt").stat().st_size
    assert (f"warning: data.sources.web: the store of '{url}/web/part-0.txt' reports no modification time, ETag "
            f"or checksum for 1 file(s); their {size:,} bytes are read and hashed at every start to tell whether "
            "the cache holds them") in capsys.readouterr().err.splitlines()


KILLER = """
import os, signal, sys
from pathlib import Path
from datamodules import shards, sources
from datamodules.shards import prepare_source
from datamodules.sources import SourceConfig
from cpm_lightning.core.tokenizer import Tokenizer

shards.PIECE_BYTES, sources.SEGMENT_CHARS = 4000, 200
real = shards.segments
def segments(name, src, f, *a):
    if f.path.endswith("part-4.txt"):  # a few pieces in: killed as a machine is, nothing cleaned up
        os.kill(os.getpid(), signal.SIGKILL)
    return real(name, src, f, *a)
shards.segments = segments
prepare_source("s", SourceConfig(url=sys.argv[1]), Tokenizer.load(sys.argv[2]), Path(sys.argv[3]))
"""


def test_a_build_killed_midway_resumes_with_the_unfinished_pieces_only(tmp_path, tokenizer, small_pieces, monkeypatch):
    files, cache = write_files(tmp_path / "text"), tmp_path / "cache"
    src, tok = SourceConfig(url=str(files / "*.txt")), Tokenizer.load(str(tokenizer))
    killed = subprocess.run([sys.executable, "-c", KILLER, src.url, str(tokenizer), str(cache)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    done = {p.name for p in (cache / "shards").iterdir() if not p.name.startswith(".")}
    assert done and list((cache / "shards").glob(".*"))  # finished pieces, and the killed one's temporary directory
    read = count_reads(monkeypatch)
    manifest = prepare_source("s", src, tok, cache)
    pieces = [p["files"] for p in json.loads(manifest.read_text())["pieces"]]
    finished = [Path(f).name for p in pieces[:len(done)] for f in p]
    assert "part-4.txt" not in finished and read == [Path(f).name for p in pieces[len(done):] for f in p]
    assert stream(cache, manifest) == whole_stream(src, tok)
    assert not list((cache / "shards").glob(".*"))  # the dead build's directory is gone


def test_a_file_that_changes_while_it_is_tokenized_is_redone(tmp_path, tokenizer, monkeypatch, capsys):
    path = tmp_path / "a.txt"
    path.write_text(english_text(10))
    tok, real = Tokenizer.load(str(tokenizer)), shards.segments

    def segments(name, src, f, *a):
        yield from real(name, src, f, *a)
        if path.read_text() == english_text(10):  # a writer appends once we have read it
            path.write_text(english_text(12))
            os.utime(path, ns=(1, 1))

    monkeypatch.setattr(shards, "segments", segments)
    src = SourceConfig(url=str(path))
    manifest = prepare_source("a", src, tok, tmp_path / "cache")
    assert f"warning: data.sources.a: {path} changed while it was tokenized; preparing it again" in capsys.readouterr().err
    assert stream(tmp_path / "cache", manifest) == tok.encode(english_text(12)) + [tok.eos_id]


def test_two_builders_of_one_piece_one_wins_and_the_other_drops_its_work(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text(english_text(10))
    tok, src, real = Tokenizer.load(str(tokenizer)), SourceConfig(url=str(path)), shards.segments
    other = []

    def segments(name, src_, f, *a):
        if not other:  # another machine finishes the same piece while this one is at it
            other.append(True)
            other.append(prepare_source("a", src, tok, tmp_path / "cache"))
        return real(name, src_, f, *a)

    monkeypatch.setattr(shards, "segments", segments)
    manifest = prepare_source("a", src, tok, tmp_path / "cache")
    assert manifest == other[1]
    assert [p.name for p in (tmp_path / "cache" / "shards").iterdir()] == [open_source(manifest, tmp_path / "cache").pieces[0].path.name]
    assert stream(tmp_path / "cache", manifest) == tok.encode(english_text(10)) + [tok.eos_id]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_part_workers_make_a_cache_that_fit_uses_without_tokenizing(tmp_path, corpus, small_pieces, monkeypatch, capsys):
    corpus["en"] = write_files(tmp_path / "text") / "*.txt"
    config = write_config(tmp_path / "config.yaml", corpus, **{"trainer.max_steps": 1, "trainer.limit_val_batches": 0})
    code, out, err = run_cli(capsys, "data", "prepare", "--config", config, "--part", "0/2")
    assert code == 0, err
    assert "waiting for the pieces of other parts" in out
    first = {p.name for p in (tmp_path / "cache" / "shards").iterdir()}
    code, out, err = run_cli(capsys, "data", "prepare", "--config", config, "--part", "1/2")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all("; complete (" in line for line in lines), out
    second = {p.name for p in (tmp_path / "cache" / "shards").iterdir()} - first
    assert first and second  # each part built pieces of its own
    read = count_reads(monkeypatch)
    code, _, err = run_cli(capsys, "fit", "--config", config)
    assert code == 0, err
    assert read == [] and "training a" not in err


@pytest.mark.parametrize("part, expected", [
    ("2/2", "--part 2/2: the index must be at least 0 and below the number of parts (2)"),
    ("1", "--part: expected I/N (this machine's index from 0 and the number of machines, e.g. 0/4), got '1'"),
])
def test_data_prepare_part_out_of_range(part, expected, tmp_path, corpus, capsys):
    config = write_config(tmp_path / "config.yaml", corpus)
    code, _, err = run_cli(capsys, "data", "prepare", "--config", config, "--part", part)
    assert (code, err.strip()) == (2, f"error: {expected}")


def test_data_prepare_into_a_cache_that_cannot_be_written(tmp_path, corpus, tokenizer, capsys):
    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / "cache"
    config = write_config(tmp_path / "config.yaml", corpus, **{"data.cache_dir": str(cache),
                                                             "data.tokenizer": str(tokenizer)})
    code, _, err = run_cli(capsys, "data", "prepare", "--config", config)
    assert (code, err.strip()) == (2, f"error: data.cache_dir: cannot write the data cache {cache} (Not a directory); "
                                      "expected a writable directory (or set $CPM_LIGHTNING_CACHE)")
    assert (tmp_path / "file").read_text() == "not a directory"


def test_data_prepare_names_an_unknown_key_of_a_source(tmp_path, corpus, capsys):
    config = write_config(tmp_path / "config.yaml", corpus, **{"data.sources.en.wieght": 2})
    code, _, err = run_cli(capsys, "data", "prepare", "--config", config)
    assert code == 2 and err.strip() == (f"error: {config}: data.sources.en.wieght: unknown key; expected: "
                                         "url, weight, format, field")


def test_data_prepare_covers_the_sources_that_accepted_data_proposals_add_later(tmp_path, corpus):
    from conftest import write_proposal

    from cpm_lightning.registry.commands import data_configs

    extra = tmp_path / "extra.txt"
    extra.write_text(english_text(5))
    write_proposal(tmp_path / "registry", 1, {"data.sources.extra": {"url": str(extra), "weight": 0.5}}, kind="data",
                   effective_from_step=10)
    write_proposal(tmp_path / "registry", 2, {"data.sources.more": {"url": str(extra)}}, kind="data", status="draft")
    config = write_config(tmp_path / "config.yaml", corpus, **{"registry.path": str(tmp_path / "registry"),
                                                             "registry.allowed_sources": [str(tmp_path)]})
    assert [sorted(d.sources) for d in data_configs(config)] == [["en", "zh"], ["en", "extra", "zh"]]


@pytest.mark.slow
def test_part_workers_fill_a_url_cache_that_fit_uses_from_an_empty_mirror(tmp_path, corpus, small_pieces, monkeypatch,
                                                                          capsys):
    """`file://` goes through fsspec's generic code, as s3:// or gs:// would. Each machine has
    a local mirror of its own."""
    corpus["en"] = write_files(tmp_path / "text") / "*.txt"
    remote = tmp_path / "remote"

    def config(mirror: str) -> Path:
        return write_config(tmp_path / f"{mirror}.yaml", corpus, **{
            "trainer.max_steps": 1, "trainer.limit_val_batches": 0, "data.cache_dir": f"file://{remote}",
            "data.local_cache": str(tmp_path / mirror)})

    for part in ("0/2", "1/2"):
        code, out, err = run_cli(capsys, "data", "prepare", "--config", config(f"mirror-{part[0]}"), "--part", part)
        assert code == 0, err
    assert all("; complete (" in line for line in out.splitlines()), out
    keys = {p.name for p in (remote / "shards").iterdir()}
    assert len(keys) > 2 and all((remote / "shards" / k / "complete").exists() for k in keys)
    assert list((remote / "tokenizers").glob("*.model")) and len(list((remote / "manifests").glob("*.json"))) == 2
    read = count_reads(monkeypatch)
    code, _, err = run_cli(capsys, "fit", "--config", config("fit-mirror"))
    assert code == 0, err
    assert read == [] and "training a" not in err
    assert {p.name for p in (tmp_path / "fit-mirror" / "shards").iterdir()} == keys  # downloaded, none built


def test_a_piece_without_its_marker_in_a_url_cache_is_built_again(tmp_path, tokenizer, small_pieces, monkeypatch):
    """An uploader killed before it wrote a piece's marker leaves a piece no reader takes."""
    files, url = write_files(tmp_path / "text"), f"file://{tmp_path / 'remote'}"
    src, tok = SourceConfig(url=str(files / "*.txt")), Tokenizer.load(str(tokenizer))
    manifest = prepare_source("s", src, tok, tmp_path / "mirror-a", remote=RemoteCache(url))
    pieces = json.loads(manifest.read_text())["pieces"]
    half = tmp_path / "remote" / "shards" / pieces[1]["key"]
    (half / "complete").unlink()
    for tokens in half.glob("*/tokens.bin"):
        tokens.write_bytes(tokens.read_bytes()[:10])  # and its upload cut short
    read = count_reads(monkeypatch)
    manifest = prepare_source("s", src, tok, tmp_path / "mirror-b", remote=RemoteCache(url))
    assert read == [Path(f).name for f in pieces[1]["files"]]
    assert stream(tmp_path / "mirror-b", manifest) == whole_stream(src, tok)
    assert (half / "complete").exists()  # uploaded again, whole


def test_two_uploaders_of_one_piece_to_a_url_cache_one_wins_and_the_other_drops_its_copy(tmp_path, tokenizer,
                                                                                         monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text(english_text(10))
    tok, src, url = Tokenizer.load(str(tokenizer)), SourceConfig(url=str(path)), f"file://{tmp_path / 'remote'}"
    real, other = RemoteCache._put, []

    def put(self, local, rel):
        if not other:  # another machine completes its upload of the same piece while this one uploads
            other.append(True)
            other.append(prepare_source("a", src, tok, tmp_path / "mirror-b", remote=RemoteCache(url)))
        real(self, local, rel)

    monkeypatch.setattr(RemoteCache, "_put", put)
    manifest = prepare_source("a", src, tok, tmp_path / "mirror-a", remote=RemoteCache(url))
    [piece] = (tmp_path / "remote" / "shards").iterdir()
    upload = (piece / "complete").read_text()
    assert sorted(p.name for p in piece.iterdir()) == sorted(["complete", upload])  # the loser's copy is gone
    assert stream(tmp_path / "mirror-a", manifest) == stream(tmp_path / "mirror-b", other[1])


@pytest.mark.parametrize("url, expected", [
    ("nosuchproto://x", "error: data.cache_dir: cannot read and write the data cache nosuchproto://x (ValueError: "
                        "Protocol not known: nosuchproto); expected a local directory or an fsspec URL of a store "
                        "this machine can read and write (or set $CPM_LIGHTNING_CACHE)"),
    ("file://{tmp}/file/cache", "error: data.cache_dir: cannot read and write the data cache file://{tmp}/file/cache ("),
])
def test_data_prepare_into_a_url_cache_that_cannot_be_used(url, expected, tmp_path, corpus, tokenizer, capsys):
    (tmp_path / "file").write_text("not a directory")
    url, expected = url.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    config = write_config(tmp_path / "config.yaml", corpus, **{"data.cache_dir": url, "data.tokenizer": str(tokenizer)})
    code, out, err = run_cli(capsys, "data", "prepare", "--config", config)
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1 and not out, err
    assert (tmp_path / "file").read_text() == "not a directory"


class RangeHandler(CountingHandler):
    """A server that answers `Range: bytes=A-B` with 206 and those bytes, as most do."""

    def send_head(self):
        wanted = self.headers.get("Range")
        if not wanted or self.command != "GET":
            return super().send_head()
        start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
        data = Path(self.translate_path(self.path)).read_bytes()[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/*")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)


def test_an_http_source_on_a_server_without_ranges_is_streamed_with_one_warning(tmp_path, tokenizer, served,
                                                                                 monkeypatch, capsys):
    """python -m http.server answers a range request with the whole file; fsspec reads a file
    larger than its 5 MiB block by ranges, and stops at the second block with a ValueError."""
    monkeypatch.setattr(shards, "PIECE_BYTES", 4000)  # a piece per file
    web = tmp_path / "web"
    web.mkdir()
    (web / "a-big.txt").write_text(english_text(60_000))  # 16 MB: beyond the blocks fsspec reads from the start
    (web / "b-small.txt").write_text(english_text(30))
    url, requests = served()
    src, tok = SourceConfig(url=f"{url}/web/*.txt"), Tokenizer.load(str(tokenizer))
    manifest = prepare_source("web", src, tok, tmp_path / "cache")
    warning = (f"warning: data.sources.web.url: the server of '{url}/web/*.txt' answers no range requests; its "
               "files are streamed, each in one request from its start")
    assert re.split(r"[\r\n]", capsys.readouterr().err).count(warning) == 1
    assert stream(tmp_path / "cache", manifest) == whole_stream(SourceConfig(url=str(web / "*.txt")), tok)
    gets = [p for method, p in requests if method == "GET" and p.endswith(".txt")]
    assert sorted(gets) == ["/web/a-big.txt", "/web/a-big.txt", "/web/b-small.txt"]  # the probe, then one read each
    small = json.loads(manifest.read_text())["pieces"][1]["key"]
    shutil.rmtree(tmp_path / "cache" / "shards" / small)
    requests.clear()
    assert stream(tmp_path / "cache", prepare_source("web", src, tok, tmp_path / "cache")) == stream(
        tmp_path / "cache", manifest)  # resumed per piece: the missing one only, and no second probe
    assert [p for method, p in requests if method == "GET" and p.endswith(".txt")] == ["/web/b-small.txt"]
    assert warning not in capsys.readouterr().err


def test_an_http_server_that_answers_ranges_is_read_by_ranges(tmp_path, served):
    from datamodules.sources import _answers_ranges

    (tmp_path / "a.txt").write_text("hello")
    fs = fsspec.filesystem("http")
    url, _ = served()
    assert not _answers_ranges(fs, f"{url}/a.txt")
    url, requests = served(handler=RangeHandler)
    assert _answers_ranges(fs, f"{url}/a.txt") and requests == [("HEAD", "/a.txt"), ("GET", "/a.txt")]


def test_a_long_run_without_word_starts_is_cut_at_the_segment_size(monkeypatch):
    monkeypatch.setattr(sources, "SEGMENT_CHARS", 100)
    text = "x" * 1000 + " then words " + "y" * 450
    cuts = list(sources.cut(iter(text[i:i + 64] for i in range(0, len(text), 64))))
    assert "".join(s for s, _, _ in cuts) == text
    assert max(len(s) for s, _, _ in cuts) <= sources.FORCED_CUT * 100 + 64  # a read more than the bound, at most
    assert [first for _, first, _ in cuts] == [True] + [False] * (len(cuts) - 1) and cuts[-1][2]


PEAK = """
import random, re, string, sys
from pathlib import Path
from datamodules import shards
from datamodules.shards import prepare_source
from datamodules.sources import SourceConfig
from cpm_lightning.core.tokenizer import Tokenizer

path = Path(sys.argv[3]) / "minified.txt"
letters = random.Random(0).choices(string.ascii_letters, k=1 << 20)
path.write_text("".join(letters) * 8)  # 8 MiB, no whitespace: one word to SAFE_CUT
shards.ENCODE_CHARS = 1 << 20  # tokens of 1 Mi characters at a time: ~40 MB
tok = Tokenizer.load(sys.argv[1])

def peak_kb():  # not ru_maxrss: a child started by a large parent (pytest) inherits its peak
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1])

before = peak_kb()
prepare_source("s", SourceConfig(url=str(path)), tok, Path(sys.argv[2]))
print((peak_kb() - before) // 1024)
"""


def test_a_file_without_whitespace_is_prepared_within_the_memory_bound(tmp_path, tokenizer):
    """Whole, its 8 Mi characters would reach the tokenizer in one call: ~300 MB of token lists."""
    run = subprocess.run([sys.executable, "-c", PEAK, str(tokenizer), str(tmp_path / "cache"), str(tmp_path)],
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 120, f"the build grew by {run.stdout.strip()} MB"


@pytest.mark.parametrize("fails, written", [("save", "shards/[0-9a-f]{32}"), ("replace", "manifests/[0-9a-f]{32}.json")])
def test_a_full_disk_under_data_prepare_is_one_line_naming_the_path_and_nothing_half_written(
        fails, written, tmp_path, corpus, tokenizer, monkeypatch, capsys):
    config = write_config(tmp_path / "config.yaml", corpus, **{"data.tokenizer": str(tokenizer)})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.np if fails == "save" else shards.os, fails, full)  # index.npy, or the manifest
    code, out, err = run_cli(capsys, "data", "prepare", "--config", config)
    cache = tmp_path / "cache"
    assert code == 2 and not out and re.fullmatch(
        f"error: data.cache_dir: cannot write {cache}/{written} \\(No space left on device\\); nothing of it was "
        "kept\n", err), err
    assert not [p for p in cache.glob("*/*") if p.name.startswith(".") or p.parent.name == "manifests"]
    pieces = [p for p in (cache / "shards").iterdir()]
    assert (pieces == []) == (fails == "save")  # a piece is kept only once complete


def test_a_cache_that_cannot_be_written_is_refused_before_the_tokenizer_is_trained(tmp_path, corpus, monkeypatch,
                                                                                  capsys):
    """A cache path under a file (a read-only directory would do, but the tests run as root, who
    writes into one): the write probe fails before anything is trained."""
    from datamodules import prepare

    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / "cache"
    monkeypatch.setattr(prepare, "train_tokenizer", lambda *a: pytest.fail("trained before the cache was checked"))
    config = write_config(tmp_path / "config.yaml", corpus, **{"data.cache_dir": str(cache)})
    code, _, err = run_cli(capsys, "data", "prepare", "--config", config)
    assert (code, err.strip()) == (2, f"error: data.cache_dir: cannot write the data cache {cache} (Not a directory); "
                                      "expected a writable directory (or set $CPM_LIGHTNING_CACHE)")
