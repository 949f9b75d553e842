"""`cpm-lightning data prepare` at scale (issue 16), in one run:

- a synthetic text source of --gb gigabytes (default 1.0): many files of ~40 MB, and one very
  large file of a quarter of the total, built from slices of the running Python's standard library;
- a cold `data prepare` in a subprocess: tokens/s and MB/s, overall and per core, and its peak
  RSS (os.wait4) against the bound: the peak of the same command on a 1 MB source (the fixed
  cost of the process) + PREPARE_BUDGET, whatever the source's size;
- a warm start (listing the files and finding the pieces in the cache: what every `fit` start
  does) against reading the source's bytes once;
- the throughput against what the `demo` preset consumes in training (tokens/s of a plain loop,
  benchmarks/train_throughput.py), as a ratio.

    .venv/bin/python benchmarks/data_prepare.py [--gb 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpm_lightning.core.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from datamodules.config import DataConfig  # noqa: E402
from datamodules.prepare import PreparedData  # noqa: E402

PREPARE_BUDGET = 512 << 20
"""The memory a build may take above the process's fixed cost (bytes): reads of 4 MiB, one
tokenizer call of 8 Mi characters and its token lists (~36 bytes a token)."""
MB = 1e6


def base_text() -> str:
    """Real text: the standard library's Python files (a few tens of MB)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py")))


def write_source(root: Path, total: int, text: str) -> dict[str, str]:
    """Files of ~40 MB under root/many and one of total/4 under root/big, of random slices of text."""
    rng = random.Random(0)
    big, many = total // 4, total - total // 4

    def write(path: Path, size: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            written = 0
            while written < size:
                start = rng.randrange(len(text) - (1 << 20))
                piece = text[start:start + (1 << 20)]
                f.write(piece)
                written += len(piece.encode())

    count = max(1, many // (40 << 20))
    for i in range(count):
        write(root / "many" / f"part-{i:03d}.txt", many // count)
    write(root / "big" / "big.txt", big)
    return {"many": str(root / "many" / "*.txt"), "big": str(root / "big" / "big.txt")}


def config(path: Path, sources: dict[str, str], tokenizer: Path, cache: Path) -> Path:
    path.write_text(yaml.safe_dump({"data": {"sources": {n: {"url": u} for n, u in sources.items()},
                                             "tokenizer": str(tokenizer), "cache_dir": str(cache)},
                                    "registry": {"path": None}}))
    return path


def prepare(cfg: Path) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of `cpm-lightning data prepare --config cfg`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cpm_lightning.cli", "data", "prepare", "--config", str(cfg)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"data prepare failed ({status}): {out}")
    return seconds, usage.ru_maxrss * 1024, out


def demo_tokens_per_second(steps: int) -> float:
    from train_throughput import plain_loop

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    return plain_loop(cfg, warmup=2, steps=steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the synthetic source (GB)")
    parser.add_argument("--demo-steps", type=int, default=5, help="timed steps of the demo's training")
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="data-prepare-"))
    try:
        text = base_text()
        sources = write_source(work / "source", int(args.gb * 1e9), text)
        tokenizer = work / "tokenizer.model"
        save_tokenizer(train_tokenizer([text], 4096, sample_chars=2_000_000), str(tokenizer))
        files = sorted((work / "source").rglob("*.txt"))
        size, largest = sum(p.stat().st_size for p in files), max(p.stat().st_size for p in files)
        print(f"source: {len(files)} files, {size / MB:,.0f} MB, the largest {largest / MB:,.0f} MB; "
              f"{os.cpu_count()} cores")

        small = work / "small.txt"
        small.write_text(text[: 1 << 20])
        _, base_rss, _ = prepare(config(work / "small.yaml", {"small": str(small)}, tokenizer, work / "small-cache"))
        cfg = config(work / "run.yaml", sources, tokenizer, work / "cache")
        seconds, peak, out = prepare(cfg)
        data = DataConfig(**yaml.safe_load(cfg.read_text())["data"])
        prepared = PreparedData(data)
        tokens = sum(json.loads(prepared.manifest(n).read_text())["tokens"] for n in sources)
        cores = os.cpu_count()
        print(out, end="")
        print(f"cold prepare: {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s ({tokens / seconds / cores:,.0f} per "
              f"core), {size / MB / seconds:.1f} MB/s ({size / MB / seconds / cores:.1f} per core)")
        bound = base_rss + PREPARE_BUDGET
        print(f"peak RSS {peak / MB:,.0f} MB; bound {bound / MB:,.0f} MB (1 MB source: {base_rss / MB:,.0f} MB, "
              f"+ budget {PREPARE_BUDGET / MB:,.0f} MB): ratio {peak / bound:.2f}; "
              f"{peak / size:.3f} x the source, {peak / largest:.2f} x its largest file")

        start = time.perf_counter()
        warm = PreparedData(data)
        for name in sources:
            warm.manifest(name)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        for p in files:
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass
        read_s = time.perf_counter() - start
        print(f"warm start (list, key, find the pieces): {warm_s * 1000:.1f} ms; reading the bytes once: "
              f"{read_s * 1000:,.0f} ms (from the page cache); ratio {warm_s / read_s:.4f}")

        demo = demo_tokens_per_second(args.demo_steps)
        print(f"demo training consumes {demo:,.0f} tokens/s; preparing makes {tokens / seconds:,.0f}: "
              f"ratio {tokens / seconds / demo:,.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
