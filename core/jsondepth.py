"""How deeply a JSON text or a decoded value nests, measured without recursion.

Python's json decoder, pydantic's serializer and any recursive walk fail on deep nesting
(``RecursionError``, "Maximum serialization depth exceeded"): measure first, refuse past
:data:`MAX_JSON_DEPTH`, then decode.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MAX_JSON_DEPTH = 64
"""Deepest nesting accepted in a request body or a keras_json model; ``model.to_json()`` of a Functional
model nests about 12 levels, a model inside a model about 20."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def text_depth(text: str | bytes) -> int:
    """The nesting depth of a JSON text (``{}`` is 1, ``[[1]]`` is 2), brackets inside strings ignored.

    Malformed text gets some number; decoding it afterwards reports the syntax error.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def value_depth(value: Any, limit: int | None = None) -> int:
    """The nesting depth of a decoded JSON value (dicts and lists), walked with a stack.

    Args:
        value: a decoded JSON value.
        limit: stop counting once deeper than this (the result is then ``limit + 1``).
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if limit is not None and deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
