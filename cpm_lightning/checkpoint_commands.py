"""`cpm-lightning checkpoint ...`: verbs on checkpoints written by `fit`."""

from __future__ import annotations


def add_commands(sub) -> None:
    ckpt = sub.add_parser("checkpoint", help="work with checkpoints written by fit").add_subparsers(metavar="ACTION")
    cons = ckpt.add_parser("consolidate", help="write a checkpoint's weights as one safetensors file "
                           "(any world size saved it), with config.json and tokenizer.model")
    cons.add_argument("checkpoint", help="a checkpoint directory or file (e.g. runs/x/checkpoints/last.ckpt)")
    cons.add_argument("out_dir", help="model directory to write; `cpm-lightning generate OUT_DIR` reads it")
    cons.set_defaults(func=consolidate)


def consolidate(args) -> None:
    from cpm_lightning.checkpoint import consolidate  # imports torch and Lightning: only when run

    for path in consolidate(args.checkpoint, args.out_dir):
        print(f"wrote {path}")
