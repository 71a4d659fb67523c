"""The daemon: the state that QMP commands, CLI options and exports share.

One :class:`Daemon` lives on the main asyncio loop. The QMP monitors call :meth:`execute`;
the command line calls the same path for ``--blockdev``, ``--export`` and ``--object``, so an
option and its QMP command cannot drift apart. Events go to every negotiated monitor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from qsd_py.block.graph import BlockGraph
from qsd_py.commands import HANDLERS, load_handlers
from qsd_py.errors import QMPError
from qsd_py.export.registry import ExportRegistry
from qsd_py.jobs.registry import JobRegistry
from qsd_py.objects.registry import ObjectRegistry
from qsd_py.qmp.char_registry import ChardevRegistry
from qsd_py.sockets import ON_COMMAND_LINE
from qsd_py.uring import close_loop_ring

if TYPE_CHECKING:
    from qsd_py.export.nbd.server import NbdServer
    from qsd_py.qapi.schema import QAPISchema

log = logging.getLogger("qsd_py")


class EventSink(Protocol):
    """What a monitor offers the daemon: a way to receive events."""

    def send_event(self, event: dict[str, Any]) -> None: ...


class Daemon:
    """Block graph, exports, objects and monitors of one qsd-py process."""

    def __init__(self) -> None:
        from qsd_py.qapi.schema import load_schema

        self.schema: QAPISchema = load_schema()
        self.graph = BlockGraph()
        self.graph.emit_event = self.emit_event
        self.exports = ExportRegistry(self)
        self.jobs = JobRegistry(self.emit_event)
        self.graph.drain_all_hooks.append(self.jobs.drain_all_section)
        self.objects = ObjectRegistry()
        self.graph.objects = self.objects
        self.monitors: set[EventSink] = set()
        self.closers: list[Any] = []  # chardev servers/clients to close at shutdown
        self.chardevs = ChardevRegistry(self.objects)  # --chardev and chardev-add ones, by id
        self.nbd_server: NbdServer | None = None  # nbd-server-start / --nbd-server
        self._shutdown: asyncio.Event | None = None
        # Cleared while the command line is carried out: monitors take no command until
        # then, as QEMU's main loop only runs after every option (a client that connects
        # early gets its replies once the --blockdev nodes are open).
        self.started = asyncio.Event()
        self.started.set()
        load_handlers()

    # --- commands -------------------------------------------------------------------------
    async def execute(
        self, name: str, args: dict[str, Any] | None, *, from_cli: bool = False
    ) -> Any:
        """Validate ``args`` against the schema of command ``name`` and run its handler.

        ``from_cli``: a start-up option, checked by the schema walk alone (see
        :meth:`QAPISchema.check_type_value`) to keep start-up to the first mount short.
        """
        handler = HANDLERS.get(name)
        if handler is None or not self.schema.has_command(name):
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        checked = self.schema.check_command_args(name, args, json_schema=not from_cli)
        # ``fd`` socket addresses are numbers on the command line, getfd names in QMP.
        on_command_line = ON_COMMAND_LINE.set(from_cli)
        try:
            return await handler(self, checked)
        finally:
            ON_COMMAND_LINE.reset(on_command_line)
            for export in self.exports:
                export.after_command()

    # --- events ---------------------------------------------------------------------------
    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` with a QMP timestamp to every monitor."""
        now = time.time()
        event: dict[str, Any] = {
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)},
            "event": name,
        }
        if data is not None:
            event["data"] = data
        for monitor in list(self.monitors):
            monitor.send_event(event)

    # --- shutdown -------------------------------------------------------------------------
    @property
    def shutdown_event(self) -> asyncio.Event:
        if self._shutdown is None:
            self._shutdown = asyncio.Event()
        return self._shutdown

    def request_shutdown(self) -> None:
        """Ask the main loop to shut down (QMP quit, SIGTERM/SIGINT/SIGHUP)."""
        self.shutdown_event.set()

    async def wait_for_shutdown(self) -> None:
        await self.shutdown_event.wait()

    async def shut_down_exports_and_jobs(self) -> None:
        """QEMU's first steps of shutting down: delete every export, drain every node (a
        section never ended: running jobs pause), cancel every job and wait for it. ``quit``
        goes through them before its reply, as QEMU's reply comes after their events."""
        await self.exports.delete_all()
        if self.nbd_server is not None:
            server, self.nbd_server = self.nbd_server, None
            await server.close()
        for hook in self.graph.drain_all_hooks:
            await hook(list(self.graph), True)
        await self.jobs.cancel_all()

    async def close(self) -> None:
        """Delete every export (unmounting), cancel jobs, close nodes, stop iothreads, close
        monitors."""
        try:
            await self.shut_down_exports_and_jobs()
        finally:
            await self.graph.close_all()
            self.objects.stop_all()  # each iothread closes its own io_uring ring
            close_loop_ring()  # the main loop's ring (aio=io_uring, FUSE-over-io_uring)
            await self.chardevs.close_all()
            for closer in reversed(self.closers):
                try:
                    await closer()
                except Exception:  # noqa: BLE001 - shutdown must go on
                    log.exception("error while closing a monitor")
