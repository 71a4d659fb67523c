"""The client's side of the NBD wire, written out by hand for the tests: options to send
and a parser for the option replies the server sends back. Kept apart from qsd-py's own
engines so a test that uses it checks the server against the protocol, not against itself."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def name_payload(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    """The payload of NBD_OPT_INFO/GO: the name, then the information requests."""
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
    return body + b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)


@dataclass
class OptReply:
    opt: int
    rep: int
    payload: bytes


def parse_replies(data: bytes) -> list[OptReply]:
    """Every option reply in ``data``, which must hold whole replies only."""
    replies = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPT_REPLY_MAGIC, f"bad reply magic at {pos}: {magic:#x}"
        pos += 20
        replies.append(OptReply(opt, rep, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return replies


def request(cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def ext_request(cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# --- a minimal blocking client, for the fuzzer and the protocol corner cases -----------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def read_option_reply(sock: socket.socket) -> OptReply:
    magic, opt, rep, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    assert magic == OPT_REPLY_MAGIC
    return OptReply(opt, rep, recv_exactly(sock, length))


def open_export(
    path: str,
    export: str,
    structured: bool = False,
    timeout: float = 10,
    extended: bool = False,
    contexts: tuple[bytes, ...] = (),
) -> tuple[socket.socket, int]:
    """Connect, negotiate (fixed newstyle, no zeroes, optionally structured replies or
    extended headers, and meta contexts) and NBD_OPT_GO to ``export``; returns the socket
    and the export's size."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    greeting = recv_exactly(sock, 18)
    assert greeting[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3))
    if structured or extended:
        sock.sendall(option(11 if extended else 8))
        assert read_option_reply(sock).rep == 1
    if contexts:
        sock.sendall(option(10, meta_payload(export.encode(), list(contexts))))
        while read_option_reply(sock).rep != 1:
            pass
    sock.sendall(option(7, name_payload(export.encode())))
    size = -1
    while True:
        reply = read_option_reply(sock)
        if reply.rep == 3 and struct.unpack(">H", reply.payload[:2])[0] == 0:
            size = struct.unpack(">Q", reply.payload[2:10])[0]
        elif reply.rep == 1:
            return sock, size
        elif reply.rep != 3:
            raise AssertionError(f"GO failed: {reply}")


def read_simple_reply(sock: socket.socket) -> tuple[int, int]:
    """(error, cookie) of a simple reply."""
    magic, error, cookie = struct.unpack(">IIQ", recv_exactly(sock, 16))
    assert magic == 0x67446698, hex(magic)
    return error, cookie


def read_ext_chunk(sock: socket.socket) -> tuple[int, int, int, int, bytes]:
    """(flags, type, cookie, offset, payload) of an extended reply chunk."""
    magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQQ", recv_exactly(sock, 32))
    assert magic == 0x6E8A278C, hex(magic)
    return flags, kind, cookie, offset, recv_exactly(sock, length)


def read_chunk(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """(flags, type, cookie, payload) of a structured reply chunk."""
    magic, flags, kind, cookie, length = struct.unpack(">IHHQI", recv_exactly(sock, 20))
    assert magic == 0x668E33EF, hex(magic)
    return flags, kind, cookie, recv_exactly(sock, length)
