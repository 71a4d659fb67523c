"""Encrypted I/O over a node: :class:`EncryptedIO` reads and decrypts, encrypts and writes
whole 512-byte sectors of a node, each sector's IV from ``(offset - base) / 512`` (the
``luks`` driver: ``base`` the payload's start, so the guest sector; qcow2: ``base`` 0, the
host sector, as QEMU's qcow2 numbers LUKS sectors). A partial sector is read, decrypted,
patched and written back, with the writes over the same sectors kept in order.

It stands in for the node as qcow2's ``data_node``: what it does not override (truncate,
discard, flush, length) goes to the node itself; it has no fast target, so no export's
workers bypass it.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from typing import TYPE_CHECKING, Any

from qsd_py.block.crypto import luks
from qsd_py.block.crypto.cipher import SECTOR_SIZE, SectorCipher
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.fast_map import FastTarget
    from qsd_py.block.node import BlockNode, Buffer

ZERO_CHUNK = 1 << 20


class SectorOrder:
    """Writes whose sector ranges overlap run one after another (a read-modify-write of a
    partial sector must not interleave with another write of that sector). Nodes are called
    from the main loop and iothreads' loops at once, so the ranges are guarded by a thread
    lock and a waiter is woken on its own loop (as :class:`~qsd_py.block.lock.CrossLoopLock`)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy: list[tuple[int, int]] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    async def enter(self, start: int, end: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._mutex:
                if not any(s < end and start < e for s, e in self._busy):
                    self._busy.append((start, end))
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    async def leave(self, start: int, end: int) -> None:
        with self._mutex:
            self._busy.remove((start, end))
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:  # each checks again for its own range
            loop.call_soon_threadsafe(_wake, fut)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class EncryptedIO:
    """``node``'s bytes from ``base`` on, as plaintext."""

    def __init__(self, node: BlockNode, cipher: SectorCipher, base: int = 0) -> None:
        self.node = node
        self.cipher = cipher
        self.base = base
        self._order = SectorOrder()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)

    def fast_target(self) -> FastTarget | None:
        return None

    def _sectors(self, offset: int, length: int) -> tuple[int, int]:
        rel = offset - self.base
        return rel // SECTOR_SIZE, -(-(rel + length) // SECTOR_SIZE)

    async def _read_sectors(self, start: int, end: int) -> bytes:
        raw = bytearray((end - start) * SECTOR_SIZE)
        at = self.base + start * SECTOR_SIZE
        n = max(0, min(len(raw), self.node.length() - at))  # past the end: zeroes
        if n:
            await self.node.read(at, memoryview(raw)[:n])
        return self.cipher.decrypt(raw, start)

    async def read(self, offset: int, buf: memoryview) -> None:
        if not len(buf):
            return
        start, end = self._sectors(offset, len(buf))
        plain = await self._read_sectors(start, end)
        skip = offset - self.base - start * SECTOR_SIZE
        buf[:] = plain[skip : skip + len(buf)]

    async def write(self, offset: int, data: Buffer) -> None:
        if not len(data):
            return
        start, end = self._sectors(offset, len(data))
        await self._order.enter(start, end)
        try:
            skip = offset - self.base - start * SECTOR_SIZE
            if skip or len(data) % SECTOR_SIZE:
                plain = bytearray(await self._read_sectors(start, end))
                plain[skip : skip + len(data)] = data
                data = plain
            await self.node.write(self.base + start * SECTOR_SIZE, self.cipher.encrypt(data, start))
        finally:
            await self._order.leave(start, end)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, no_fallback: bool = False
    ) -> None:
        """Encrypted zeroes are not zeroes on disk: written as data (QEMU's crypto layer
        has no write-zeroes either), never with ``no_fallback``."""
        if no_fallback:
            raise OSError(errno.ENOTSUP, "zeroes would be written as data")
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            await self.write(offset, bytes(n))
            offset += n


async def open_luks(
    node: BlockNode, secret_id: str | None, read: Any, prefix: str = "", detached: bool = False
) -> tuple[luks.LuksHeader, SectorCipher]:
    """Parse the header ``read(offset, length)`` gives and unlock it with the secret's
    passphrase: the header and the payload's cipher (QEMU's texts; ``prefix`` names the
    option for qcow2's ``encrypt.``)."""
    if secret_id is None:
        raise QMPError(f"Parameter '{prefix}key-secret' is required for cipher")
    header_bytes = await read(0, luks.HEADER_SIZE)
    try:
        header = luks.parse_header(header_bytes, detached)
        luks.check_cipher(header)
    except luks.LuksError as err:
        raise QMPError(str(err)) from err
    if node.graph.objects is None:
        raise QMPError(f"No secret with id '{secret_id}'")
    password = node.graph.objects.secret(secret_id).as_utf8().encode("utf-8")
    slots: dict[int, bytes] = {}
    for slot in header.slots:
        if slot.active == luks.SLOT_ACTIVE:
            off = slot.key_offset * SECTOR_SIZE
            slots[off] = await read(off, header.slot_bytes())
    loop = asyncio.get_running_loop()
    try:
        # PBKDF2 runs for as long as the image's creator chose (2 s by default): off the loop.
        master = await loop.run_in_executor(
            None, luks.unlock, header, password, lambda off, _n: slots[off]
        )
    except luks.LuksError as err:
        raise QMPError(str(err)) from err
    return header, luks.payload_cipher(header, master)
