"""``type=nbd`` block exports: one export of the daemon's NBD server.

The export is what a client names in NBD_OPT_GO: it carries the size and transmission flags
QEMU announces for the node, the meta contexts it offers, and the connections that chose it.
Deleting it hangs up on those connections, as QEMU does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from qsd_py.block.node import SECTOR_SIZE
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.errors import QMPError
from qsd_py.export.nbd.bitmaps import DirtyBitmapSource, find_bitmaps
from qsd_py.export.registry import BlockExport
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


def transmission_flags(writable: bool, max_connections: int) -> int:
    """QEMU 11.1's flags: multi-conn unless the server takes a single connection."""
    flags = BASE_FLAGS
    if max_connections != 1:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    flags |= WRITE_FLAGS if writable else TransmissionFlag.READ_ONLY
    return int(flags)


class NbdExport(BlockExport):
    """One export of the NBD server (the engine's :class:`~qsd_py.nbd.server.ExportView`)."""

    type = "nbd"

    def __init__(self, daemon: Daemon, opts: dict[str, Any], node: BlockNode) -> None:
        super().__init__(daemon, opts, node)
        self.name: str = opts.get("name", opts["node-name"])
        self.description: str | None = opts.get("description")
        self.writable = bool(opts.get("writable", False))
        self.writethrough = bool(opts.get("writethrough", False))
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
        self._iothread: str | None = None
        self._user: NodeUser | None = None

    # --- start ------------------------------------------------------------------------------
    async def start(self) -> None:
        """QEMU's order: iothread and node permissions, then the NBD checks."""
        try:
            self._take_iothread()
            self._add_user(PERM_ALL)
            server = self.daemon.nbd_server
            if server is None:
                raise QMPError("NBD server not running")
            if len(self.name.encode()) > MAX_STRING:
                raise QMPError(f"export name '{self.name}' too long")
            if self.description is not None and len(self.description.encode()) > MAX_STRING:
                raise QMPError(f"description '{self.description}' too long")
            if server.find(self.name) is not None:
                raise QMPError(f"NBD server already has export named '{self.name}'")
            self._add_user(PERM_ALL & ~Perm.RESIZE)  # the size clients were told must hold
            self.size = self.node.length() // SECTOR_SIZE * SECTOR_SIZE
            for name, source in find_bitmaps(
                self.daemon.graph, self.node, self.opts.get("bitmaps", [])
            ):
                self.bitmaps.append(name)
                self.bitmap_sources.append(source)
            self.flags = transmission_flags(self.writable, server.max_connections)
            limits = self.node.limits()
            self.min_block = limits.get("request-alignment", 1)
            self.max_block = limits.get("max-transfer") or MAX_BUFFER
            server.add_export(self)
            self.server = server
        except BaseException:
            self._release()
            raise

    def _take_iothread(self) -> None:
        """Connections run on the export's iothread once they chose it (one iothread: a
        connection's requests are served in order of arrival on one loop)."""
        spec = self.opts.get("iothread")
        if spec is None:
            return
        if not isinstance(spec, str):  # QEMU's checks of a list, in its order
            if self.opts.get("fixed-iothread", False):
                raise QMPError("Cannot use fixed-iothread for a multi-threaded export")
            if not spec:
                raise QMPError("The set of I/O threads must not be empty")
            for name in spec:
                self.daemon.objects.iothread(name)
            raise QMPError("NBD export does not support multi-threading")
        thread = self.daemon.objects.hold(spec)
        self._iothread = spec
        self.loop = thread.loop

    def _add_user(self, shared: Perm) -> None:
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else Perm(0))
        desc = f"an unnamed block device (uses node '{self.node.node_name}' as 'root' child)"
        user = NodeUser(self.id, perm, shared, desc)
        self.node.set_user(user)
        self._user = user

    def _release(self) -> None:
        if self._user is not None:
            self.node.remove_user(self.id)
            self._user = None
        if self._iothread is not None:
            self.daemon.objects.release(self._iothread)
            self._iothread = None

    # --- stop -------------------------------------------------------------------------------
    def in_use(self) -> bool:
        """A connected client holds the export, as in QEMU: ``safe`` deletion waits for it."""
        return bool(self.clients)

    async def stop(self, mode: str) -> Awaitable[None] | None:
        """No new client can choose the export, and the connected ones are hung up on.
        Their requests still running keep the export (and its node) until they finish,
        as in QEMU: then it is gone, after the command's return."""
        if mode == "safe" and self.in_use():
            raise QMPError(f"export '{self.id}' still in use")
        if self.server is not None:
            self.server.remove_export(self)
            self.server = None
        clients = list(self.clients)
        for client in clients:
            client.close()
        if not clients:
            self._release()
            return None
        return self._release_when_closed(clients)

    async def _release_when_closed(self, clients: list[Connection]) -> None:
        try:
            await asyncio.gather(*(client.closed for client in clients))
        finally:
            self._release()
