"""Strict checks of YAML values against type hints.

The hints are the ones LightningCLI reads (dataclass fields and __init__ annotations) and the
fields of `Proposal`. Nothing is coerced: a proposal that writes "64" where an int belongs is
wrong, even though a command line would accept it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from datetime import date, datetime
from typing import Any, Literal, Union, get_args, get_origin

_NAMES: dict[Any, tuple[str, str]] = {  # hint -> (singular, plural) in messages
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
    date: ("a date (YYYY-MM-DD)", "dates"),
    type(None): ("null", "nulls"),
}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?$|^[A-Za-z_]\w*:[A-Za-z_]\w*$")
# PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string.
_FLOAT_LIKE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def fits(value: Any, hint: Any) -> bool:
    """Whether a value parsed by yaml.safe_load is of type `hint`, without coercion."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        return isinstance(value, dict) and all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an integer too, if a float can hold it (as_hinted converts it)
        return isinstance(value, float) or isinstance(value, int) and not isinstance(value, bool) \
            and abs(value) <= sys.float_info.max
    if hint is str:
        return isinstance(value, str)
    if hint is date:
        return isinstance(value, date) and not isinstance(value, datetime)
    raise TypeError(f"no check for type hint {hint!r}")  # a config field of a new kind of type


def as_hinted(value: Any, hint: Any) -> Any:
    """A value that `fits` the hint as the run holds it (jsonargparse converts on parsing, the
    registry sets values after it): a tuple for a list, a float for an integer (AdamW takes no
    integer betas)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return next((as_hinted(value, a) for a in args if fits(value, a)), value)
    if origin is tuple and isinstance(value, list):
        args = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        return tuple(as_hinted(v, a) for v, a in zip(value, args, strict=False))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, for 'expected ...' messages."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (list, tuple):
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        plural = _NAMES.get(args[0], ("", "values"))[1] if args else "values"
        return f"a list of {len(args)} {plural}" if fixed else f"a list of {plural}"
    if origin is dict:
        return "a mapping with string keys"
    return _NAMES.get(hint, (getattr(hint, "__name__", str(hint)), ""))[0]


def show(value: Any) -> str:
    """A value and its YAML type, shortened, for 'got ...' messages."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null", date: "a date", datetime: "a date and time"}
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    hint = ""
    if isinstance(value, str) and _FLOAT_LIKE.match(value):
        hint = "; YAML 1.1 reads an exponent without a dot as a string, write e.g. 1.0e-4"
    return f"{text} ({kinds.get(type(value), type(value).__name__)}{hint})"


def mismatch(value: Any, hint: Any) -> str | None:
    """None when `value` is of type `hint`, else 'expected X, got Y'."""
    return None if fits(value, hint) else f"expected {describe(hint)}, got {show(value)}"


def python_name(value: str) -> str | None:
    """The module when `value` reads as a Python import path (os.system, pkg.mod:attr) whose
    top-level module exists; None otherwise. find_spec of a top-level name only searches the
    path, it imports nothing. Namespace packages (any folder on sys.path, origin None) are left
    out: they would make `english.jsonl` code wherever the working directory has english/."""
    if not _DOTTED.match(value):
        return None
    head = re.split(r"[.:]", value, maxsplit=1)[0]
    spec = importlib.util.find_spec(head)
    return head if spec is not None and spec.origin is not None else None


def strings(value: Any):
    """Every string value inside a parsed YAML value. Mapping keys are left out: those of a
    proposal are checked against the run config's keys, and `data.x` would read as a module
    wherever the working directory has a data/ folder."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
