"""``type=nbd`` block exports: one export of the daemon's NBD server.

The export is what a client names in NBD_OPT_GO: it carries the size and transmission flags
QEMU announces for the node, the meta contexts it offers, and the connections that chose it.
Deleting it hangs up on those connections, as QEMU does; their requests still running keep
the export (shutting down) and its node until they finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qsd_py.block.node import SECTOR_SIZE
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError
from qsd_py.export.base import BlockExport
from qsd_py.export.nbd.bitmaps import DirtyBitmapSource, find_bitmaps
from qsd_py.nbd.constants import MAX_BUFFER, MAX_STRING, TransmissionFlag

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon
    from qsd_py.export.nbd.connection import Connection
    from qsd_py.export.nbd.server import NbdServer

#: What every QEMU NBD export announces.
BASE_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_CACHE
)
WRITE_FLAGS = (
    TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)
#: The node's sharing once the export exists: the size clients were told must hold.
NBD_SHARED = PERM_ALL & ~Perm.RESIZE


def transmission_flags(writable: bool, max_connections: int) -> int:
    """QEMU 11.1's flags: multi-conn unless the server takes a single connection."""
    flags = BASE_FLAGS
    if max_connections != 1:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    flags |= WRITE_FLAGS if writable else TransmissionFlag.READ_ONLY
    return int(flags)


class NbdExport(BlockExport):
    """One export of the NBD server (the engine's :class:`~qsd_py.nbd.server.ExportView`).

    The node is taken sharing everything, as QEMU's generic export code does, and resize
    is unshared only after the NBD checks (so "NBD server not running" wins over a resize
    conflict, as in QEMU)."""

    type = "nbd"
    label = "NBD"
    resize = False

    def __init__(self, daemon: Daemon, opts: dict[str, Any], node: BlockNode) -> None:
        super().__init__(daemon, opts, node)
        self.name: str = opts.get("name", opts["node-name"])
        self.description: str | None = opts.get("description")
        self.allocation_depth = bool(opts.get("allocation-depth", False))
        self.bitmaps: list[str] = []
        self.bitmap_sources: list[DirtyBitmapSource] = []
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.max_block = MAX_BUFFER
        self.clients: set[Connection] = set()
        self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        self.server: NbdServer | None = None
        self.paused = [0]  # drained sections now: no connection starts a request meanwhile

    # --- start ------------------------------------------------------------------------------
    async def setup(self) -> None:
        """QEMU's NBD checks, in its order, then the export joins the server's list."""
        server = self.daemon.nbd_server
        if server is None:
            raise QMPError("NBD server not running")
        if len(self.name.encode()) > MAX_STRING:
            raise QMPError(f"export name '{self.name}' too long")
        if self.description is not None and len(self.description.encode()) > MAX_STRING:
            raise QMPError(f"description '{self.description}' too long")
        if server.find(self.name) is not None:
            raise QMPError(f"NBD server already has export named '{self.name}'")
        self.node.add_user(
            self.id,
            self.writable,
            self.resize,
            shared=NBD_SHARED,
            quiesce=self.quiesce,
            repoint=self.repoint,
        )
        self.size = self.node.length() // SECTOR_SIZE * SECTOR_SIZE
        specs = self.opts.get("bitmaps", [])
        found = find_bitmaps(self.daemon.graph, self.node, specs, self.writable)
        for name, source in found:
            self.bitmaps.append(name)
            self.bitmap_sources.append(source)
        for _, source in found:  # all checked: now they are this export's
            source.busy = True
        self.flags = transmission_flags(self.writable, server.max_connections)
        limits = self.node.limits()
        self.min_block = limits.get("request-alignment", 1)
        self.max_block = limits.get("max-transfer") or MAX_BUFFER
        if self.iothreads:
            self.loop = self.iothreads[0].loop
        server.add_export(self)
        self.server = server
        self.loop.call_soon_threadsafe(self._warm_up)

    def _warm_up(self) -> None:
        """On the export's loop, once started: load the io_uring backend and make the loop's
        ring, which the first connection's fast plan takes for a file (~25 ms of imports and
        setup that the first client would wait for; a fresh image's whole nbdcopy read takes
        less than that with QEMU)."""
        from qsd_py.block.drivers.file import FileNode

        if self.shutting_down or not any(
            isinstance(n, FileNode) for n in (self.node, *self.node.descendants())
        ):
            return
        from qsd_py.block import aio

        backend = aio.get_backend("io_uring")
        ring = getattr(backend, "ring", None)
        if ring is not None:
            ring()

    def repoint(self, node: BlockNode) -> None:
        """A job pivoted (mirror's completion, the graph drained): serve ``node`` from now
        on, in every connection too (their fast plans are made anew for it)."""
        self.node = node
        for conn in list(self.clients):
            if conn.loop is self.daemon_loop():
                conn.repoint(node)
            else:
                conn.loop.call_soon_threadsafe(conn.repoint, node)

    def quiesce_hook(self) -> Any:
        return self.quiesce

    async def quiesce(self) -> Callable[[], None]:
        """A drain (``BlockNode.drained``): no connection starts a request, and those being
        served end, fast transfers included (they write around the node's in-flight count:
        a transaction's bitmaps and a backup's point in time must see them finished, as a
        drain in QEMU waits for every request). Returns what lets the connections go on."""
        self.paused[0] += 1
        main = asyncio.get_running_loop()
        for conn in list(self.clients):
            if conn.loop is main:
                await conn.wait_idle()
            else:
                done = asyncio.run_coroutine_threadsafe(conn.wait_idle(), conn.loop)
                await asyncio.wrap_future(done)
        return self._unpause

    def _unpause(self) -> None:
        self.paused[0] -= 1
        if self.paused[0]:
            return
        for conn in list(self.clients):
            conn.loop.call_soon_threadsafe(conn.resume)

    def daemon_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # --- stop -------------------------------------------------------------------------------
    def in_use(self) -> bool:
        """A connected client holds the export, as in QEMU: ``safe`` deletion waits for it."""
        return bool(self.clients)

    async def stop(self, mode: str) -> Awaitable[None] | None:
        """No new client can choose the export, and the connected ones are hung up on.
        Their requests still running keep the export and its node until they finish: then
        it is gone, after the command's return, as in QEMU."""
        if mode == "safe" and self.in_use():
            raise QMPError(f"export '{self.id}' still in use")
        clients = self._hang_up()
        if not clients:
            self._give_back()
            return None
        return self._give_back_after(clients)

    async def teardown(self, abort: bool) -> None:
        """A failed start: nothing connected yet."""
        self._hang_up()
        self._release_bitmaps()

    def _release_bitmaps(self) -> None:
        for source in self.bitmap_sources:
            source.busy = False
        self.bitmap_sources = []

    def _hang_up(self) -> list[Connection]:
        if self.server is not None:
            self.server.remove_export(self)
            self.server = None
        clients = list(self.clients)
        for client in clients:
            client.close()
        return clients

    async def _give_back_after(self, clients: list[Connection]) -> None:
        try:
            await asyncio.gather(*(client.closed for client in clients))
        finally:
            self._give_back()

    def _give_back(self) -> None:
        self._release_bitmaps()
        self.release_node()
        self.release_iothreads()
