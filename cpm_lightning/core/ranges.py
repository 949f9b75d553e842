"""Valid ranges of the numeric config fields, declared beside each field with `ranged` and
checked by `check_ranges` in the config's `__post_init__` (docs/ARCHITECTURE.md,
"Configuration"). The registry refuses a proposal's value outside its field's range with the
same message, before any run starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cpm_lightning.core.errors import UserError

_KEY = "range"


@dataclass(frozen=True)
class Range:
    """low <= value <= high, either end open or absent. Floats must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def problem(self, value: Any) -> str | None:
        """'must be ..., got X' for a number outside the range, else None. Values that are not
        numbers (None for 'unset', or a wrong type, which the type checks report) pass."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or self.admits(value):
            return None
        finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
        return f"must be {finite}{self}, got {value!r}"


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with `default` whose values (each item, for a tuple) must lie in the
    range: >= ge or > gt, <= le or < lt."""
    rng = Range(gt if gt is not None else ge, lt if lt is not None else le, gt is not None, lt is not None)
    return dataclasses.field(default=default, metadata={_KEY: rng})


def range_of(field: dataclasses.Field) -> Range | None:
    """The declared range of a dataclass field, if any."""
    return field.metadata.get(_KEY)


def out_of_range(key: str, value: Any, rng: Range) -> str | None:
    """'KEY must be > 0, got -1e-08' (KEY[i] for an item of a tuple or list) when `value` is
    outside `rng`, else None."""
    items = enumerate(value) if isinstance(value, (tuple, list)) else [(None, value)]
    for i, item in items:
        if (wrong := rng.problem(item)) is not None:
            return f"{key}{'' if i is None else f'[{i}]'} {wrong}"
    return None


def check_ranges(config: Any, prefix: str) -> None:
    """UserError naming the first field of dataclass `config` outside its range, as
    `PREFIX.FIELD must be > 0, got -1e-08`."""
    for f in dataclasses.fields(config):
        rng = range_of(f)
        if rng is not None and (wrong := out_of_range(f"{prefix}.{f.name}", getattr(config, f.name), rng)):
            raise UserError(wrong)
