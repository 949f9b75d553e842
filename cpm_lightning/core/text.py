"""Text a stranger wrote: the free-text fields of a proposal (registry/schema.py) and the entries
of the prompt book and the applications list (inference/book.py), refused before they reach a
terminal (`proposals list`), a report or the site. Control characters can clear a screen, set a
window title or ring the bell (ESC, OSC, BEL); bidirectional controls make text read otherwise
than it is stored.
"""

from __future__ import annotations

import re

# C0 (but tab and line feed, which `multiline` decides on), DEL and C1; then the bidi controls:
# ALM, LRM, RLM, LRE..RLO, LRI..PDI.
_CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f"
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = {True: re.compile(f"[{_CONTROL}{_BIDI}]"), False: re.compile(f"[{_CONTROL}{_BIDI}\t\n]")}


def unsafe_text(text: str, multiline: bool) -> str | None:
    """'holds U+001B (a control character) at character 5; expected plain text' for the first
    control or bidi character of `text`, else None. `multiline`: tab and line feed are text."""
    if (m := _UNSAFE[multiline].search(text)) is None:
        return None
    kind = "a bidirectional control" if re.match(f"[{_BIDI}]", m[0]) else "a control character"
    return f"holds U+{ord(m[0]):04X} ({kind}) at character {m.start() + 1}; expected plain text"


def escaped(text: str) -> str:
    """`text` with each control and bidi character (tab and line feed aside) written as its
    escape (\\x1b, \\u202e), for a message that names it."""
    return _UNSAFE[True].sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)
