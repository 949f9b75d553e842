"""What the operator of a run lets proposals do: which locations they may make the run read
(`registry.allowed_sources`) and how large a model they may make it build
(`registry.max_params`). `proposals check` applies the defaults; `fit` its run config's values
(docs/ARCHITECTURE.md, "The registry"). Values from the run config or the command line are the
operator's own and are not limited.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem, make_path_posix

from cpm_lightning.core.ranges import check_ranges, ranged
from cpm_lightning.model.config import MAX_PARAMS, ArchConfig
from cpm_lightning.model.stats import param_count

# The keys whose values the run opens: datamodules.sources.SourceConfig.url (fsspec URLs and
# globs) and datamodules.config.DataConfig.tokenizer (a path or URL).
LOCATION_KEYS = re.compile(r"^data\.(sources\.[^.]+\.url|tokenizer)$")
# fsspec reads these protocols (and none) as local files.
_LOCAL = (None, "file", "local")
_GLOB = re.compile(r"[*?\[]")


@dataclass(kw_only=True)
class Limits:
    """The run config's `registry` keys that bound what proposals may do."""

    allowed_sources: list[str] = field(default_factory=lambda: ["s3://cpm-lightning-data/"])
    """Locations (URL prefixes: s3://bucket/dir/, https://host/dir/, local directories) under
    which a proposal's data.sources.*.url and data.tokenizer must lie. The default is the
    project's data bucket; the run config's own sources are not limited."""
    max_params: int = ranged(MAX_PARAMS, ge=1)
    """Largest model, in parameters (the `model info` count), that the run builds with the
    proposals applied; checked before anything is built. The default is twice the largest
    preset."""

    def __post_init__(self):
        check_ranges(self, "registry")


def location_problem(value: str, allowed: list[str]) -> str | None:
    """None when `value` (a source URL or glob, or a tokenizer path or URL) lies under one of
    the `allowed` prefixes as fsspec reads both; else what is wrong, naming the prefixes."""
    reason = _refusal(value) or _outside(value, allowed)
    return reason and f"{value!r} {reason}; a proposal may name only locations under " \
                      f"registry.allowed_sources ({', '.join(allowed) or 'none'})"


def _refusal(value: str) -> str | None:
    """What makes `value` ambiguous, whatever the prefixes: URL libraries, servers and fsspec's
    chaining read these differently, so they are refused rather than normalized. Checked on the
    value percent-decoded until it stops changing (%252e%252e is .. to a server that decodes
    twice)."""
    if "::" in value:
        return "chains filesystems ('::')"
    decoded, previous = value, None
    while decoded != previous:
        previous, decoded = decoded, unquote(decoded)
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded) or "\\" in decoded:
        return "contains a control character or a backslash"
    if any(segment.startswith("..") for segment in decoded.split("/")):  # also ..;/ (path parameters)
        return "has a '..' segment"
    return None


def _outside(value: str, allowed: list[str]) -> str | None:
    protocol, path = _location(value)
    roots = [_location(prefix) for prefix in allowed]
    if not any(protocol == p and _under(path, root) for p, root in roots):
        return "is not under an allowed prefix"
    if protocol == "file" and _GLOB.search(path):
        # A glob reaches whatever its matches link to: each match must resolve under a prefix.
        for match in LocalFileSystem().glob(path):
            real = os.path.realpath(match)
            if not any(p == "file" and _under(real, root) for p, root in roots):
                return f"matches {match}, which resolves to {real}, not under an allowed prefix"
    return None


def _location(url: str) -> tuple[str, str]:
    """(protocol, path) as the run would open `url`: the protocol lowercased, a local path
    absolute with `~` expanded and symlinks resolved (of a glob, those before its first
    wildcard), any other path as written."""
    protocol, path = split_protocol(url)
    protocol = protocol.lower() if protocol else None
    if protocol not in _LOCAL:
        return protocol, path
    return "file", os.path.realpath(make_path_posix(path))


def _under(path: str, root: str) -> bool:
    """Whether `path` is `root` or inside it, segment by segment (s3://data-evil/ is not
    under s3://data)."""
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/") or not root


def size_problem(arch: ArchConfig, max_params: int) -> str | None:
    """'N parameters, above registry.max_params=M' when the resolved `arch` is too large."""
    count = param_count(arch)
    if count <= max_params:
        return None
    # Python prints integers of at most 4300 digits, and a proposal may write one that long.
    shown = f"{count:,}" if count < 10**18 else "more than 10^18"
    return f"{shown} parameters, above registry.max_params={max_params:,}"
