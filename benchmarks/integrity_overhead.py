"""What checking the recorded hashes costs (issue 10), as a share of training time, in one run.

    .venv/bin/python benchmarks/integrity_overhead.py [--steps 5] [--shard-mib 256]

Measured here, on the `demo` preset with configs/demo.yaml's batch (8 x 256) and checkpoint
interval (125 steps):
  step   time of one training step of the demo model (forward, backward, AdamW): the unit
  save   writing the demo model and its AdamW moments as `fit` does (torch.save), and sealing the
         file (hashing it, its record in its zip comment) as Checkpoints.save then does: the hash's share of the write and, once per
         checkpoint interval, of training
  load   every weight read through open_checkpoint (what generate and consolidate do) of the same state as a sharded DCP
         checkpoint, hashes checked, against the same load with no hashes.json; alternating
  data   random windows of a token shard (--shard-mib of tokens), the first read of each chunk of
         tokens.bin checked, against plain memmap reads: the cost of a chunk's first read, per
         step at worst (every window of a step in a chunk not yet checked, as at the start of a
         run on a large shard) and for one pass over the whole shard
Then configs/cpm-ant-10b.yaml on its 32 GPUs, from the sha256 rates measured here and an assumed
step time (--scale-* options: FLOPs of a step over the GPUs' peak at an MFU): a checkpoint's
hashing per checkpoint interval, the first reads of chunks per step at worst, and how large the
token shards may be before checking each chunk once per run (a run reads windows all over them)
costs 1% of a day-long job.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpm_lightning.checkpoint.files import seal_zip  # noqa: E402
from cpm_lightning.checkpoint.store import open_checkpoint  # noqa: E402
from cpm_lightning.core.file_hashes import (  # noqa: E402
    CHUNK_BYTES,
    HASH_THREADS,
    HASHES_FILE,
    hash_file,
    trusting_unverified,
    write_hashes,
)
from cpm_lightning.model import ArchConfig  # noqa: E402
from cpm_lightning.model.stats import model_stats  # noqa: E402
from cpm_lightning.train.module import CausalLM  # noqa: E402
from datamodules.shards import FILES, Shard  # noqa: E402


def load_weights_of(path: Path) -> dict:
    """Every weight of checkpoint `path`, as generate and consolidate read them."""
    _, model = open_checkpoint(path)
    return {name: model.read(name) for name in model.shapes}

def best(fn, repeats: int = 3) -> float:
    """The shortest of `repeats` timings of fn(): load from other jobs only ever adds time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def train_state(arch: ArchConfig, batch: int, seq_len: int, steps: int) -> tuple[float, dict]:
    """(shortest step time, the model's and AdamW's state dicts after `steps` + 1 steps)."""
    module = CausalLM(arch)
    module.configure_model()
    model = module.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        ids = torch.randint(arch.vocab_size, (batch, seq_len + 1))
        start = time.perf_counter()
        module._loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:]), {"model": model.state_dict(), "optim": opt.state_dict()}


def sharded_checkpoint(state: dict, arch: ArchConfig, path: Path) -> None:
    """The layout `fit` writes with FSDP2 (in one process): DCP files, meta.pt, hashes.json."""
    moments = {f"{k}.{m}": v for k, s in state["optim"]["state"].items() for m, v in s.items() if m != "step"}
    with warnings.catch_warnings():  # "...assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"state_dict": {f"model.{k}": v for k, v in state["model"].items()}, "optimizer_0": moments},
                 checkpoint_id=path, no_dist=True)
    torch.save({"cpm": {"arch": arch.to_dict()}}, path / "meta.pt")
    write_hashes(path / HASHES_FILE, {p.name: hash_file(p) for p in path.iterdir()})


