"""Canonical JSON, the byte form that gets signed, and the strict parser used for everything received.

Canonical form: keys sorted, no insignificant whitespace, UTF-8, no NaN/Infinity. The parser refuses
what a hostile broker or peer might send to confuse or exhaust a device: oversized input, invalid
UTF-8, duplicate keys, NaN/Infinity, excessive nesting and absurdly long integers.
"""

from __future__ import annotations

import json
from typing import Any

from schemas.errors import EdgeswarmError, ReasonCode

DEFAULT_MAX_DEPTH = 16
MAX_INT_DIGITS = 20  # anything longer cannot be a sequence, size or version number we accept


class MalformedDocument(EdgeswarmError, ValueError):
    """Input that is not acceptable JSON for the wire contract."""

    code = ReasonCode.MALFORMED


def canonical_json(obj: Any) -> bytes:
    """Raises MalformedDocument for what has no canonical form (a lone surrogate has no UTF-8)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedDocument(f"a string holds {exc.object[exc.start:exc.end]!a}, which UTF-8 cannot encode") from None


def _reject_constant(name: str) -> Any:
    raise MalformedDocument(f"non-finite number {name} is not allowed")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedDocument(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MalformedDocument("integer too long")
    return int(text)


def _reject_float(text: str) -> Any:
    raise MalformedDocument(f"floating point number {text[:20]} is not allowed")


def _check_tree(obj: Any, limit: int) -> None:
    """Nesting within `limit`, and every string encodable as UTF-8: a `\\ud800` escape parses to a lone
    surrogate, which no canonical (UTF-8) form can hold."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            raise MalformedDocument(f"nesting deeper than {limit}")
        if isinstance(item, dict):
            stack.extend((k, level) for k in item)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedDocument("a string holds a lone surrogate (an escape with no UTF-8 form)") from None


def strict_loads(raw: bytes, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse untrusted JSON bytes, refusing anything outside the wire contract's grammar."""
    if len(raw) > max_bytes:
        raise MalformedDocument(f"document of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedDocument(f"invalid UTF-8 at byte {exc.start}") from None
    # Nesting is bounded before json.loads so a deep document cannot reach the recursion limit.
    if text.count("[") + text.count("{") > max_depth and _bracket_depth(text) > max_depth:
        raise MalformedDocument(f"nesting deeper than {max_depth}")
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_reject_float,
        )
    except MalformedDocument:
        raise
    except (ValueError, RecursionError) as exc:
        raise MalformedDocument(f"invalid JSON: {exc}") from None
    _check_tree(obj, max_depth)
    return obj


def _bracket_depth(text: str) -> int:
    """Upper bound on nesting depth, ignoring brackets inside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest
