"""The log's quoting fast path gives exactly what JSON quoting gives.

A value with a space but nothing to escape (a route name, a reply text) is
quoted without json.dumps; anything else still goes through it.
"""

from __future__ import annotations

import json

import pytest

from relay import events

VALUES = [
    "", "plain", "a b", "250 2.0.0 OK", "x=y", 'say "hi"', "back\\slash", "é ü",
    "tab\there", "nel\x85", "line\u2028sep", "del\x7f", "日本 語", 42, None, 1.5,
]  # fmt: skip


@pytest.mark.parametrize("value", VALUES)
def test_quote_is_bare_or_the_json_string(value: object) -> None:
    text = str(value)
    quoted = events._quote(value)
    if quoted == text:
        assert text and text.isprintable() and not any(c in text for c in ' "=\\')
    else:
        assert json.loads(quoted) == text
        expected = json.dumps(text, ensure_ascii=False)
        for char, escape in (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
            expected = expected.replace(char, escape)
        assert quoted == expected
