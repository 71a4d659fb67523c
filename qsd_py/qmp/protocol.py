"""One QMP session on an asyncio stream, with QEMU's wire rules.

A session greets, refuses everything but ``qmp_capabilities`` until negotiation, then runs
commands one at a time in the order they arrived (as QEMU runs in-band commands), while the
reader keeps parsing so that ``exec-oob`` requests can overtake the queue.  Parse errors
take their place in the same queue, so every reply comes back in input order.

A misbehaving client only hurts itself: malformed input gets QEMU's error replies, at most
:data:`QUEUE_LENGTH` requests are buffered before reading pauses (QEMU's limit too), a command
that is running when the client leaves runs to completion (cancelling it half way could leave
the block graph half changed) and its reply is dropped, and a client that stops reading while
replies and events pile up beyond :data:`MAX_PENDING_OUTPUT` is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from qsd_py import QEMU_VERSION, __version__
from qsd_py.errors import QMPError
from qsd_py.qmp.jsonout import dumps
from qsd_py.qmp.jsonstream import JSONError, JSONStream

log = logging.getLogger("qsd_py.qmp")

QUEUE_LENGTH = 8  # in-band requests buffered per session (QEMU's QMP_REQ_QUEUE_LEN_MAX)
READ_SIZE = 256 * 1024
MAX_PENDING_OUTPUT = 32 << 20  # bytes a client may leave unread before it is dropped
FLUSH_TIMEOUT = 2.0  # how long closing waits for the last replies to leave

NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"

_STOP = object()


def greeting() -> dict[str, Any]:
    """The banner a client reads first; ``oob`` is offered because ``exec-oob`` is handled."""
    major, minor, micro = QEMU_VERSION
    return {
        "QMP": {
            "version": {
                "qemu": {"micro": micro, "minor": minor, "major": major},
                "package": f"qsd-py {__version__}",
            },
            "capabilities": ["oob"],
        }
    }


def error_reply(err: QMPError) -> dict[str, Any]:
    return {"error": {"class": err.error_class, "desc": err.desc}}


class QMPSession:
    """The QMP protocol over one connection (the daemon sees it as an event sink)."""

    def __init__(
        self,
        daemon: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pretty: bool = False,
    ) -> None:
        self.daemon = daemon
        self.reader = reader
        self.writer = writer
        self.pretty = pretty
        self.negotiated = False
        self.oob = False
        self.closed = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_LENGTH)
        self._dispatcher: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None

    # --- life cycle ------------------------------------------------------------------------
    async def serve(self, greet: bool = True) -> None:
        """Run the session until the client leaves or :meth:`close` is called (``greet``:
        send the greeting first; False where it went out already, see :meth:`greet`)."""
        self.daemon.monitors.add(self)
        try:
            if greet:
                self.greet()
            self._dispatcher = asyncio.create_task(self._dispatch_loop())
            self._reader_task = asyncio.create_task(self._read_loop())
            # asyncio.wait, not await: a cancelled child must end the wait, while a
            # cancellation of serve() itself must still propagate.
            await asyncio.wait([self._reader_task])
            # The client left (or we are closing): forget queued requests, but let a
            # running command finish so the daemon's state stays consistent.
            self._drop_queued()
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_STOP)
            await asyncio.wait([self._dispatcher])
        finally:
            self.daemon.monitors.discard(self)
            await self._close_transport()

    def greet(self) -> None:
        """Send the QMP greeting."""
        self._send(greeting())

    async def close(self) -> None:
        """Stop reading, drop what is queued, flush what was sent, close the connection."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._drop_queued()
        if self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()
        await self._close_transport()

    def _drop_queued(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    async def _close_transport(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.daemon.monitors.discard(self)
        writer = self.writer
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), FLUSH_TIMEOUT)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), FLUSH_TIMEOUT)
        if not writer.transport.is_closing():
            writer.transport.abort()

    # --- output ----------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        if self.closed or self.writer.transport.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            log.warning("QMP client does not read its replies; disconnecting it")
            self.closed = True
            self.daemon.monitors.discard(self)
            self.writer.transport.abort()
            if self._reader_task is not None:
                self._reader_task.cancel()
            return
        self.writer.write(dumps(message, self.pretty))

    def send_event(self, event: dict[str, Any]) -> None:
        """Called by the daemon for every event; only negotiated sessions receive them."""
        if self.negotiated:
            self._send(event)

    # --- input -----------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        stream = JSONStream()
        while True:
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            try:
                items = stream.feed(data)
            except Exception:  # noqa: BLE001 - a parser bug ends this session only
                log.exception("QMP input could not be parsed; closing the connection")
                return
            for item in items:
                if self.oob and isinstance(item, dict) and "exec-oob" in item:
                    await self._respond(item)  # out of band: overtakes the queue
                else:
                    await self._queue.put(item)  # pauses reading while the queue is full

    async def _dispatch_loop(self) -> None:
        await self.daemon.started.wait()  # the command line first, as in QEMU
        while True:
            item = await self._queue.get()
            if item is _STOP:
                return
            await self._respond(item)
            if not self.closed:
                with contextlib.suppress(ConnectionError, OSError):
                    await self.writer.drain()

    async def _respond(self, item: Any) -> None:
        """Send the reply; one a handler made unsendable (a value JSON cannot carry) becomes
        an error reply, so the session goes on answering instead of its loop dying."""
        reply = await self.handle(item)
        try:
            self._send(reply)
        except TypeError as err:
            log.exception("QMP reply could not be sent")
            error = error_reply(QMPError(str(err)))
            if isinstance(item, dict) and "id" in item:
                error["id"] = item["id"]
            self._send(error)

    async def handle(self, item: Any) -> dict[str, Any]:
        """The reply to one parsed input (a value or a :class:`JSONError`)."""
        if isinstance(item, JSONError):
            return error_reply(QMPError(item.message))
        if not isinstance(item, dict):
            return error_reply(QMPError("QMP input must be a JSON object"))
        try:
            reply: dict[str, Any] = {"return": await self._execute(item)}
        except QMPError as err:
            reply = error_reply(err)
        except Exception as err:  # noqa: BLE001 - a bug in a handler must not end the session
            log.exception("QMP command failed unexpectedly")
            reply = error_reply(QMPError(str(err) or type(err).__name__))
        if "id" in item:
            reply["id"] = item["id"]
        return reply

    def _check_request(self, request: dict[str, Any]) -> tuple[str, bool, Any]:
        """QEMU's checks of the request envelope; returns (command, out of band, arguments)."""
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and self.oob):
                if not isinstance(value, str):
                    raise QMPError(f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QMPError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QMPError(f"QMP input member '{key}' is unexpected")
        name = request.get("execute")
        oob_name = request.get("exec-oob") if self.oob else None
        if name is not None and oob_name is not None:
            raise QMPError("QMP input member 'execute' clashes with 'exec-oob'")
        if name is None and oob_name is None:
            raise QMPError("QMP input lacks member 'execute'")
        if name is None:
            return oob_name, True, request.get("arguments")  # type: ignore[return-value]
        return name, False, request.get("arguments")

    async def _execute(self, request: dict[str, Any]) -> Any:
        name, out_of_band, args = self._check_request(request)
        if not self.negotiated:
            if name != "qmp_capabilities":
                raise QMPError(NEGOTIATE_FIRST, "CommandNotFound")
            return self._negotiate(args)
        schema = getattr(self.daemon, "schema", None)
        if out_of_band and schema is not None:
            if not schema.has_command(name):
                raise QMPError(f"The command {name} has not been found", "CommandNotFound")
            if not schema.command(name).allow_oob:
                raise QMPError(f"The command {name} does not support OOB")
        return await self.daemon.execute(name, args)

    def _negotiate(self, args: dict[str, Any] | None) -> dict[str, Any]:
        schema = getattr(self.daemon, "schema", None)
        if schema is not None:
            args = schema.check_command_args("qmp_capabilities", args)
        enable = (args or {}).get("enable", [])
        self.oob = "oob" in enable
        self.negotiated = True
        return {}
