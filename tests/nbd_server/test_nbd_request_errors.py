"""A request whose handling raises something unexpected (a driver's bug, a node closed under
it) gets an error reply, EIO as QEMU maps an unexpected error, and the connection serves the
next requests: the client is never left waiting. The fault is a test-only driver bug, put
into one node of an in-process daemon (a blkdebug node: no fast path, every request reaches
its coroutines)."""

from __future__ import annotations

import asyncio
import errno
import random
from pathlib import Path
from typing import Any

import pytest
from nbd_bytes import open_export, read_chunk, read_simple_reply, recv_exactly, request

from qsd_py.daemon import Daemon

SIZE = 1 << 20
CMD_READ, CMD_WRITE, CMD_FLUSH = 0, 1, 3
CHUNK_ERROR = 0x8001


class DriverBug(RuntimeError):
    """What the node raises for requests at offset 0."""


async def reply(daemon: Daemon, name: str, args: dict[str, Any]) -> Any:
    return await daemon.execute(name, args)


def _buggy(method: Any) -> Any:
    async def call(offset: int, *args: Any, **kwargs: Any) -> Any:
        if offset == 0:
            raise DriverBug("a driver bug (test)")
        return await method(offset, *args, **kwargs)

    return call


async def _daemon(tmp_path: Path, iothread: bool) -> Any:
    (tmp_path / "r.img").write_bytes(random.Random(1).randbytes(SIZE))
    daemon = Daemon()
    file = {"driver": "file", "node-name": "f0", "filename": str(tmp_path / "r.img")}
    assert await reply(daemon, "blockdev-add", file) == {}
    debug = {"driver": "blkdebug", "node-name": "b0", "image": "f0"}
    assert await reply(daemon, "blockdev-add", debug) == {}
    node = daemon.graph.lookup("b0")
    node.do_read = _buggy(node.do_read)
    node.do_write = _buggy(node.do_write)
    addr = {"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}}
    assert await reply(daemon, "nbd-server-start", {"addr": addr}) == {}
    export = {"type": "nbd", "id": "e0", "name": "e0", "node-name": "b0", "writable": True}
    if iothread:
        assert await reply(daemon, "object-add", {"qom-type": "iothread", "id": "io0"}) == {}
        export["iothread"] = "io0"
    assert await reply(daemon, "block-export-add", export) == {}
    return daemon


def _simple_client(path: Path, image: bytes) -> list[tuple[str, int]]:
    """READ and WRITE that raise, each followed by one that works, then a FLUSH: what each
    reply said (the data of a good read checked)."""
    sock, _ = open_export(str(path), "e0", timeout=10)
    got = []
    try:
        for cookie, (cmd, offset) in enumerate(
            [(CMD_READ, 0), (CMD_READ, 4096), (CMD_WRITE, 0), (CMD_WRITE, 8192), (CMD_FLUSH, 0)],
            start=1,
        ):
            length = 0 if cmd == CMD_FLUSH else 4096
            sock.sendall(request(cmd, offset, length, cookie))
            if cmd == CMD_WRITE:
                sock.sendall(image[offset : offset + 4096])
            error, back = read_simple_reply(sock)
            assert back == cookie
            if cmd == CMD_READ and not error:
                assert recv_exactly(sock, 4096) == image[offset : offset + 4096]
            got.append((f"{cmd}@{offset}", error))
    finally:
        sock.close()
    return got


def _structured_read(path: Path) -> tuple[int, int, int, int]:
    """A structured READ that raises: one final error chunk (flags, type, cookie, errno)."""
    sock, _ = open_export(str(path), "e0", structured=True, timeout=10)
    try:
        sock.sendall(request(CMD_READ, 0, 4096, 7, flags=4))  # DF: one chunk, not sparse
        flags, kind, cookie, payload = read_chunk(sock)
    finally:
        sock.close()
    return flags, kind, cookie, int.from_bytes(payload[:4], "big")


@pytest.mark.parametrize("iothread", [False, True])
async def test_a_request_that_raises_gets_eio_and_the_connection_goes_on(
    tmp_path: Path, iothread: bool
) -> None:
    daemon = await _daemon(tmp_path, iothread)
    image = (tmp_path / "r.img").read_bytes()
    try:
        got = await asyncio.wait_for(
            asyncio.to_thread(_simple_client, tmp_path / "nbd.sock", image), 20
        )
        structured = await asyncio.wait_for(
            asyncio.to_thread(_structured_read, tmp_path / "nbd.sock"), 20
        )
    finally:
        await daemon.close()
    assert got == [("0@0", errno.EIO), ("0@4096", 0), ("1@0", errno.EIO), ("1@8192", 0),
                   ("3@0", 0)]  # fmt: skip
    assert structured == (1, CHUNK_ERROR, 7, errno.EIO)
