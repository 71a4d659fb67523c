"""A streaming JSON parser that reads QMP input the way QEMU 11.1 does.

QMP clients send JSON objects back to back with no separator, and a read may hold several
objects or a fragment of one, so the parser is fed bytes as they arrive and hands back every
complete value.  It follows QEMU's dialect and its error behaviour, which clients observe:

- single-quoted strings are accepted, and ``\\'`` is an escape;
- errors are reported as ``"<line>:<column>: JSON parse error, <what>"`` (counted over the
  whole connection, and with QEMU's quirk of one extra column for a token that starts right
  where a number, a keyword or error recovery ended);
- after a lexical error (a byte that cannot start or continue a token) the parser skips input
  until a bracket, a control character or an impossible UTF-8 byte, so that a client can
  resynchronize; after a syntax error it drops the tokens of the broken value until its
  brackets balance;
- QEMU's limits per value (nesting 1024, 2 Mi tokens, 64 MiB of token text) end with an
  error, not a dropped connection.

It must stay linear: a 10 MiB string or a 4 Mi-token array arrives over hundreds of reads,
so scans resume where the previous read stopped, and strings are matched by C-level regexes.
"""

from __future__ import annotations

import re
from typing import Any

MAX_NESTING = 1024
MAX_TOKEN_COUNT = 2 << 20
MAX_TOKEN_SIZE = 64 << 20


class JSONError:
    """A parse error, yielded in the stream of values (never itself a JSON value)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"JSONError({self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JSONError) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)


class _SyntaxError(Exception):
    """Raised inside the parser; the stream turns it into a located JSONError."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


# --- lexical classes ------------------------------------------------------------------------
# Bytes QEMU's lexer accepts inside a string: everything from space to 0xFD.  Control
# characters and 0xFE/0xFF end the string with a lexical error; bad UTF-8 is the parser's.
_STR_OK = rb"\x20-\xfd"
# Possessive quantifiers: the plain form backtracks and turns superlinear on long strings.
_DQ_BODY = re.compile(rb"(?:[\x20\x21\x23-\x5b\x5d-\xfd]++|\\[%s])*+" % _STR_OK)
_SQ_BODY = re.compile(rb"(?:[\x20-\x26\x28-\x5b\x5d-\xfd]++|\\[%s])*+" % _STR_OK)
_WS = re.compile(rb"[ \t\r\n]*")
_KEYWORD = re.compile(rb"[a-z]*")
_FRACTION_EXP = rb"\.[0-9]+(?:[eE][-+]?[0-9]+)?"
# A bare zero takes no exponent in QEMU's lexer ("0e5" is 0 followed by a keyword).
_NUMBER = re.compile(
    rb"-?(?:0(?:%s)?|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)" % _FRACTION_EXP
)
_NUMBER_CHARS = re.compile(rb"[0-9.eE+-]*")
# While recovering from a lexical error: skip all but structural characters, control
# characters (other than tab) and the bytes 0xFE/0xFF, where a client may resynchronize.
_RECOVERY_SKIP = re.compile(rb"[^\[\]{},:\x00-\x08\x0a-\x1f\xfe\xff]*")
_NONCHAR = re.compile("[\ufdd0-\ufdef\ufffe\uffff]|[\U0001fffe-\U0010ffff]")

_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COMMA, _COLON = b"{}[],:"
_QUOTES = (0x22, 0x27)
_SIMPLE_ESCAPES = {
    0x22: '"', 0x27: "'", 0x5C: "\\", 0x2F: "/",
    0x62: "\b", 0x66: "\f", 0x6E: "\n", 0x72: "\r", 0x74: "\t",
}  # fmt: skip

# Token kinds for the parser (single characters use their byte value).
_STRING, _NUMBER_T, _KEYWORD_T = 256, 257, 258

# Container states of the push parser.
_AFTER_LCURLY, _BEFORE_KEY, _END_OF_KEY, _BEFORE_VALUE, _END_OF_VALUE, _AFTER_LSQUARE = range(6)


