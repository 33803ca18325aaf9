"""Bytes in JSON input: an object of exactly the form ``{"$binary": "<base64>"}`` stands for
bytes wherever data comes in as JSON text (the publish API, ``roomcast publish --data``).

The base64 must be in its one standard form (RFC 4648 alphabet, padded, nothing else), so that
every accepted text means one byte string.  An object with other keys beside ``"$binary"``
(MongoDB's extended JSON, say) is plain JSON.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

__all__ = ["KEY", "BinaryMarkerError", "decode_markers", "may_hold_markers"]

KEY: Final = "$binary"


class BinaryMarkerError(ValueError):
    """A ``{"$binary": ...}`` object whose value is not standard base64 text."""


def may_hold_markers(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` may hold the key ``"$binary"``: it names it, or it has
    ``\\u`` escapes that could spell it.  When false, :func:`decode_markers` has nothing to do."""
    return b"binary" in raw or b"\\u" in raw


def decode_markers(data: Any) -> Any:
    """``data``, fresh from a JSON decoder (it is changed in place), with every
    ``{"$binary": "<base64>"}`` replaced by its bytes; raise :class:`BinaryMarkerError`."""
    if _is_marker(data):
        return _decode(data)
    stack = [data] if isinstance(data, dict | list) else []
    while stack:
        item = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, value in list(pairs):
            if _is_marker(value):
                item[key] = _decode(value)
            elif isinstance(value, dict | list):
                stack.append(value)
    return data


def _is_marker(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and KEY in value


def _decode(marker: dict[str, Any]) -> bytes:
    text = marker[KEY]
    if not isinstance(text, str):
        raise BinaryMarkerError(f'"{KEY}" must be a base64 string, got {type(text).__name__}')
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        data = None
    if data is None or base64.b64encode(data) != text.encode("ascii"):
        raise BinaryMarkerError(f'"{KEY}" is not standard padded base64: {text[:40]!r}')
    return data
