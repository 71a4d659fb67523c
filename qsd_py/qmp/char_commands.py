"""QMP commands on chardevs: chardev-add/-change/-remove/-send-break, query-chardev,
query-chardev-backends, ringbuf-read/-write, with QEMU 11.1's texts and semantics."""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Any

from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError
from qsd_py.qmp.char_backends import BACKEND_NAMES, RingbufBackend

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon

# QEMU checks base64 input against this set before decoding (newlines are allowed).
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=\n]*")
_BASE64_RANK = re.compile(r"[^A-Za-z0-9+/=]")


@qmp_command("chardev-add")
async def chardev_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return await daemon.chardevs.add(args["id"], args["backend"])


@qmp_command("chardev-change")
async def chardev_change(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return await daemon.chardevs.change(args["id"], args["backend"])


@qmp_command("chardev-remove")
async def chardev_remove(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.chardevs.remove(args["id"])
    return {}


@qmp_command("chardev-send-break")
async def chardev_send_break(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    chardev = daemon.chardevs.find(args["id"])
    if chardev is None:
        raise QMPError(f"Chardev '{args['id']}' not found")
    chardev.send_break()
    return {}


@qmp_command("query-chardev")
async def query_chardev(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    """In creation order (see :mod:`qsd_py.qmp.char_registry`); keys in QEMU's order."""
    return [
        {"frontend-open": c.frontend_open, "filename": c.describe(), "label": c.id}
        for c in daemon.chardevs.all()
    ]


@qmp_command("query-chardev-backends")
async def query_chardev_backends(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in BACKEND_NAMES]


def _ringbuf(daemon: Daemon, device: str) -> RingbufBackend:
    chardev = daemon.chardevs.find(device)
    if chardev is None:
        raise QMPError(f"Device '{device}' not found")
    if not isinstance(chardev, RingbufBackend):
        raise QMPError(f"{device} is not a ringbuf device")
    return chardev


@qmp_command("ringbuf-write")
async def ringbuf_write(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    ring = _ringbuf(daemon, args["device"])
    if args.get("format") == "base64":
        ring.write(decode_base64(args["data"]))
    else:
        ring.write(encode_utf8(args["data"]))
    return {}


@qmp_command("ringbuf-read")
async def ringbuf_read(daemon: Daemon, args: dict[str, Any]) -> str:
    ring = _ringbuf(daemon, args["device"])
    if args["size"] <= 0:
        raise QMPError("size must be greater than zero")
    data = ring.read(args["size"])
    if args.get("format") == "base64":
        return base64.b64encode(data).decode("ascii")
    return decode_utf8(data)


# --- QEMU's encodings ---------------------------------------------------------------------
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
