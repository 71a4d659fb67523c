"""Reader for QEMU's QAPI schema language.

A schema file is a sequence of top-level expressions written in a JSON dialect: strings in
single quotes, ``#`` comments, ``true``/``false``, and no numbers or null.  ``include``
expressions pull in other files relative to the including one.  The reader only turns text
into Python values and remembers where each expression came from, so that the model
(:mod:`qsd_py.qapi.model`) can name ``file:line`` in its own errors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

# One token at a time: skip blanks and comments, then one of the punctuation characters,
# a quoted string, or a bare word (true/false, or something invalid).
_TOKEN = re.compile(
    r"""(?:[ \t\r\n]+|\#[^\n]*)*   # blanks and comments
        (?:([{}\[\],:])            # 1: punctuation
         |'((?:[^'\\\n]|\\.)*)'    # 2: string
         |([A-Za-z_][\w-]*)        # 3: bare word
         |(\S)                     # 4: anything else
         |\Z)""",
    re.VERBOSE,
)


class QAPIParseError(Exception):
    """A schema file could not be read; the message starts with ``file:line:col:``."""


@dataclass(frozen=True)
class SourceInfo:
    """Where an expression starts, for error messages."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Expression:
    """One top-level expression and where it was written."""

    expr: dict[str, Any]
    info: SourceInfo


class _Reader:
    """Recursive-descent parser over the token stream of one file."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, encoding="utf-8") as f:
            self.text = f.read()
        self.pos = 0
        self.tok: str | None = None  # punctuation char, "'" for strings, "w" for words, "" at end
        self.val: Any = None
        self.start = 0
        self.next()

    def where(self, offset: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, offset) + 1
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return line, col

    def error(self, msg: str, offset: int | None = None) -> QAPIParseError:
        line, col = self.where(self.start if offset is None else offset)
        return QAPIParseError(f"{self.path}:{line}:{col}: {msg}")

    def next(self) -> None:
        m = _TOKEN.match(self.text, self.pos)
        assert m is not None  # the pattern always matches (\Z at worst)
        self.pos = m.end()
        self.start = self.pos
        if m.group(1):
            self.tok, self.val = m.group(1), None
            self.start = m.start(1)
        elif m.group(2) is not None:
            self.tok, self.val = "'", re.sub(r"\\(.)", r"\1", m.group(2))
            self.start = m.start(2) - 1
        elif m.group(3):
            self.start = m.start(3)
            if m.group(3) not in ("true", "false"):
                raise self.error(f"stray '{m.group(3)}'")
            self.tok, self.val = "w", m.group(3) == "true"
        elif m.group(4):
            self.start = m.start(4)
            if m.group(4) == "'":
                raise self.error('missing terminating "\'"')
            raise self.error(f"stray '{m.group(4)}'")
        else:
            self.tok, self.val = "", None

    def expect(self, tok: str, what: str) -> None:
        if self.tok != tok:
            raise self.error(f"expected {what}")
        self.next()

    def value(self) -> Any:
        if self.tok == "{":
            return self.obj()
        if self.tok == "[":
            return self.array()
        if self.tok in ("'", "w"):
            val = self.val
            self.next()
            return val
        raise self.error("expected '{', '[', string, or boolean")

    def obj(self) -> dict[str, Any]:
        self.expect("{", "'{'")
        result: dict[str, Any] = {}
        if self.tok == "}":
            self.next()
            return result
        while True:
            if self.tok != "'":
                raise self.error("expected string or '}'")
            key, key_at = self.val, self.start
            self.next()
            self.expect(":", "':'")
            if key in result:
                raise self.error(f"duplicate key '{key}'", key_at)
            result[key] = self.value()
            if self.tok == "}":
                self.next()
                return result
            self.expect(",", "',' or '}'")

    def array(self) -> list[Any]:
        self.expect("[", "'['")
        result: list[Any] = []
        if self.tok == "]":
            self.next()
            return result
        while True:
            result.append(self.value())
            if self.tok == "]":
                self.next()
                return result
            self.expect(",", "',' or ']'")

    def expressions(self) -> list[tuple[dict[str, Any], int]]:
        out: list[tuple[dict[str, Any], int]] = []
        while self.tok != "":
            if self.tok != "{":
                raise self.error("expected '{'")
            line, _ = self.where(self.start)
            out.append((self.obj(), line))
        return out


def parse_schema(path: str | os.PathLike[str]) -> list[Expression]:
    """Read ``path`` and every file it includes, in order, each file once.

    Plain ``os.path`` rather than pathlib: this runs at every start-up, and pathlib's import
    alone costs a few milliseconds of it."""
    seen: set[str] = set()
    result: list[Expression] = []
    _parse_file(os.path.realpath(path), seen, result, include_info=None)
    return result


def _parse_file(
    path: str, seen: set[str], out: list[Expression], include_info: SourceInfo | None
) -> None:
    if path in seen:
        return
    seen.add(path)
    try:
        reader = _Reader(path)
    except OSError as exc:
        where = f"{include_info}: " if include_info else ""
        raise QAPIParseError(f"{where}can't read file '{path}': {exc.strerror}") from exc
    for expr, line in reader.expressions():
        info = SourceInfo(path, line)
        if "include" in expr:
            if len(expr) != 1 or not isinstance(expr["include"], str):
                raise QAPIParseError(f"{info}: invalid 'include' directive")
            included = os.path.join(os.path.dirname(path), expr["include"])
            _parse_file(os.path.realpath(included), seen, out, info)
        elif "pragma" in expr:
            continue  # naming-rule exceptions and the like: qsd-py enforces none of them
        else:
            out.append(Expression(expr, info))
