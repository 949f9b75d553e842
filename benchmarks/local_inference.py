"""Running a model on this computer at float32, bfloat16, int8 and int4 (issue 23; docs/INFERENCE.md):
decoding speed and peak memory, printed as ratios to float32, and what the quantization costs in
held-out bits per byte.

    .venv/bin/python benchmarks/local_inference.py [--model DIR|CKPT] [--new-tokens 128] [--with-10b]

- `make demo`'s model (default runs/demo/checkpoints/last.ckpt, consolidated into a model
  directory; or --model, a checkpoint or model directory): tokens/s, peak RSS and the held-out
  bits per byte of each source of configs/demo.yaml (what `evaluate --tasks heldout` reports, on
  the run's validation windows; the aim: int8 within 1 % of float32, int4 within 5 %).
- `cpm-ant-1b` with random weights of CPM-Ant's init scale, written once in float32.
- `--with-10b`: `cpm-ant-10b`, random weights written once in bfloat16 (~19 GB, streamed tensor
  by tensor; reused when present), run at int8 and int4 only (float32 would take 35 GiB).

Each configuration runs in a process of its own: open the model directory, build the model at
the precision (the weights read and converted one at a time, model/quantize.py), then greedy
decoding of --new-tokens after a 16-token prompt at batch 1 (8 tokens first, untimed, to warm the
kernels up; no EOS stop). tokens/s counts the new tokens over the decoding's time, prompt
included. Peak RSS is the process's VmHWM (/proc), load included; "above imports", the peak less
the RSS before the model was opened (python and torch take ~0.25 GiB). "agree" is how many of the
greedy tokens match float32's before the first that differs (the demo model only). The demo model continues a line of
text in its domain (a docstring); the random models, 16 random ids.

One torch thread by default: on the shared 2-core machine these figures were first measured on
(load average 5), two OpenMP threads decoded the demo model 28x slower than one (2.4 against 67
tokens/s), spinning against the other processes; on an idle machine --threads 2 is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ("float32", "bfloat16", "int8", "int4")
PROMPT_LEN = 16
PROMPT_TEXT = "Return a new list with the items of the sequence, sorted by the given key."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "runs/demo/checkpoints/last.ckpt",
                        help="the demo model: a checkpoint or model directory (default: make demo's last.ckpt)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--with-10b", action="store_true", help="also cpm-ant-10b at int8 and int4 (writes ~19 GB)")
    parser.add_argument("--only-10b", action="store_true", help="only cpm-ant-10b (after a default run)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpm-lightning-local-inference"),
                        help="where the random-weight models are written once and reused")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each configuration (default 1: see the docstring)")
    parser.add_argument("--out", type=Path, help="also write the figures here, as JSON")
    parser.add_argument("--worker", nargs=3, metavar=("DIR", "PRECISION", "NEW_TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers' and evaluate's
    if args.worker:
        print(json.dumps(decode(Path(args.worker[0]), args.worker[1], int(args.worker[2]))))
        return
    if not args.model.exists() and not args.only_10b:
        sys.exit(f"error: {args.model} does not exist; run `make demo` first, or give --model DIR|CKPT")
    results = {"machine": machine()}
    print(results["machine"])
    if not args.only_10b:
        demo = demo_dir(args.model, args.work)
        results["demo"] = run_model(f"demo model ({args.model})", demo, NAMES, args.new_tokens, trained=True)
        results["cpm-ant-1b"] = run_model("cpm-ant-1b, random weights", random_dir("cpm-ant-1b", "float32", args.work),
                                          NAMES, args.new_tokens)
    if args.with_10b or args.only_10b:
        results["cpm-ant-10b"] = run_model("cpm-ant-10b, random weights stored in bfloat16",
                                           random_dir("cpm-ant-10b", "bfloat16", args.work), ("int8", "int4"),
                                           args.new_tokens)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def machine() -> str:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"CPU: {cpu}, {os.cpu_count()} cores, {os.environ['OMP_NUM_THREADS']} torch thread(s), {memory:.0f} GiB memory; "
            f"torch {torch.__version__}")


def run_model(title: str, model_dir: Path, names: tuple[str, ...], new_tokens: int, trained: bool = False) -> dict:
    """Each precision of `names` in its own process; the table, as ratios to the first. A
    `trained` model also gets its held-out bits per byte and the greedy agreement (a random
    model's logits are nearly flat, so which token wins says nothing about the precision)."""
    print(f"\n{title}: batch 1, {new_tokens} new tokens, greedy")
    rows = {}
    for name in names:
        rows[name] = worker(model_dir, name, new_tokens)
        if trained:
            rows[name]["heldout"] = heldout_bpb(model_dir, name)
    base = rows[names[0]]
    sources = sorted(base.get("heldout", {}))
    print(f"{'precision':<10} {'tokens/s':>9} {'ratio':>6} {'peak RSS':>10} {'ratio':>6} {'above imports':>13} "
          f"{'ratio':>6} {'load s':>7}" + (f" {'agree':>7}" if trained else "")
          + "".join(f" {s + ' bpb':>18} {'ratio':>6}" for s in sources))
    for name, row in rows.items():
        agree = next((i for i, (a, b) in enumerate(zip(row["tokens"], base["tokens"], strict=True)) if a != b),
                     len(row["tokens"]))
        row["agree"] = agree
        line = (f"{name:<10} {row['tokens_per_s']:>9.2f} {row['tokens_per_s'] / base['tokens_per_s']:>6.2f} "
                f"{row['peak_rss'] / (1 << 30):>6.2f} GiB {row['peak_rss'] / base['peak_rss']:>6.2f} "
                f"{(row['peak_rss'] - row['before']) / (1 << 30):>9.2f} GiB "
                f"{(row['peak_rss'] - row['before']) / (base['peak_rss'] - base['before']):>6.2f} "
                f"{row['load_s']:>7.1f}" + (f" {agree:>3}/{len(row['tokens']):<3}" if trained else ""))
        for s in sources:
            line += f" {row['heldout'][s]:>18.4f} {row['heldout'][s] / base['heldout'][s]:>6.3f}"
        print(line, flush=True)
    if names[0] != "float32":
        print(f"(ratios to {names[0]}: float32 is not run)")
    return rows


def worker(model_dir: Path, name: str, new_tokens: int) -> dict:
    run = subprocess.run([sys.executable, __file__, "--worker", str(model_dir), name, str(new_tokens)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if run.returncode:
        sys.exit(f"error: {name} on {model_dir} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def decode(model_dir: Path, name: str, new_tokens: int) -> dict:
    """In the worker process: load at `name`, decode, measure."""
    import torch

    from cpm_lightning.checkpoint.modeldir import open_model_dir
    from cpm_lightning.cli.tools import INFERENCE_PRECISIONS
    from cpm_lightning.core.tokenizer import SentencePieceTokenizer
    from cpm_lightning.inference.generate import sample

    before = proc_status("VmRSS")  # python, torch and cpm_lightning imported
    start = time.perf_counter()
    stored = open_model_dir(model_dir)
    model = stored.build(precision=INFERENCE_PRECISIONS[name])
    loaded = time.perf_counter() - start
    resident = proc_status("VmRSS")
    # Ids above the specials, the same in every process.
    tokenizer = stored.require_tokenizer()
    if isinstance(tokenizer, SentencePieceTokenizer):
        prompt = tokenizer.encode(PROMPT_TEXT)
    else:  # ids above the specials, the same in every process
        prompt = torch.randint(8, tokenizer.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    sample(model, prompt, 8, temperature=0)
    start = time.perf_counter()
    tokens = sample(model, prompt, new_tokens, temperature=0)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": len(tokens) / elapsed, "load_s": loaded, "before": before, "resident": resident,
            "peak_rss": proc_status("VmHWM"), "tokens": tokens}


def proc_status(key: str) -> int:
    """Bytes of a /proc/self/status entry. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across fork and exec, so a worker would start at its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def heldout_bpb(model_dir: Path, name: str) -> dict[str, float]:
    """Bits per byte of each source of configs/demo.yaml, from `cpm-lightning evaluate` at `name`."""
    flags = {"float32": ["--dtype", "float32"], "bfloat16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"],
             "int4": ["--quantize", "int4"]}[name]
    run = subprocess.run([sys.executable, "-c", "import sys; from cpm_lightning.cli.main import main; main(sys.argv[1:])",
                          "evaluate", str(model_dir), "--tasks", "heldout", "--config", "configs/demo.yaml", "--json",
                          *flags], capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if run.returncode:
        sys.exit(f"error: evaluate at {name} failed:\n{run.stderr[-3000:]}")
    scores = json.loads(run.stdout.splitlines()[-1])["heldout"]
    return {key.removesuffix("/bpb"): value for key, value in scores.items() if key.endswith("/bpb")}


def demo_dir(model: Path, work: Path) -> Path:
    """`model` if it is a model directory; a checkpoint is consolidated into one under `work`."""
    from cpm_lightning.checkpoint.modeldir import is_model_dir, staged_dir

    if model.is_dir() and is_model_dir(model):
        return model
    from cpm_lightning.checkpoint.store import consolidate

    out = work / "demo"
    with staged_dir(out, force=True) as tmp:
        consolidate(model, tmp)
    return out


def random_dir(preset: str, dtype: str, work: Path) -> Path:
    """A model directory of `preset` with random weights at CPM-Ant's init scale (linears N(0, 1),
    which they rescale by 1/sqrt(d_in); embeddings and the position bias N(0, 0.02^2); norms 1),
    stored in `dtype`, each tensor made and written in turn; kept in `work` and reused. Its
    tokenizer is a vocab.txt of the preset's size (the benchmark feeds ids, never text)."""
    import torch

    from cpm_lightning.checkpoint.modeldir import StoredModel, staged_dir, write_model_dir
    from cpm_lightning.core.tokenizer import CPM_ANT_NEWLINE, CPM_ANT_SPACE, CPM_ANT_SPECIALS, Tokenizer
    from cpm_lightning.model import ArchConfig, CPMAnt
    from cpm_lightning.model.layers import Linear

    out = work / f"{preset}-{dtype}"
    if (out / "model.safetensors").is_file():
        print(f"reusing {out}", flush=True)
        return out
    arch = ArchConfig(preset=preset).resolved()
    vocab = [*CPM_ANT_SPECIALS, CPM_ANT_SPACE, CPM_ANT_NEWLINE]
    vocab += [f"w{i}" for i in range(arch.preset_vocab_size - len(vocab))]
    tokenizer = Tokenizer.from_bytes(("\n".join(vocab) + "\n").encode())
    arch = ArchConfig(**{**arch.to_dict(), "vocab_size": tokenizer.vocab_size}).resolved()
    with torch.device("meta"):
        model = CPMAnt(arch)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear)}
    total, done, generator = sum(torch.Size(s).numel() for s in shapes.values()), [0, 0.0], torch.Generator()
    generator.manual_seed(0)
    torch_dtype = getattr(torch, dtype)

    def read(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            t = torch.ones(shapes[name])
        else:
            t = torch.randn(shapes[name], generator=generator) * (1.0 if name in linears else 0.02)
        done[0] += t.numel()
        if done[0] / total >= done[1] + 0.1 or done[0] == total:
            done[1] = done[0] / total
            print(f"  writing {out.name}: {done[0] * torch_dtype.itemsize / 1e9:.1f} of "
                  f"{total * torch_dtype.itemsize / 1e9:.1f} GB", flush=True)
        return t.to(torch_dtype)

    stored = StoredModel(arch=arch.to_dict(), shapes=shapes, dtypes=dict.fromkeys(shapes, torch_dtype), read=read,
                         tokenizer=tokenizer, where=preset)
    start = time.perf_counter()
    with staged_dir(out, force=True) as tmp:
        write_model_dir(tmp, stored, arch.to_dict(), tokenizer)
    print(f"  wrote {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
