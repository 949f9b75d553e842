"""Text a stranger wrote (core/text.py): control and bidi characters are named, the rest is text."""

from __future__ import annotations

import pytest

from cpm_lightning.core.text import escaped, unsafe_text


@pytest.mark.parametrize("text, multiline, expected", [
    ("clear \x1b[2J", False, "holds U+001B (a control character) at character 7"),
    ("\x1b]0;owned\x07", True, "holds U+001B (a control character) at character 1"),
    ("ring\x07", False, "holds U+0007 (a control character) at character 5"),
    ("nul\x00", True, "holds U+0000 (a control character) at character 4"),
    ("back\rover", True, "holds U+000D (a control character) at character 5"),
    ("c1 \x9b", False, "holds U+009B (a control character) at character 4"),
    ("del \x7f", False, "holds U+007F (a control character) at character 5"),
    *[(f"ab{c}", False, f"holds U+{ord(c):04X} (a bidirectional control) at character 3")
      for c in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"],
    ("two\nlines", False, "holds U+000A (a control character) at character 4"),
    ("tab\tstop", False, "holds U+0009 (a control character) at character 4"),
    ("two\nlines\tand a tab", True, None),
    ("子曰：学而时习之 — café, 😀, \u200d joiner", False, None),  # a zero-width joiner is not a control
])
def test_control_and_bidi_characters_are_named(text, multiline, expected):
    assert unsafe_text(text, multiline) == (expected and f"{expected}; expected plain text")


def test_escaped_writes_each_as_its_escape():
    assert escaped("a\x1b]0;t\x07b\u202ec\x00d\te\nf 中") == "a\\x1b]0;t\\x07b\\u202ec\\x00d\te\nf 中"
