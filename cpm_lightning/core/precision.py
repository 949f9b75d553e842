"""How a model is held in memory to run it: its dtype and the quantization of its linear layers
(docs/inference.md). The names and their checks, without torch, so that a verb's `--help` and
argument errors come before torch is imported; the kernels are cpm_lightning/model/quantize.py."""

from __future__ import annotations

import json
from dataclasses import dataclass

from cpm_lightning.core.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernels take
QUANTIZATION_KEY = "cpm-lightning-quantization"  # in the metadata of a model.safetensors stored at a precision


@dataclass(frozen=True)
class Precision:
    """A dtype and, optionally, a weight-only quantization."""

    dtype: str | None = None
    """float32, bfloat16 or float16; unset: float32, or bfloat16 when quantized (the integer
    kernels run several times faster in bfloat16 than in float32)."""
    quantize: str | None = None
    """int8 or int4 weights for the attention and FFN projections; unset: the dtype's weights."""
    group_size: int = 128
    """int4: inputs of a row that share one scale and zero (32, 64, 128 or 256)."""

    def __post_init__(self):
        for flag, value, valid in (("--dtype", self.dtype, DTYPE_NAMES), ("--quantize", self.quantize, METHODS),
                                   ("--group-size", self.group_size, INT4_GROUP_SIZES)):
            if value is not None and value not in valid:
                raise UserError(f"{flag} {value!r}: expected one of {', '.join(map(str, valid))}")

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.quantize else "float32")

    @property
    def name(self) -> str:
        """What a release's variant at this precision is called: int8, int4, bfloat16, ..."""
        return self.quantize or self.resolved_dtype

    def __str__(self) -> str:
        if self.quantize == "int4":
            return f"int4 weights in groups of {self.group_size}, {self.resolved_dtype} activations"
        return f"int8 weights, {self.resolved_dtype} activations" if self.quantize else self.resolved_dtype

    def metadata(self) -> str:
        """The header metadata (QUANTIZATION_KEY) of weights stored at this precision."""
        return json.dumps({"dtype": self.resolved_dtype, "quantize": self.quantize, "group_size": self.group_size},
                          sort_keys=True)

    @classmethod
    def from_metadata(cls, text: str, where: str) -> Precision:
        try:
            fields = json.loads(text)
            return cls(**{key: fields[key] for key in ("dtype", "quantize", "group_size")})
        except (ValueError, TypeError, KeyError, UserError) as e:
            raise UserError(f"{where}: its {QUANTIZATION_KEY} metadata is not readable ({e}); expected what "
                            "`release --quantize` writes") from None


def add_arguments(parser) -> None:
    """--dtype, --quantize and --group-size, for every verb that runs a model."""
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="dtype of the weights and activations in memory (default: "
                        "as stored: float32 for a float32 model, bfloat16 for a quantized one)")
    parser.add_argument("--quantize", choices=METHODS, help="weight-only quantization of the attention and FFN "
                        "projections, done as the weights load: int8 (a scale per row) or int4 (a scale and zero per "
                        "group of --group-size inputs); default: as stored (docs/inference.md)")
    parser.add_argument("--group-size", type=int, default=Precision.group_size, metavar="N",
                        help=f"with --quantize int4: inputs that share a scale, one of "
                        f"{', '.join(map(str, INT4_GROUP_SIZES))} (default {Precision.group_size})")


def of(args) -> Precision:
    """The Precision of the arguments add_arguments added."""
    return Precision(dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
