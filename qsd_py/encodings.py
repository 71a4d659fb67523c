"""QEMU's rules for the text encodings its commands take and give: base64 as GLib decodes
it after QEMU's character check, and the modified UTF-8 of its JSON strings. The chardev
commands (ringbuf-read/-write) and the secret objects use them."""

from __future__ import annotations

import binascii
import re

from qsd_py.errors import QMPError

# QEMU checks base64 input against this set before decoding (newlines are allowed).
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=\n]*")
_BASE64_RANK = re.compile(r"[^A-Za-z0-9+/=]")


def encode_utf8(text: str) -> bytes:
    """The bytes QEMU's JSON parser makes of a string: UTF-8, with U+0000 as C0 80."""
    return text.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


def decode_base64(text: str) -> bytes:
    """QEMU's lenient base64: only the alphabet, ``=`` and newlines are allowed; then every
    full group of four gives its bytes (fewer for ``=`` in its last two places, wherever
    the group is) and an incomplete group at the end is dropped.  (A NUL reaches QEMU as
    the bytes C0 80, so it is an invalid character too.)"""
    if not _BASE64_CHARS.fullmatch(text):
        raise QMPError("Base64 data contains invalid characters")
    chars = _BASE64_RANK.sub("", text)
    out = bytearray()
    for start in range(0, len(chars) - len(chars) % 4, 4):
        group = chars[start : start + 4]
        raw = binascii.a2b_base64(group.replace("=", "A").encode())
        out += raw[:1]
        if group[2] != "=":
            out += raw[1:2]
        if group[3] != "=":
            out += raw[2:3]
    return bytes(out)


def _codepoint(data: bytes, pos: int) -> tuple[int, int]:
    """One character of QEMU's modified UTF-8 at ``pos``: (code point or -1, next position)."""
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos + 1
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp, pos = byte & (mask - 1), pos + 1
    for _ in range(1, length):
        if pos >= len(data) or data[pos] & 0xC0 != 0x80:
            return -1, pos
        cp = cp << 6 | data[pos] & 0x3F
        pos += 1
    minimum = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return -1, pos
    if 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE:
        return -1, pos
    if cp < minimum and not (cp == 0 and length == 2):
        return -1, pos
    return cp, pos


def decode_utf8(data: bytes) -> str:
    """A ringbuf's bytes as QEMU returns them in utf8 format: a C string (cut at the first
    NUL byte), each invalid sequence replaced by U+FFFD."""
    data = data.split(b"\x00", 1)[0]
    out, pos = [], 0
    while pos < len(data):
        cp, pos = _codepoint(data, pos)
        out.append("\ufffd" if cp < 0 else chr(cp))
    return "".join(out)