def _valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    return not ((cp & 0xFFFE) == 0xFFFE or 0xFDD0 <= cp <= 0xFDEF)


def _hex4(data: bytes, at: int) -> int:
    text = data[at : at + 4]
    if len(text) != 4 or not all(c in b"0123456789abcdefABCDEF" for c in text):
        return -1
    return int(text, 16)


def _decode_raw(raw: bytes) -> str:
    """Decode string bytes as QEMU's modified UTF-8 (0xC0 0x80 is NUL; no non-characters)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError("invalid UTF-8 sequence in string") from err
    if not text.isascii() and _NONCHAR.search(text):
        raise ValueError("invalid UTF-8 sequence in string")
    return text


def decode_string(token: bytes) -> str:
    """The value of a string token (quotes included); ValueError with QEMU's message."""
    body = token[1:-1]
    if b"\\" not in body:
        return _decode_raw(body)
    parts: list[str] = []
    pos = 0
    while True:
        esc = body.find(b"\\", pos)
        if esc < 0:
            parts.append(_decode_raw(body[pos:]))
            return "".join(parts)
        parts.append(_decode_raw(body[pos:esc]))
        kind = body[esc + 1]
        if kind in _SIMPLE_ESCAPES:
            parts.append(_SIMPLE_ESCAPES[kind])
            pos = esc + 2
            continue
        if kind != 0x75:  # 'u'
            raise ValueError("invalid escape sequence in string")
        cp, pos = _unicode_escape(body, esc)
        parts.append(chr(cp))


def _unicode_escape(body: bytes, esc: int) -> tuple[int, int]:
    """Decode ``\\uXXXX`` (or a surrogate pair) at ``esc``; returns (code point, next pos)."""
    cp = _hex4(body, esc + 2)
    end = esc + 6
    if 0xD800 <= cp <= 0xDBFF and body[end : end + 2] == b"\\u":
        low = _hex4(body, end + 2)
        if 0xDC00 <= low <= 0xDFFF:
            cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
            end += 6
        else:
            cp = -1
    if not _valid_codepoint(cp):
        # QEMU quotes the escape as it appears in the token, closing quote included.
        text = (body + b'"')[esc:end].decode("utf-8", "replace")
        raise ValueError(f"{text} is not a valid Unicode character")
    return cp, end


def _number(text: bytes) -> int | float:
    """QEMU's number model: int64, else uint64, else double."""
    if b"." in text or b"e" in text or b"E" in text:
        return float(text)
    if len(text) > 320:  # beyond any double: skip float()'s slow exact conversion
        return float("-inf") if text[0] == 0x2D else float("inf")
    if len(text) <= 21:  # longer ones are out of range anyway (and int() has a digit limit)
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(text)


