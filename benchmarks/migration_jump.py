"""The loss jump of each migration on a trained model (docs/ARCHITECTURE.md, "Migrations").

Loads a checkpoint (default: `make demo`'s last), migrates its weights by each plan below and
prints the validation loss before and after on the same real text (docstrings of the standard
library's packages s-z, which the demo did not train on), and the ratio after/before. The exact
migrations should show a ratio of 1.0000; pooling key/value heads is not exact, and this is the
figure of its jump.

    python benchmarks/migration_jump.py [--ckpt runs/demo/checkpoints/last.ckpt]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from cpm_lightning.cli.loader import open_model
from cpm_lightning.model import ArchConfig, CPMAnt
from cpm_lightning.model.migrate import TrainState, migrate, plan


def text(limit_chars: int = 40_000) -> str:
    """Docstrings of the standard library's packages s-z, read as the demo's sources are."""
    from datamodules.shards import iter_documents
    from datamodules.sources import ReadStats, SourceConfig

    source = SourceConfig(url="stdlib://[s-z]*/*.py", format="python_docstrings")
    out = ""
    for doc in iter_documents("packages_s_z", source, ReadStats(), progress=False):
        out += doc + "\n\n"
        if len(out) >= limit_chars:
            return out[:limit_chars]
    return out


def loss(model: CPMAnt, ids: torch.Tensor, seq_len: int) -> float:
    x = ids[: (len(ids) - 1) // seq_len * seq_len + 1]
    inputs, targets = x[:-1].view(-1, seq_len), x[1:].view(-1, seq_len)
    with torch.no_grad():
        logits = torch.cat([model(inputs[i:i + 8]) for i in range(0, len(inputs), 8)])
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/demo/checkpoints/last.ckpt")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    with open_model(args.ckpt) as stored:
        arch = ArchConfig(**stored.arch).resolved()
        weights, tokenizer = stored.weights(), stored.require_tokenizer()
    ids = torch.tensor(tokenizer.encode(text()))
    base = CPMAnt(arch)
    base.load_state_dict(weights)
    before = loss(base.eval(), ids, args.seq_len)
    kv = arch.num_kv_heads
    plans = {
        "grow_ff_dim x1.4": {"ff_dim": arch.ff_dim * 7 // 5},
        "add_ffn_layers +1": {"num_ffn_layers": arch.num_ffn_layers + 1},
        "add_attention_layers +1": {"num_attn_layers": arch.num_attn_layers + 1},
        f"pool_kv_heads {kv} -> {kv // 2}": {"num_kv_heads": kv // 2},
        f"pool_kv_heads {kv} -> 1": {"num_kv_heads": 1},
    }
    print(f"{args.ckpt}: {arch.preset}, {arch.position}, {arch.ffn}; {len(ids):,} tokens of held-out text")
    print(f"{'migration':<28} {'loss before':>12} {'loss after':>12} {'after/before':>13}")
    for name, change in plans.items():
        new = dataclasses.replace(arch, **change).resolved()
        state = TrainState(arch=arch.to_dict(), weights=dict(weights), moments={}, step=0)
        migrate(state, plan(arch.to_dict(), new.to_dict()))
        model = CPMAnt(new)
        model.load_state_dict(state.weights)
        after = loss(model.eval(), ids, args.seq_len)
        print(f"{name:<28} {before:12.4f} {after:12.4f} {after / before:13.4f}")


if __name__ == "__main__":
    main()
