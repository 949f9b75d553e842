"""Lower precision and weight-only quantization for inference (docs/inference.md).

A model runs in float32, bfloat16 or float16; with `int8` or `int4` its linear layers (the
attention and FFN projections) keep integer weights and a scale per group of them, and every
other weight (embeddings, norms, the position bias) stays in the model's dtype. The linears'
CPM-Ant scale (gain / sqrt(d_in)) is folded into the weights before they are quantized.

    int8  symmetric, one scale per output row: w = q * scale, q in [-127, 127]
    int4  asymmetric, one scale and zero per group of `group_size` inputs of a row:
          w = (q - 8) * scale + zero, q in [0, 15] (the layout of PyTorch's int4 kernels)

On the CPU the matmuls run in PyTorch's own weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`): measured here in bfloat16 at batch 1, 2.5x and 2.8x the rate of
a dense bfloat16 matmul, since decoding reads every weight once per token. torchao 0.18, the
library the issue named, ran int8 weight-only 12x slower than dense bfloat16 on this CPU and has
no CPU int4 path at all ("Requires mslk"), so it is not used (benchmarks/local_inference.py).
Elsewhere (CUDA) a layer dequantizes its weight for each call: correct, not fast.

A quantized model directory stores, for each linear `X`, `X.qweight` (int8 [N, K], or int4 as
uint8 [N, K/2], two values a byte, the even column in the low nibble), `X.scales` and, for
int4, `X.zeros`; the header's metadata names the precision (core/precision.py).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.precision import INT4_GROUP_SIZES, Precision
from cpm_lightning.model.config import ArchConfig
from cpm_lightning.model.layers import Linear
from cpm_lightning.model.transformer import CPMAnt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT4_ROWS = 16  # the int4 kernel packs output rows in sixteens
# The int8 kernel crashes the process (a segfault, PyTorch 2.13) on more than one token when the
# inputs are not a multiple of 16 (measured: 8, 24, 40 crash; 16, 32, 48, 64 run).
INT8_INPUTS = 16
PARTS = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "zeros")}
try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc
except (OSError, AttributeError):
    _MALLOC_TRIM = None


def _release_freed_memory() -> None:
    """Give the pages that freed tensors leave inside glibc's heap back to the system. Converting
    a weight frees a few float32 temporaries of its size between the small converted tensors that
    stay; glibc's adaptive mmap threshold soon serves such sizes from the heap, where freed pages
    stay resident, so without this a model loaded at int8 peaked at 5x its size (measured in
    tests/model/test_quantize.py: 297 MB instead of 60 MB for a 220 MB float32 file)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def torch_dtype(precision: Precision) -> torch.dtype:
    return DTYPES[precision.resolved_dtype]


def check(precision: Precision, arch: ArchConfig, where: str) -> None:
    """A UserError naming the first linear layer of `arch` that `precision` cannot quantize."""
    if precision.quantize is None:
        return
    for name, module in _linears(_meta_model(arch)).items():
        rows, cols = module.weight.shape
        if precision.quantize == "int8":
            if cols % INT8_INPUTS:
                raise UserError(f"--quantize int8: {where}'s {name} takes {cols} inputs, not a multiple of "
                                f"{INT8_INPUTS} (the int8 kernel's tile); use --dtype bfloat16")
            continue
        if cols % precision.group_size:
            fits = " or ".join(str(g) for g in INT4_GROUP_SIZES if cols % g == 0)
            raise UserError(f"--quantize int4: {where}'s {name} takes {cols} inputs, not a multiple of the group size "
                            f"{precision.group_size}; {f'choose --group-size {fits}' if fits else 'use --quantize int8'}")
        if rows % INT4_ROWS:
            raise UserError(f"--quantize int4: {where}'s {name} has {rows} outputs, not a multiple of {INT4_ROWS} (the "
                            "int4 kernel's tile); use --quantize int8")


