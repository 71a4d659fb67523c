"""QMP output in QEMU's JSON format, compact or ``pretty=on``.

QEMU writes ``{"a": 1, "b": [2, 3]}`` (", " and ": " separators), escapes every byte outside
printable ASCII as ``\\uXXXX`` with upper-case hex, prints doubles with ``%.17g`` and, when
pretty, indents by four spaces with the closing bracket of an empty container on a line of
its own.  Every line ends in ``\\r\\n``.  Matching it byte for byte lets a transcript taken
against QEMU be replayed against qsd-py.
"""

from __future__ import annotations

import re
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

_ESCAPE_HEX = re.compile(r"(\\\\)|\\u([0-9a-f]{4})")


def _upper_escape(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1)
    return "\\u" + match.group(2).upper()


def quote(text: str) -> str:
    """A JSON string literal as QEMU writes it."""
    out: str = encode_basestring_ascii(text)
    if "\\u" in out:
        out = _ESCAPE_HEX.sub(_upper_escape, out)
    if "\x7f" in out:
        out = out.replace("\x7f", "\\u007F")
    return out


def _scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".17g")
    if isinstance(value, str):
        return quote(value)
    raise TypeError(f"cannot send {type(value).__name__} over QMP")


def _compact(value: Any, parts: list[str]) -> None:
    if isinstance(value, dict):
        if not value:
            parts.append("{}")
            return
        parts.append("{")
        first = True
        for key, item in value.items():
            if not first:
                parts.append(", ")
            first = False
            parts.append(quote(key))
            parts.append(": ")
            _compact(item, parts)
        parts.append("}")
    elif isinstance(value, (list, tuple)):
        if not value:
            parts.append("[]")
            return
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(", ")
            _compact(item, parts)
        parts.append("]")
    else:
        parts.append(_scalar(value))


def _pretty(value: Any, level: int, parts: list[str]) -> None:
    if isinstance(value, dict):
        items: Any = value.items()
        opener, closer = "{", "}"
    elif isinstance(value, (list, tuple)):
        items = value
        opener, closer = "[", "]"
    else:
        parts.append(_scalar(value))
        return
    inner = "\r\n" + "    " * (level + 1)
    parts.append(opener)
    first = True
    for item in items:
        parts.append(inner if first else "," + inner)
        first = False
        if closer == "}":
            parts.append(quote(item[0]))
            parts.append(": ")
            _pretty(item[1], level + 1, parts)
        else:
            _pretty(item, level + 1, parts)
    parts.append("\r\n" + "    " * level + closer)


def dumps(value: Any, pretty: bool = False) -> bytes:
    """One QMP message, ``\\r\\n`` included."""
    parts: list[str] = []
    if pretty:
        _pretty(value, 0, parts)
    else:
        _compact(value, parts)
    parts.append("\r\n")
    return "".join(parts).encode("ascii")
