"""What JSON cardq stores: payloads and results nested at most MAX_DEPTH levels, checked where they enter.

orjson refuses to write a value nested deeper than 254 levels, and cardq wraps stored values in a few more (a
batch of results travels as [[id, token, result], ...]; `jobs show` puts the job in an object): a value that
passed a check at 254 levels would fail later, somewhere nobody handles it. A limit well below that, checked
once at the door, leaves every later wrapping safe.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_DEPTH = 64


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Is `value` nested more than `limit` levels (an object or array is one level)? Iterative: no recursion
    limit of its own, and a flat object costs one pass over its values."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def encode(value: Any) -> bytes:
    """`value` as compact JSON; ValueError naming the problem (too deep, or not JSON) when it cannot be stored."""
    if isinstance(value, dict | list) and too_deep(value):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels (the most cardq stores)")
    try:
        return orjson.dumps(value)
    except TypeError as e:  # orjson: a value JSON cannot hold (an object, an integer beyond 64 bits, NaN keys...)
        raise ValueError(f"not JSON: {e}") from None