def quantize_weight(weight: torch.Tensor, precision: Precision) -> dict[str, torch.Tensor]:
    """The stored parts (PARTS) of a float weight [N, K], its scale already folded in."""
    # One float32 temporary of the weight's size, rounded in place (a load's peak is the
    # converted model plus this and the weight).
    w = weight.float()
    if precision.quantize == "int8":
        low, high = w.aminmax(dim=1)
        scales = torch.maximum(-low, high).clamp(min=1e-12) / 127
        q = (w / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    N, K, g = *w.shape, precision.group_size
    groups = w.reshape(N, K // g, g)
    low, high = groups.aminmax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    q = (groups - low[..., None]).div_(scales[..., None]).round_().clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales.to(torch.bfloat16),
            "zeros": (low + 8 * scales).to(torch.bfloat16)}


def dequantize(parts: dict[str, torch.Tensor], precision: Precision) -> torch.Tensor:
    """The float32 weight [N, K] the parts stand for."""
    q, scales = parts["qweight"], parts["scales"].float()
    if precision.quantize == "int8":
        return q.float() * scales[:, None]
    values = torch.stack([q & 15, q >> 4], -1).reshape(q.shape[0], -1).float()  # [N, K]
    g = precision.group_size
    return ((values - 8).unflatten(1, (-1, g)) * scales[..., None] + parts["zeros"].float()[..., None]).flatten(1)


class QuantLinear(nn.Module):
    """A Linear whose weight is int8 or int4 (its scale folded in), for inference only."""

    def __init__(self, parts: dict[str, torch.Tensor], precision: Precision):
        super().__init__()
        self.precision, dtype = precision, torch_dtype(precision)
        self.out_features = parts["qweight"].shape[0]
        self.on_cpu = parts["qweight"].device.type == "cpu"
        if not self.on_cpu:  # no kernel: dequantized per call (docstring)
            for key, value in parts.items():
                self.register_buffer(key, value)
        elif precision.quantize == "int8":
            self.register_buffer("qweight", parts["qweight"])
            self.register_buffer("scales", parts["scales"].to(dtype))
        else:
            q = parts["qweight"]
            values = torch.stack([q & 15, q >> 4], -1).reshape(q.shape[0], -1).to(torch.int32)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1))
            # The kernel's layout: [K / group, N, (scale, zero)].
            pairs = torch.stack([parts["scales"], parts["zeros"]], -1).transpose(0, 1).contiguous()
            self.register_buffer("scales_and_zeros", pairs.to(dtype))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if not self.on_cpu:
            parts = {k: getattr(self, k) for k in PARTS[self.precision.quantize]}
            out = F.linear(flat, dequantize(parts, self.precision).to(x.dtype))
        elif self.precision.quantize == "int8":
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.precision.group_size,
                                                             self.scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features)


def _meta_model(arch: ArchConfig) -> CPMAnt:
    with torch.device("meta"):
        return CPMAnt(arch)


def _linears(model: nn.Module) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def stored_shapes(arch: ArchConfig, precision: Precision | None) -> dict[str, tuple[list[int], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a model directory of `arch` at `precision` holds,
    in the order they are written (float weights of a float32 directory when None)."""
    model = _meta_model(arch)
    dtype = torch_dtype(precision) if precision else torch.float32
    linears = {f"{name}.weight" for name in _linears(model)} if precision and precision.quantize else set()
    out = {}
    for name, t in model.state_dict().items():
        if name not in linears:
            out[name] = (list(t.shape), dtype)
            continue
        (N, K), prefix = t.shape, name.removesuffix(".weight")
        if precision.quantize == "int8":
            out |= {f"{prefix}.qweight": ([N, K], torch.int8), f"{prefix}.scales": ([N], torch.float32)}
        else:
            G = K // precision.group_size
            out |= {f"{prefix}.qweight": ([N, K // 2], torch.uint8), f"{prefix}.scales": ([N, G], torch.bfloat16),
                    f"{prefix}.zeros": ([N, G], torch.bfloat16)}
    return out


def stored_tensors(arch: ArchConfig, read: Callable[[str], torch.Tensor], precision: Precision) -> Iterator[torch.Tensor]:
    """The tensors of `stored_shapes(arch, precision)`, in order, made from the float weights
    that `read` returns one at a time (each linear's weight read once for all its parts)."""
    model = _meta_model(arch)
    linears = _linears(model) if precision.quantize else {}
    for name in model.state_dict():
        _release_freed_memory()  # of the tensor written before
        prefix = name.removesuffix(".weight")
        if prefix in linears:
            parts = quantize_weight(read(name).float() * linears[prefix].scale, precision)
            yield from (parts[key] for key in PARTS[precision.quantize])
        else:
            yield read(name).to(torch_dtype(precision))


def build(arch: ArchConfig, read: Callable[[str], torch.Tensor], precision: Precision,
          stored: Precision | None = None, device: str = "cpu") -> CPMAnt:
    """A CPMAnt in eval mode at `precision` on `device`, from the tensors `read` returns one at
    a time: float weights (any dtype), or, when `stored` names a quantization, the parts of a
    quantized directory at that same quantization. Each tensor is converted as it is read, so
    the peak memory is the converted model plus one tensor, never the float32 model."""
    model = _meta_model(arch)
    linears = _linears(model) if precision.quantize else {}
    dtype = torch_dtype(precision)
    for prefix, linear in linears.items():
        if stored is not None and stored.quantize:
            parts = {key: read(f"{prefix}.{key}") for key in PARTS[precision.quantize]}
        else:
            parts = quantize_weight(read(f"{prefix}.weight").float() * linear.scale, precision)
        owner, _, attr = prefix.rpartition(".")
        setattr(model.get_submodule(owner), attr, QuantLinear({k: v.to(device) for k, v in parts.items()}, precision))
        _release_freed_memory()
    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        tensor = read(name).to(device=device, dtype=dtype)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=param.requires_grad and not precision.quantize))
        _release_freed_memory()
    return model.eval()


def resident_bytes(arch: ArchConfig, precision: Precision) -> int:
    """Bytes the weights of `arch` take in memory at `precision` (the stored tensors; the CPU
    int4 kernel's packing keeps the same size)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in stored_shapes(arch, precision).values())
