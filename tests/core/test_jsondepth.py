"""The JSON depth pre-check: right answers, and linear time on adversarial bodies (it runs on every
request body before anything else looks at it)."""

from __future__ import annotations

import time

import pytest

from core.jsondepth import text_depth

MIB = 2**20


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("", 0),
        ("1", 0),
        ("{}", 1),
        ("[[1]]", 2),
        ('{"a": [1, {"b": "[[[{{{"}]}', 3),
        (r'["\"[", []]', 2),
        (r'["\\", [[]]]', 3),  # an escaped backslash ends before the quote, which closes the string
        ('["unclosed [[[[', 1),  # an unclosed string runs to the end: its brackets are not structure
        ("[" * 1000 + "]" * 1000, 1000),
    ],
)
def test_depth(text: str, depth: int) -> None:
    assert text_depth(text) == depth
    assert text_depth(text.encode()) == depth


@pytest.mark.parametrize(
    ("name", "body", "depth"),
    [
        ("escaped quotes", b'["' + b'\\"' * (MIB // 2), 1),  # once 76 s for 120 KB: rescanned from every quote
        ("escaped quotes, no opening quote", b"[" + b'\\"' * (MIB // 2), 1),
        ("lone quotes", b'"' * MIB, 0),
        ("backslashes", b'["' + b"\\" * MIB, 1),
        ("brackets", b"[" * MIB, MIB),
        ("brackets in strings", b'["' + b"[{" * (MIB // 2) + b'"]', 1),
    ],
)
def test_a_mebibyte_of_adversarial_text_is_measured_in_linear_time(name: str, body: bytes, depth: int) -> None:
    started = time.process_time()
    assert text_depth(body) == depth
    assert time.process_time() - started < 2, f"{name}: not linear"
