"""An NBD client session: the connection a block node uses, and reconnecting it.

A node keeps one session for its lifetime. The session has one connection at a time; when
it goes away (the server died, the network broke) and ``reconnect-delay`` is set, the session
reconnects in the background and requests wait, up to that many seconds, as QEMU's client
does. Requests whose replies were lost with the old connection are sent again on the new
one, so nothing that was not acknowledged is lost. Once the delay has passed, requests fail
with EIO at once while the reconnecting goes on. Without a delay (the default), and with a
server that breaks the protocol, the session does not reconnect: every request fails from
then on (QEMU 11.1's behaviour: its "quit" state).

Everything here runs on the loop that opened the node.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qsd_py.block.nbd.connection import (
    ConnectError,
    ConnectionLost,
    NbdConnection,
    TlsSetup,
    connect,
)
from qsd_py.nbd.client import ExportInfo, ProtocolError, Request
from qsd_py.nbd.constants import TransmissionFlag

log = logging.getLogger(__name__)

# Pauses between connection attempts: short first (a restarted server is back soon), then
# longer, so that a server that stays away costs little.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0

CONNECTED, WAITING, FAILING, QUIT = "connected", "waiting", "failing", "quit"


@dataclass(frozen=True)
class Target:
    """Where and how to connect: the node's options, resolved."""

    addr: dict[str, Any]
    export: str
    tls: TlsSetup | None = None
    meta_contexts: Sequence[str] = ()

    async def connect(self) -> NbdConnection:
        return await connect(self.addr, self.export, tls=self.tls, meta_contexts=self.meta_contexts)


def describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


async def open_connection(target: Target, timeout: float) -> NbdConnection:
    """The first connection: one attempt, or attempts until ``timeout`` seconds have passed
    (``open-timeout``); the last attempt's error is the one reported."""
    deadline = time.monotonic() + timeout
    pause = RETRY_FIRST
    while True:
        try:
            return await target.connect()
        except (ConnectError, ProtocolError, OSError):
            if time.monotonic() + pause > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, RETRY_MAX)


class ClientSession:
    """Requests over a connection that is replaced when it breaks."""

    def __init__(self, target: Target, conn: NbdConnection, reconnect_delay: float) -> None:
        self.target = target
        self.conn: NbdConnection | None = conn
        self.info: ExportInfo = conn.info
        self.reconnect_delay = reconnect_delay
        self.state = CONNECTED
        self.reason = ""  # why the session is not connected
        self._loop = asyncio.get_running_loop()
        self._changed: asyncio.Future[None] = self._loop.create_future()
        self._reconnector: asyncio.Task[None] | None = None
        self._delay_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._watch(conn)

    # --- requests -------------------------------------------------------------------------
    async def request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        buf: memoryview | None = None,
        payload: memoryview | bytes | None = None,
    ) -> Request:
        """Send a request until a connection answers it; OSError(EIO) when there is none
        (after the reconnect delay, or for good)."""
        while True:
            conn = await self._usable()
            try:
                return await conn.submit(cmd, offset, length, flags, buf, payload)
            except ConnectionLost as lost:
                self._connection_over(conn, lost)

    async def _usable(self) -> NbdConnection:
        while True:
            if self.state == CONNECTED and self.conn is not None:
                return self.conn
            if self.state != WAITING:
                raise OSError(errno.EIO, f"NBD server unavailable: {self.reason}")
            await asyncio.shield(self._changed)

    # --- state ----------------------------------------------------------------------------
    def _set_state(self, state: str, reason: str = "") -> None:
        self.state = state
        if reason:
            self.reason = reason
        changed, self._changed = self._changed, self._loop.create_future()
        changed.set_result(None)

    def _watch(self, conn: NbdConnection) -> None:
        """Notice a connection's end even when no request is in flight."""

        async def watch() -> None:
            lost = await conn.wait_closed()
            self._connection_over(conn, lost)

        task = self._loop.create_task(watch())
        conn_tasks.add(task)
        task.add_done_callback(conn_tasks.discard)

    def _connection_over(self, conn: NbdConnection, lost: ConnectionLost) -> None:
        if conn is not self.conn or self._closed:
            return  # already handled
        self.conn = None
        conn.close(str(lost))
        if lost.protocol:
            log.error("NBD server broke the protocol, giving up on it: %s", lost)
            self._set_state(QUIT, str(lost))
            return
        if not self.reconnect_delay:
            log.error("NBD connection lost (%s); no reconnect-delay, giving up", lost)
            self._set_state(QUIT, str(lost))
            return
        log.warning("NBD connection lost (%s), reconnecting", lost)
        self._set_state(WAITING, str(lost))
        self._delay_timer = self._loop.call_later(self.reconnect_delay, self._delay_over)
        self._reconnector = self._loop.create_task(self._reconnect())

    def _delay_over(self) -> None:
        self._delay_timer = None
        if self.state == WAITING:
            self._set_state(FAILING)

    async def _reconnect(self) -> None:
        pause = RETRY_FIRST
        while not self._closed:
            try:
                conn = await self.target.connect()
            except (ConnectError, ProtocolError, OSError) as err:
                log.debug("NBD reconnect attempt failed: %s", describe(err))
            else:
                why = self._refuse(conn.info)
                if why is None:
                    self._reconnected(conn)
                    return
                conn.disconnect()
                log.warning("NBD reconnect refused: %s", why)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    def _refuse(self, info: ExportInfo) -> str | None:
        """Why a new connection cannot stand in for the old one (None: it can)."""
        old = self.info
        if info.size != old.size:
            return f"export size changed from {old.size} to {info.size}"
        if info.mode != old.mode or set(info.contexts) != set(old.contexts):
            return "server negotiated different features"
        if (info.flags ^ old.flags) & TransmissionFlag.READ_ONLY:
            return "export became read-only"
        return None

    def _reconnected(self, conn: NbdConnection) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        self._reconnector = None
        self.conn = conn
        self.info = conn.info
        log.warning("NBD connection re-established")
        self._watch(conn)
        self._set_state(CONNECTED, "")

    # --- end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect for good; requests still waiting fail with EIO."""
        if self._closed:
            return
        self._closed = True
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        if self._reconnector is not None:
            self._reconnector.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.disconnect()
        self._set_state(QUIT, "node closed")


# Watcher tasks, kept referenced until done (asyncio keeps only weak references to tasks).
conn_tasks: set[asyncio.Task[None]] = set()
