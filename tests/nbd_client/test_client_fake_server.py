"""A fake NBD server written here: it answers a batch of reads in reverse order (each read
gets its own data), or negotiates properly and then answers with garbage (the nbd node
fails its requests with clear errors, never hangs and never crashes)."""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError
from qsd_py.nbd import wire
from qsd_py.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)

SIZE = 1 << 20
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH

# What the fake server answers to a request: bytes built from the request's cookie, offset
# and length, or None to hang up.
Answer = Callable[[int, int, int], bytes | None]


def chunk(cookie: int, kind: int, payload: bytes, flags: int = REPLY_FLAG_DONE) -> bytes:
    header = wire.STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
    return header + payload


def reply(opt: int, rep: int, payload: bytes = b"") -> bytes:
    return wire.OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A correct fixed newstyle handshake with structured replies and base:allocation."""
    writer.write(wire.SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, 3))
    await reader.readexactly(4)
    while True:
        _, opt, length = wire.OPTION.unpack(await reader.readexactly(16))
        await reader.readexactly(length)
        if opt == Opt.STRUCTURED_REPLY:
            writer.write(reply(opt, Rep.ACK))
        elif opt == Opt.SET_META_CONTEXT:
            ctx = reply(opt, Rep.META_CONTEXT, b"\0\0\0\1base:allocation")
            writer.write(ctx + reply(opt, Rep.ACK))
        elif opt == Opt.GO:
            info = wire.INFO_EXPORT.pack(Info.EXPORT, SIZE, FLAGS)
            writer.write(reply(opt, Rep.INFO, info) + reply(opt, Rep.ACK))
            return
        else:
            writer.write(reply(opt, Rep.ERR_UNSUP))


class FakeServer:
    """Serves one UNIX socket; ``batch`` requests are collected before any is answered,
    then answered last first."""

    def __init__(self, path: Path, answer: Answer, handshake: bool = True, batch: int = 1) -> None:
        self.path = path
        self.answer = answer
        self.handshake = handshake
        self.batch = batch
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if not self.handshake:
                writer.write(self.answer(0, 0, 0) or b"")
                await writer.drain()
                return
            await negotiate(reader, writer)
            while True:
                requests = []
                for _ in range(self.batch):
                    header = await reader.readexactly(wire.REQUEST.size)
                    _, _, cmd, cookie, offset, length = wire.REQUEST.unpack(header)
                    if cmd == 1:
                        await reader.readexactly(length)
                    requests.append((cookie, offset, length))
                for cookie, offset, length in reversed(requests):
                    out = self.answer(cookie, offset, length)
                    if out is None:
                        return
                    writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Callable[..., FakeServer]]:
    servers: list[asyncio.AbstractServer] = []

    async def start(answer: Answer, handshake: bool = True, batch: int = 1) -> FakeServer:
        fake = FakeServer(tmp_path / f"fake{len(servers)}.sock", answer, handshake, batch)
        servers.append(await asyncio.start_unix_server(fake.serve, str(fake.path)))
        return fake

    try:
        yield start
    finally:
        for server in servers:
            server.close()


def opts(fake: FakeServer, **extra) -> dict:
    return {"driver": "nbd", "node-name": "n0", "server": {"type": "unix", "path": str(fake.path)},
            **extra}  # fmt: skip


def content(offset: int, length: int) -> bytes:
    """What the fake disk holds: every 8 bytes say their own offset."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", pos) for pos in range(first, offset + length, 8))
    return words[offset - first : offset - first + length]


def split_data(cookie: int, offset: int, length: int) -> bytes:
    """A read answered as two data chunks, the second half first."""
    half = length // 2
    second = chunk(cookie, Chunk.OFFSET_DATA, struct.pack(">Q", offset + half)
                   + content(offset + half, length - half), flags=0)  # fmt: skip
    first = chunk(cookie, Chunk.OFFSET_DATA, struct.pack(">Q", offset) + content(offset, half))
    return second + first


async def test_replies_in_reverse_order_reach_their_requests(fake) -> None:
    server = await fake(split_data, batch=16)
    graph = BlockGraph()
    try:
        node = await graph.add(opts(server))
        reads = [(i * 10000 + i, 1000 + i * 100) for i in range(16)]
        bufs = [bytearray(n) for _, n in reads]
        await asyncio.wait_for(
            asyncio.gather(
                *(node.read(o, memoryview(b)) for (o, _), b in zip(reads, bufs, strict=True))
            ),
            10,
        )
        assert bufs == [content(o, n) for o, n in reads]
    finally:
        await graph.close_all()


GARBAGE: dict[str, Answer] = {
    "bad-magic": lambda c, o, n: b"\xde\xad\xbe\xef" * 8,
    "unknown-cookie": lambda c, o, n: chunk(c + 1000, Chunk.NONE, b""),
    "data-outside-request": lambda c, o, n: chunk(
        c, Chunk.OFFSET_DATA, struct.pack(">Q", o + n) + b"x"
    ),  # fmt: skip
    "huge-error-chunk": lambda c, o, n: (
        chunk(c, Chunk.ERROR, b"\0" * 6)[:16] + struct.pack(">I", 1 << 30)
    ),
    "unknown-chunk-type": lambda c, o, n: chunk(c, 77, b"????"),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_garbage_reply_fails_requests_and_the_node_stays_failed(fake, kind: str) -> None:
    server = await fake(GARBAGE[kind])
    graph = BlockGraph()
    try:
        node = await graph.add(opts(server, **{"reconnect-delay": 5}))
        with pytest.raises(OSError) as err:
            await asyncio.wait_for(node.read(0, memoryview(bytearray(4096))), 5)
        assert err.value.errno == errno.EIO
        assert "protocol error" in str(err.value)
        # No reconnecting to a server that broke the protocol: failures are immediate.
        with pytest.raises(OSError):
            await asyncio.wait_for(node.write(0, b"x"), 1)
        assert server.connections == 1
    finally:
        await graph.close_all()


async def test_reply_cut_short_by_the_server_closing(fake) -> None:
    server = await fake(lambda c, o, n: None)
    graph = BlockGraph()
    try:
        node = await graph.add(opts(server))
        with pytest.raises(OSError) as err:
            await asyncio.wait_for(node.read(0, memoryview(bytearray(4096))), 5)
        assert err.value.errno == errno.EIO
    finally:
        await graph.close_all()


@pytest.mark.parametrize(
    ("greeting", "text"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", "Bad initial magic received: 0x485454502f312e31"),
        (
            b"NBDMAG",
            "Failed to read initial magic: Unexpected end-of-file before all data were read",
        ),  # fmt: skip
        (struct.pack(">QQ", NBDMAGIC, 42), "Bad server magic received: 0x2a"),
    ],
)
async def test_garbage_handshake_fails_blockdev_add(fake, greeting: bytes, text: str) -> None:
    server = await fake(lambda c, o, n: greeting, handshake=False)
    graph = BlockGraph()
    try:
        with pytest.raises(QMPError) as err:
            await asyncio.wait_for(graph.add(opts(server)), 5)
        assert str(err.value) == text
        assert len(graph) == 0
    finally:
        await graph.close_all()
