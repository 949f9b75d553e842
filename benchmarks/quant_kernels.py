"""One CPM-Ant projection (4096 -> 10240, the cpm-ant-10b FFN's) at batch 1 (decoding) and at 128
tokens (a prompt): dense float32 and bfloat16 matmuls against the weight-only kernels that
model/quantize.py calls (int8, int4 in groups of 128, bfloat16 activations), and torchao's
weight-only int8 and int4 when torchao is installed (why the project calls the kernels itself:
docs/inference.md, "Precision and quantization"). Prints milliseconds and the ratio to bfloat16.

    .venv/bin/python benchmarks/quant_kernels.py [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings

import torch
from torch import nn

from cpm_lightning.core.precision import Precision
from cpm_lightning.model.quantize import QuantLinear, quantize_weight

D_IN, D_OUT = 4096, 10240


def ms(f, rounds: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            f()
        start = time.perf_counter()
        for _ in range(rounds):
            f()
    return (time.perf_counter() - start) / rounds * 1e3


def torchao_layers(dense: nn.Linear) -> dict:
    """torchao's weight-only int8 and int4 of `dense`, or why there is none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {"torchao int8": "torchao not installed", "torchao int4": "torchao not installed"}
    out = {}
    for name, config in (("torchao int8", Int8WeightOnlyConfig()), ("torchao int4", Int4WeightOnlyConfig(group_size=128))):
        layer = copy.deepcopy(dense)
        try:
            quantize_(layer, config)
            out[name] = layer
        except Exception as e:  # noqa: BLE001 - what torchao says is the figure
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(D_OUT, D_IN) * D_IN**-0.5
    dense = nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        dense.weight.copy_(weight)
    layers = {"float32": dense, "bfloat16": copy.deepcopy(dense).to(torch.bfloat16)}
    for method in ("int8", "int4"):
        precision = Precision(quantize=method)
        layers[f"{method} kernel"] = QuantLinear(quantize_weight(weight, precision), precision)
    layers |= torchao_layers(layers["bfloat16"])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"one {D_IN} -> {D_OUT} projection, ms (ratio to bfloat16)")
    for tokens, rounds in ((1, 50), (128, 5)):
        x = torch.randn(tokens, D_IN)
        times = {}
        for name, layer in layers.items():
            if isinstance(layer, str):
                print(f"  {tokens:>3} token(s)  {name:<14} {layer}")
                continue
            inputs = x if name == "float32" else x.to(torch.bfloat16)
            times[name] = ms(lambda layer=layer, inputs=inputs: layer(inputs), rounds)
        for name, t in times.items():
            print(f"  {tokens:>3} token(s)  {name:<14} {t:8.2f} ms  ({t / times['bfloat16']:.2f}x)")


if __name__ == "__main__":
    main()
