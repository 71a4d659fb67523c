"""An NBD client session: the connection a block node uses.

A node keeps one session for its lifetime. When its connection is lost, or the server
breaks the protocol, every request fails with EIO from then on (QEMU 11.1's behaviour
without ``reconnect-delay``: its "quit" state).

Everything here runs on the loop that opened the node.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qsd_py.nbd.client import ExportInfo, ProtocolError, Request
from qsd_py.nbd.client_conn import ConnectError, ConnectionLost, NbdConnection, connect

log = logging.getLogger(__name__)

# Pauses between the attempts of open-timeout: short first, then longer.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0

CONNECTED, QUIT = "connected", "quit"


@dataclass(frozen=True)
class Target:
    """Where and how to connect: the node's options, resolved."""

    addr: dict[str, Any]
    export: str
    tls: ssl.SSLContext | None = None
    hostname: str | None = None
    meta_contexts: Sequence[str] = ()

    async def connect(self) -> NbdConnection:
        return await connect(
            self.addr,
            self.export,
            tls=self.tls,
            hostname=self.hostname,
            meta_contexts=self.meta_contexts,
        )


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
    """Requests over the node's connection."""

    def __init__(self, target: Target, conn: NbdConnection, reconnect_delay: float) -> None:
        self.target = target
        self.conn: NbdConnection | None = conn
        self.info: ExportInfo = conn.info
        self.reconnect_delay = reconnect_delay
        self.state = CONNECTED
        self.reason = ""  # why the session is not connected
        self._loop = asyncio.get_running_loop()
        self._changed: asyncio.Future[None] = self._loop.create_future()
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
        """Send a request and wait for its reply; OSError(EIO) without a connection."""
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
            raise OSError(errno.EIO, f"NBD server unavailable: {self.reason}")

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
        log.error("NBD connection lost (%s), giving up", lost)
        self._set_state(QUIT, str(lost))

    # --- end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect for good."""
        if self._closed:
            return
        self._closed = True
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.disconnect()
        self._set_state(QUIT, "node closed")


# Watcher tasks, kept referenced until done (asyncio keeps only weak references to tasks).
conn_tasks: set[asyncio.Task[None]] = set()