class JSONStream:
    """Incremental QMP JSON parser: ``feed(bytes)`` returns the values and errors completed."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._lines = 0  # newlines before _buf[0]
        self._last_nl = -1  # stream offset of the last newline before _buf[0]
        self._refed = -1  # stream offset where a token would start on a re-fed byte
        self._recovering = False
        self._scan_from = 0  # where to resume scanning an incomplete token
        self._discarding = 0  # quote byte of a string being dropped after the size limit
        # push parser
        self._stack: list[list[Any]] = []  # [container, state, pending key]
        self._skip = 0  # bracket depth of a broken value still being dropped
        self._tokens = 0
        self._size = 0
        self._out: list[Any] = []

    # --- public ----------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return the parsed values and :class:`JSONError` s, in order."""
        self._buf += data
        self._out = out = []
        while self._lex_one():
            pass
        self._compact()
        self._out = []
        return out

    # --- positions ---------------------------------------------------------------------------
    def _location(self, offset: int) -> str:
        """``line:column`` of stream offset ``offset`` (1-based, as QEMU reports it)."""
        rel = offset - self._base
        newlines = self._buf.count(b"\n", 0, rel)
        if newlines:
            line = self._lines + newlines + 1
            col = rel - self._buf.rfind(b"\n", 0, rel)
        else:
            line = self._lines + 1
            col = offset - self._last_nl
        if offset == self._refed:
            col += 1  # QEMU counts a re-fed lookahead byte twice
        return f"{line}:{col}"

    def _compact(self) -> None:
        """Drop consumed bytes, keeping the line count; cheap unless a token is pending."""
        keep_from = self._pos
        if keep_from == 0:
            return
        if keep_from < len(self._buf) and keep_from < 65536 and keep_from * 2 < len(self._buf):
            return  # a big pending token: moving it on every read would be quadratic
        newlines = self._buf.count(b"\n", 0, keep_from)
        if newlines:
            self._lines += newlines
            self._last_nl = self._base + self._buf.rfind(b"\n", 0, keep_from)
        del self._buf[:keep_from]
        self._base += keep_from
        self._scan_from -= keep_from
        self._pos = 0

    # --- lexer -------------------------------------------------------------------------------
    def _lex_one(self) -> bool:
        """Consume one token (or a stretch of skipped input); False when more bytes are needed."""
        buf, p, n = self._buf, self._pos, len(self._buf)
        if self._discarding:
            return self._discard_string()
        if self._recovering:
            end = _RECOVERY_SKIP.match(buf, p).end()  # type: ignore[union-attr]
            self._pos = end
            if end == n:
                return False
            self._recovering = False
            self._refed = self._base + end
            return True
        p = _WS.match(buf, p).end()  # type: ignore[union-attr]
        self._pos = p
        if p == n:
            return False
        c = buf[p]
        if c in b"{}[],:":
            self._pos = p + 1
            self._token(c, p, None)
            return True
        if c in _QUOTES:
            return self._lex_string(c, p, n)
        if c == 0x2D or 0x30 <= c <= 0x39:
            return self._lex_number(p, n)
        if 0x61 <= c <= 0x7A:
            end = _KEYWORD.match(buf, max(p, self._scan_from)).end()  # type: ignore[union-attr]
            if end == n:
                return self._incomplete(p, n)
            self._pos = end
            self._refed = self._base + end
            self._scan_from = 0
            self._token(_KEYWORD_T, p, bytes(buf[p:end]))
            return True
        self._lexical_error(p, p + 1)
        return True

    def _incomplete(self, start: int, n: int) -> bool:
        """A token runs to the end of the input: wait for more, within the size limit."""
        self._scan_from = n
        if n - start + self._size > MAX_TOKEN_SIZE:
            self._limit_error("JSON token size limit exceeded", len(self._stack))
            self._pos = n
            self._scan_from = 0
            if self._buf[start] in _QUOTES:
                self._discarding = self._buf[start]
        return False

    def _lex_string(self, quote: int, p: int, n: int) -> bool:
        body = _DQ_BODY if quote == 0x22 else _SQ_BODY
        end = body.match(self._buf, max(p + 1, self._scan_from)).end()  # type: ignore[union-attr]
        if end == n or (end == n - 1 and self._buf[end] == 0x5C):
            return self._incomplete(p, end)
        self._scan_from = 0
        if self._buf[end] == quote:
            self._pos = end + 1
            self._token(_STRING, p, bytes(self._buf[p : end + 1]))
        elif self._buf[end] == 0x5C:
            self._lexical_error(p, end + 2)  # backslash and the byte it cannot escape
        else:
            self._lexical_error(p, end + 1)
        return True

    def _lex_number(self, p: int, n: int) -> bool:
        buf = self._buf
        m = _NUMBER.match(buf, p)
        end = m.end() if m else p
        if end < n and buf[end] not in b"0123456789.eE+-" and m:
            self._pos = end
            self._refed = self._base + end
            self._scan_from = 0
            self._token(_NUMBER_T, p, bytes(buf[p:end]))
            return True
        # Slow path: the number may continue in the next read, or end in an error.
        if _NUMBER_CHARS.match(buf, max(p, self._scan_from)).end() == n:  # type: ignore[union-attr]
            return self._incomplete(p, n)
        self._scan_from = 0
        return self._number_dfa(p)

    def _number_dfa(self, p: int) -> bool:
        """QEMU's number automaton, for the rare inputs the regex cannot settle."""
        buf = self._buf
        i = p
        if buf[i] == 0x2D:
            i += 1
        zero = buf[i] == 0x30
        if zero:
            i += 1
            if buf[i] in b"0123456789":
                self._lexical_error(p, i + 1)
                return True
        elif buf[i] in b"123456789":
            while buf[i] in b"0123456789":
                i += 1
        else:
            self._lexical_error(p, i + 1)
            return True
        if buf[i] == 0x2E:
            i += 1
            if buf[i] not in b"0123456789":
                self._lexical_error(p, i + 1)
                return True
            while buf[i] in b"0123456789":
                i += 1
            zero = False
        if buf[i] in b"eE" and not zero:
            i += 1
            if buf[i] in b"+-":
                i += 1
            if buf[i] not in b"0123456789":
                self._lexical_error(p, i + 1)
                return True
            while buf[i] in b"0123456789":
                i += 1
        self._pos = i
        self._refed = self._base + i
        self._scan_from = 0
        self._token(_NUMBER_T, p, bytes(buf[p:i]))
        return True

    def _discard_string(self) -> bool:
        """Drop an oversized string up to its closing quote, without keeping it in memory."""
        body = _DQ_BODY if self._discarding == 0x22 else _SQ_BODY
        buf, n = self._buf, len(self._buf)
        end = body.match(buf, self._pos).end()  # type: ignore[union-attr]
        if end == n or (end == n - 1 and buf[end] == 0x5C):
            self._pos = end
            return False
        quote, self._discarding = self._discarding, 0
        self._pos = end + 1
        if buf[end] != quote:  # a byte no string may hold: recover as after a lexical error
            self._recovering = True
            self._reset_value()
        return True

    # --- errors ------------------------------------------------------------------------------
    def _lexical_error(self, start: int, end: int) -> None:
        """A byte no token can take: report it (unless dropping a broken value) and recover."""
        self._pos = end
        self._recovering = True
        text = bytes(self._buf[start:end]).split(b"\0", 1)[0].decode("utf-8", "replace")
        if not self._skip:
            where = self._location(self._base + start)
            self._out.append(JSONError(f"{where}: JSON parse error, stray '{text}'"))
        self._reset_value()

    def _limit_error(self, message: str, depth: int) -> None:
        """QEMU's per-value limits: report (without a location), then drop the value."""
        self._out.append(JSONError(message))
        self._stack.clear()
        self._tokens = self._size = 0
        self._skip = max(depth, 0)

    def _reset_value(self) -> None:
        self._stack.clear()
        self._skip = 0
        self._tokens = self._size = 0

    # --- parser ------------------------------------------------------------------------------
    def _token(self, kind: int, start: int, text: bytes | None) -> None:
        """Feed one token to the push parser (or to the dropper of a broken value)."""
        if self._skip:
            if kind in (_LCURLY, _LSQUARE):
                self._skip += 1
            elif kind in (_RCURLY, _RSQUARE):
                self._skip -= 1
            return
        self._tokens += 1
        self._size += 1 if text is None else len(text)
        if self._size > MAX_TOKEN_SIZE or self._tokens > MAX_TOKEN_COUNT:
            what = "size" if self._size > MAX_TOKEN_SIZE else "count"
            self._limit_error(f"JSON token {what} limit exceeded", self._depth_after(kind, None))
            return
        before = len(self._stack)
        try:
            self._parse(kind, start, text)
        except _Limit as err:
            self._limit_error(err.message, self._depth_after(kind, before))
        except _SyntaxError as err:
            # Drop the rest of the broken value: until its brackets balance.
            where = self._location(self._base + err.offset)
            message = f"{where}: JSON parse error, {err.message}"
            self._limit_error(message, self._depth_after(kind, before))

    def _depth_after(self, kind: int, before: int | None) -> int:
        """Open brackets counting the offending token, as QEMU's streamer counts them."""
        depth = len(self._stack) if before is None else before
        return depth + (kind in (_LCURLY, _LSQUARE)) - (kind in (_RCURLY, _RSQUARE))

    def _parse(self, kind: int, start: int, text: bytes | None) -> None:
        stack = self._stack
        if not stack:
            self._begin_value(kind, start, text)
            return
        entry = stack[-1]
        state = entry[1]
        if state == _AFTER_LCURLY and kind == _RCURLY:
            self._complete(stack.pop()[0], start)
            return
        if state in (_AFTER_LCURLY, _BEFORE_KEY):
            if kind != _STRING:
                raise _SyntaxError("expecting key", start)
            entry[2] = self._string(text, start)
            entry[1] = _END_OF_KEY
        elif state == _END_OF_KEY:
            if kind != _COLON:
                raise _SyntaxError("expecting ':'", start)
            entry[1] = _BEFORE_VALUE
        elif state == _AFTER_LSQUARE and kind == _RSQUARE:
            self._complete(stack.pop()[0], start)
        elif state in (_AFTER_LSQUARE, _BEFORE_VALUE):
            entry[1] = _BEFORE_VALUE
            self._begin_value(kind, start, text)
        else:  # _END_OF_VALUE
            self._end_of_value(entry, kind, start)

    def _end_of_value(self, entry: list[Any], kind: int, start: int) -> None:
        is_list = isinstance(entry[0], list)
        if kind == _COMMA:
            entry[1] = _BEFORE_VALUE if is_list else _BEFORE_KEY
        elif kind == (_RSQUARE if is_list else _RCURLY):
            self._complete(self._stack.pop()[0], start)
        else:
            raise _SyntaxError("expected ',' or ']'" if is_list else "expected ',' or '}'", start)

    def _begin_value(self, kind: int, start: int, text: bytes | None) -> None:
        if kind == _LCURLY or kind == _LSQUARE:
            if len(self._stack) >= MAX_NESTING:
                raise _Limit("JSON nesting depth limit exceeded")
            if kind == _LCURLY:
                self._stack.append([{}, _AFTER_LCURLY, None])
            else:
                self._stack.append([[], _AFTER_LSQUARE, None])
            return
        if kind == _STRING:
            value: Any = self._string(text, start)
        elif kind == _NUMBER_T:
            value = _number(text)  # type: ignore[arg-type]
        elif kind == _KEYWORD_T:
            if text == b"true":
                value = True
            elif text == b"false":
                value = False
            elif text == b"null":
                value = None
            else:
                raise _SyntaxError(f"invalid keyword '{text.decode()}'", start)  # type: ignore[union-attr]
        else:
            raise _SyntaxError("expecting value", start)
        self._complete(value, start)

    def _string(self, text: bytes | None, start: int) -> str:
        try:
            return decode_string(text)  # type: ignore[arg-type]
        except ValueError as err:
            raise _SyntaxError(str(err), start) from err

    def _complete(self, value: Any, start: int) -> None:
        """A value is complete: return it at top level or store it in its container."""
        stack = self._stack
        if not stack:
            self._out.append(value)
            self._tokens = self._size = 0
            return
        entry = stack[-1]
        container = entry[0]
        if isinstance(container, dict):
            key = entry[2]
            if key in container:
                raise _SyntaxError("duplicate key", start)
            container[key] = value
            entry[2] = None
        else:
            container.append(value)
        entry[1] = _END_OF_VALUE


class _Limit(_SyntaxError):
    """A QEMU limit (reported without a location)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, -1)
