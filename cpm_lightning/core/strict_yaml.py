"""Plain YAML data, strictly (docs/ARCHITECTURE.md, "The registry"): what registry/schema.py reads
proposals with, registry/run_args.py every run config file and command-line value (for `fit`,
before LightningCLI reads them, and for `live`), and inference/book.py the prompt book and the
applications list. `StrictLoader` is PyYAML's SafeLoader (no tags that build Python objects)
whose impossible dates, overlong integers and integers beyond int64 are marked errors; `walk`
refuses aliases (a few lines of them expand to gigabytes), duplicate keys and keys that are not
plain strings, and records the line of every key.
"""

from __future__ import annotations

import yaml

INT64_MAX = 2**63 - 1


class StrictLoader(yaml.SafeLoader):
    """SafeLoader whose impossible dates and overlong integers are marked errors instead of
    ValueErrors, and integers beyond int64 too."""

    def construct_yaml_timestamp(self, node):
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as e:
            raise yaml.constructor.ConstructorError(None, None, f"impossible date {node.value!r} ({e})",
                                                    node.start_mark) from None

    def construct_yaml_int(self, node):
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # Python converts at most 4300 digits
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(node.value)} characters",
                                                    node.start_mark) from None
        if not -INT64_MAX - 1 <= value <= INT64_MAX:  # torch, numpy and every store of a number take int64
            shown = node.value if len(node.value) <= 30 else f"{node.value[:20]}... ({len(node.value)} characters)"
            raise yaml.constructor.ConstructorError(None, None, f"integer {shown} is out of range: expected "
                                                    f"-{INT64_MAX + 1} to {INT64_MAX} (int64)", node.start_mark)
        return value


StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", StrictLoader.construct_yaml_timestamp)
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def walk(node, name: str, lines: dict[str, int], seen: set[int], problems: list[tuple[int, str, str]]):
    """Record the line of every mapping key under `name`; refuse aliases and duplicate keys."""
    if id(node) in seen:  # the composer hands out the anchored node again for each alias
        line = lines.get(name, node.start_mark.line + 1)  # the node's own mark is the anchor's
        problems.append((line, name or "yaml", "YAML aliases (*name) are not allowed"))
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                problems.append((key.start_mark.line + 1, name or "yaml", "mapping keys must be plain strings"))
                continue
            child = f"{name}.{key.value}" if name else key.value
            if key.value in keys:
                problems.append((key.start_mark.line + 1, child, "duplicate key"))
            keys.add(key.value)
            lines.setdefault(child, key.start_mark.line + 1)
            walk(value, child, lines, seen, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault(f"{name}.{i}", item.start_mark.line + 1)
            walk(item, f"{name}.{i}", lines, seen, problems)
