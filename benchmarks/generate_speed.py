"""Decoding speed of cpm-lightning's sampler (what `cpm-lightning generate` runs, with its KV
cache) against `transformers`' `generate` on the same model exported with `convert to-hf`
(docs/ARCHITECTURE.md, "Hugging Face"; the target is a ratio >= 1.0).

    .venv/bin/python benchmarks/generate_speed.py [--rounds 5] [--new-tokens 128]

The `demo` preset with the accepted architecture proposals (rotary, SwiGLU, grouped-query heads,
split q/k scale), so the export is a LlamaForCausalLM; random CPM-Ant-initialized weights (the
speed does not depend on them); greedy, batch 1, on CPU, no EOS stop, a 16-token prompt. The two
alternate within one process, and each side keeps its best round (a shared machine only ever
slows a round down). Both must produce the same tokens. The ratio is printed last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cpm_lightning.checkpoint.modeldir import open_model_dir, write_model_dir
from cpm_lightning.core.tokenizer import train_tokenizer
from cpm_lightning.inference.generate import sample
from cpm_lightning.inference.hf.convert import write_hf
from cpm_lightning.model import ArchConfig, CPMAnt

ARCH = dict(preset="demo", position="rotary", ffn="swiglu", num_kv_heads=2, split_qk_scale=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = train_tokenizer([" ".join(f"word{i} and text {i * 7}" for i in range(5000))], 4096)
    model = CPMAnt(ArchConfig(**ARCH, vocab_size=tokenizer.vocab_size))
    model.init_weights()
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_model_dir(Path(tmp) / "ours", model.state_dict(), model.cfg.to_dict(), tokenizer)
        (Path(tmp) / "hf").mkdir()
        write_hf(open_model_dir(Path(tmp) / "ours"), Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
    prompt = torch.randint(4, tokenizer.vocab_size, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens

    def ours() -> list[int]:
        return sample(model, prompt, n, temperature=0)

    def theirs() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()

    assert ours() == theirs(), "the two decode different tokens"
    best = {"cpm-lightning": float("inf"), "transformers": float("inf")}
    for r in range(args.rounds):
        for name, run in (("cpm-lightning", ours), ("transformers", theirs)):
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            best[name] = min(best[name], seconds)
            print(f"round {r + 1} {name:<14} {n / seconds:8.1f} tokens/s")
    rate = {name: n / seconds for name, seconds in best.items()}
    print(f"best: cpm-lightning {rate['cpm-lightning']:.1f} tokens/s, transformers {rate['transformers']:.1f} tokens/s "
          f"({torch.get_num_threads()} threads, {n} new tokens, batch 1, greedy)")
    print(f"ratio (cpm-lightning / transformers): {rate['cpm-lightning'] / rate['transformers']:.2f}")


if __name__ == "__main__":
    main()
