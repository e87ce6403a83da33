"""How deeply a JSON text or a decoded value nests, measured without recursion.

Python's json decoder, pydantic's serializer and any recursive walk fail on deep nesting
(``RecursionError``, "Maximum serialization depth exceeded"): measure first, refuse past
:data:`MAX_JSON_DEPTH`, then decode.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

MAX_JSON_DEPTH = 64
"""Deepest nesting accepted in a request body or a keras_json model; ``model.to_json()`` of a Functional
model nests about 12 levels, a model inside a model about 20."""

# A string, closed or not: an unclosed one runs to the end of the text (the decoder then reports it), so a
# match never fails and is never retried from the next quote. Written as "unrolled loop" (runs of plain
# characters between escapes) so that every character is looked at once: linear in the text's length.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def text_depth(text: str | bytes) -> int:
    """The nesting depth of a JSON text (``{}`` is 1, ``[[1]]`` is 2), brackets inside strings ignored.

    Linear in the text's length (a request body is measured before anything else looks at it). Malformed
    text gets some number; decoding it afterwards reports the syntax error.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    return max(0, max(accumulate(_STEP[b] for b in brackets), default=0))


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
