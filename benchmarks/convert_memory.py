"""Peak memory of `cpm-lightning convert to-hf` and `convert from-hf` on the `cpm-ant-1b` preset
(docs/ARCHITECTURE.md, "Hugging Face": conversions stream one tensor at a time and never hold
two copies of a model; for a 10B model that is the difference between 40 GB and 80 GB).

    .venv/bin/python benchmarks/convert_memory.py [--dir /tmp/convert-memory]

Writes a model directory with random N(0, 1) weights of the preset (itself one tensor at a time),
then runs each conversion in its own process and reads that process's peak resident set
(getrusage of the child). Needs about 15 GB of disk. The ratio of peak RSS to the size of the
weights is printed last (1.0 would be one full copy in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpm_lightning.checkpoint.modeldir import CONFIG, TensorSpec, model_shapes, write_safetensors
from cpm_lightning.core.tokenizer import train_tokenizer
from cpm_lightning.model import ArchConfig

# `cpm-lightning ARGV` in a fresh process that then prints its own peak RSS (kB, Linux).
CHILD = ("import resource, sys\nfrom cpm_lightning.cli.main import main\nmain(sys.argv[1:])\n"
         "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def peak_rss(*argv: str) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of `cpm-lightning ARGV`, imports included."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - start
    return int(out.split("peak ")[-1]) * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="convert-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        arch = ArchConfig(preset="cpm-ant-1b", vocab_size=30720).resolved()
        source = root / "ours"
        source.mkdir(exist_ok=True)
        specs = [TensorSpec(name, tuple(shape)) for name, shape in model_shapes(arch).items()]
        write_safetensors(source / "model.safetensors", specs, (torch.randn(s.shape) for s in specs))
        (source / CONFIG).write_text(json.dumps(arch.to_dict()))
        tokenizer = train_tokenizer([" ".join(f"word{i} text" for i in range(3000))], 1000)
        (source / tokenizer.file_name).write_bytes(tokenizer.model_bytes)
        weights = sum(s.nbytes for s in specs)

        print(f"cpm-ant-1b weights: {weights / 2**30:.2f} GiB ({sum(torch.Size(s.shape).numel() for s in specs) / 1e9:.2f} B "
              f"parameters, float32)")
        to_peak, to_s = peak_rss("convert", "to-hf", str(source), str(root / "hf"), "--force")
        print(f"to-hf:   peak RSS {to_peak / 2**30:.2f} GiB in {to_s:.0f} s "
              f"({len(list((root / 'hf').glob('*.safetensors')))} safetensors shards)")
        from_peak, from_s = peak_rss("convert", "from-hf", str(root / "hf"), str(root / "back"), "--force")
        print(f"from-hf: peak RSS {from_peak / 2**30:.2f} GiB in {from_s:.0f} s")
        print(f"ratio (peak RSS / weights): to-hf {to_peak / weights:.2f}, from-hf {from_peak / weights:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