def token_shard(path: Path, mib: int) -> None:
    """A shard of `mib` MiB of random uint16 tokens, as build_shard writes one."""
    path.mkdir()
    tokens = np.random.default_rng(0).integers(0, 4096, mib << 19, dtype=np.uint16)
    tokens.tofile(path / "tokens.bin")
    np.save(path / "index.npy", np.arange(1000, len(tokens) + 1, 1000, dtype=np.int64))
    (path / "meta.json").write_text(json.dumps({"dtype": "uint16", "tokens": len(tokens)}))
    write_hashes(path / HASHES_FILE, {f: hash_file(path / f) for f in FILES})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed demo training steps (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating load rounds (default 5)")
    parser.add_argument("--shard-mib", type=int, default=256, help="size of the token shard (default 256)")
    parser.add_argument("--windows", type=int, default=4000, help="random windows read from it (default 4000)")
    parser.add_argument("--scale-peak-tflops", type=float, default=989.0, help="per GPU (H100 dense bf16: 989)")
    parser.add_argument("--scale-mfu", type=float, default=0.4, help="assumed MFU at scale (default 0.4)")
    parser.add_argument("--scale-hash-threads", type=int, default=8,
                        help="HASH_THREADS of a rank at scale (8 with the README's 12 CPUs per task)")
    args = parser.parse_args()
    torch.manual_seed(0)
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    batch, seq_len = demo["data"]["batch_size"], demo["data"]["seq_len"]
    every = demo["checkpoint"]["every_n_steps"]
    arch = ArchConfig(preset="demo", vocab_size=4096)
    tmp = Path(tempfile.mkdtemp(prefix="integrity-overhead-"))
    try:
        step_s, state = train_state(arch, batch, seq_len, args.steps)
        print(f"demo preset, batch {batch} x {seq_len}, {torch.get_num_threads()} threads; sha256 in "
              f"{CHUNK_BYTES >> 20} MiB chunks, {HASH_THREADS} threads; times are the shortest of several (load "
              "from other jobs only adds time) unless said")
        print(f"step  {step_s * 1000:.0f} ms (best of {args.steps})")

        # save: the write as `fit` does it, then the sealing Checkpoints.save adds (hash, record in the file)
        file = tmp / "step.ckpt"

        def write() -> None:
            torch.save({"state_dict": state["model"], "optimizer_states": [state["optim"]]}, file)

        write_s = best(write)
        seal_times = []
        for _ in range(3):  # a fresh file each time: a file is sealed once
            write()
            seal_times.append(best(lambda: seal_zip(file), 1))
        hash_s = min(seal_times)
        size = file.stat().st_size
        print(f"save  {size / 1e6:.0f} MB: write {write_s * 1000:.0f} ms, hash {hash_s * 1000:.0f} ms "
              f"({size / hash_s / 1e6:.0f} MB/s) = {100 * hash_s / write_s:.0f}% of the write; once per {every} steps: "
              f"{100 * hash_s / (every * step_s):.3f}% of training")

        # load: verified against unverified, alternating
        verified, plain = tmp / "sharded", tmp / "unverified"
        sharded_checkpoint(state, arch, verified)
        shutil.copytree(verified, plain)
        (plain / HASHES_FILE).unlink()
        on, off = [], []
        with trusting_unverified():
            load_weights_of(plain)  # its warning (no hashes.json) once, before the timing
            for _ in range(args.rounds):
                on.append(best(lambda: load_weights_of(verified), 1))
                off.append(best(lambda: load_weights_of(plain), 1))
        on_s, off_s = statistics.median(on), statistics.median(off)
        print(f"load  all weights of the sharded checkpoint (median of {args.rounds}): {on_s * 1000:.0f} ms checked, "
              f"{off_s * 1000:.0f} ms not: ratio {on_s / off_s:.2f}, once per load")

        # data: the first read of each chunk of tokens.bin, from a freshly opened shard each time
        token_shard(tmp / "shard", args.shard_mib)
        windows = np.random.default_rng(1).permutation((args.shard_mib << 19) // seq_len)[:args.windows]
        spans = [(i * seq_len, (i + 1) * seq_len + 1) for i in windows]
        tokens = Shard.open(tmp / "shard").tokens

        def first_reads() -> float:
            shard = Shard.open(tmp / "shard")  # no chunk checked yet
            return best(lambda: [np.array(shard.read(a, b)) for a, b in spans], 1)

        checked_s = min(first_reads() for _ in range(3))
        unchecked_s = best(lambda: [np.array(tokens[a:b]) for a, b in spans])
        chunks = len({c for a, b in spans for c in range(2 * a // CHUNK_BYTES, 2 * b // CHUNK_BYTES + 1)})
        per_chunk = (checked_s - unchecked_s) / chunks
        pass_s = per_chunk * (args.shard_mib << 20) / CHUNK_BYTES
        train_pass_s = (args.shard_mib << 19) / (batch * seq_len) * step_s
        print(f"data  {args.windows} random windows touch {chunks} chunks of a {args.shard_mib} MiB tokens.bin: "
              f"{per_chunk * 1000:.2f} ms per chunk's first read ({CHUNK_BYTES / per_chunk / 1e6:.0f} MB/s); at worst "
              f"{batch} per step: {100 * batch * per_chunk / step_s:.2f}% of a step; checking the whole shard: "
              f"{100 * pass_s / train_pass_s:.5f}% of training on it once")

        # at scale: configs/cpm-ant-10b.yaml, at the rate of this CPU without the other jobs on it:
        # the best of many short timings (each fits in a scheduler slice)
        one_chunk = tmp / "chunk"
        one_chunk.write_bytes(np.random.default_rng(2).bytes(CHUNK_BYTES))
        chunk_s = best(lambda: hash_file(one_chunk), 50)
        big = yaml.safe_load((REPO / "configs" / "cpm-ant-10b.yaml").read_text())
        gpus = big["trainer"]["devices"] * big["trainer"]["num_nodes"]
        big_batch, big_seq = big["data"]["batch_size"], big["data"]["seq_len"]
        stats = model_stats(ArchConfig(preset="cpm-ant-10b"), big_seq)
        big_step_s = stats.flops_per_token * big_batch * big_seq / (gpus * args.scale_peak_tflops * 1e12 * args.scale_mfu)
        per_rank = stats.params * 12 / gpus  # fp32 weights and two AdamW moments, each rank its shard
        ckpt_hash_s = per_rank / (args.scale_hash_threads * CHUNK_BYTES / chunk_s)
        ckpt_every, windows_per_step = big["checkpoint"]["every_n_steps"], big_batch // gpus
        print(f"scale cpm-ant-10b on {gpus} GPUs, a step {big_step_s:.2f} s (assumed: {args.scale_mfu:.0%} MFU of "
              f"{args.scale_peak_tflops:.0f} TFLOP/s); a chunk's first read {chunk_s * 1000:.2f} ms "
              f"({CHUNK_BYTES / chunk_s / 1e6:.0f} MB/s on one thread, best of 50)")
        print(f"      save: each rank hashes {per_rank / 1e9:.1f} GB on {args.scale_hash_threads} threads in "
              f"{ckpt_hash_s:.2f} s = {100 * ckpt_hash_s / (ckpt_every * big_step_s):.2f}% of {ckpt_every} steps")
        print(f"      data: at worst {windows_per_step} first reads per step = "
              f"{100 * windows_per_step * chunk_s / big_step_s:.2f}% of a step; each rank checks each chunk once "
              f"per run: under 1% of a 24 h job up to {0.01 * 86400 / chunk_s * CHUNK_BYTES / 1e9:.0f} GB of "
              "token shards")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
