"""``type=fuse`` block exports: checks, mount, FUSE_INIT, transports, teardown.

The export owns the pieces and their order; the engine owns the protocol semantics and the
transports own the device. What every export shares (node, ``writable``, ``writethrough``,
iothreads, permissions, delete modes) is :class:`~qsd_py.export.base.BlockExport`'s, which
runs :meth:`FuseExport.setup` once iothreads and node permissions are taken: the FUSE checks
(io_uring options, mountpoint), the mount, FUSE_INIT on the session fd and then one queue per
iothread (``FUSE_DEV_IOC_CLONE`` for all but the first). Any failure undoes what was done, so
a failed ``block-export-add`` leaves no mount behind.

With ``io_uring=on`` the INIT reply asks for ``FUSE_OVER_IO_URING`` (``FuseEngine.init(want=
...)``; refused before mounting or before replying when the kernel cannot, never a silent
fallback), then :class:`~qsd_py.export.fuse.uring.UringTransport` serves the same engine from
ring entries, and a single :class:`DevFuseQueue` on the session fd takes FORGET/INTERRUPT.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.export.base import BlockExport
from qsd_py.export.fuse import fastpath
from qsd_py.export.fuse import mount as fmount
from qsd_py.export.fuse import proto as p
from qsd_py.export.fuse.devfuse import DevFuseQueue
from qsd_py.export.fuse.engine import MAX_READ, FuseEngine

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon
    from qsd_py.export.fuse import uring as furing
    from qsd_py.export.fuse.workers import WorkerTransport

log = logging.getLogger("qsd_py.export.fuse")

INIT_TIMEOUT_S = 10.0

# Mountpoints of live exports in this process, checked *before* any stat(): stat() on a FUSE
# file served by the calling loop would wait for itself forever.
_MOUNTPOINTS: dict[str, FuseExport] = {}


def _opt(opts: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in opts:
            return opts[name]
    return default


class FuseExport(BlockExport):
    """One FUSE export: a regular file over ``mountpoint`` serving the node's bytes."""

    type = "fuse"
    label = "FUSE"
    multithread = True

    def __init__(self, daemon: Daemon, opts: dict[str, Any], node: BlockNode) -> None:
        super().__init__(daemon, opts, node)
        self.mountpoint: str = opts["mountpoint"]
        self.key = os.path.abspath(self.mountpoint)
        self.growable: bool = bool(opts.get("growable", False))
        self.allow_other: str = opts.get("allow-other", "auto")
        self.io_uring: bool = bool(_opt(opts, "io_uring", "io-uring", default=False))
        self.uring: furing.UringTransport | WorkerTransport | None = None
        self.engine: FuseEngine | None = None
        self.mounted: fmount.Mounted | None = None
        self.queues: list[DevFuseQueue] = []
        self.clone_fds: list[int] = []

    # --- start -----------------------------------------------------------------------------
    async def setup(self) -> None:
        """After the base took iothreads and node: the FUSE checks in QEMU's order, the
        mount, FUSE_INIT and the transports. A failure is undone by :meth:`teardown`."""
        if self.io_uring:
            self._check_uring()
        elif "queue-depth" in self.opts:
            raise QMPError("queue-depth is only valid with io_uring=on")
        if self.key in _MOUNTPOINTS:
            raise QMPError(f"There already is a FUSE export on '{self.mountpoint}'")
        fmount.check_mountpoint(self.mountpoint)
        self.engine = FuseEngine(
            self.node,
            writable=self.writable,
            growable=self.growable,
            writethrough=self.writethrough,
        )
        self.mounted = fmount.mount(
            self.mountpoint,
            read_only=not self.writable,
            allow_other=self.allow_other,
            max_read=MAX_READ,
        )
        _MOUNTPOINTS[self.key] = self
        self.engine.allow_other = self.mounted.allow_other
        await self._serve_init(self.mounted.fd)
        if self.io_uring:
            await self._start_uring()
        self._start_transport()

    async def _serve_init(self, fd: int) -> None:
        """Answer the FUSE_INIT the kernel queued at mount time."""
        assert self.engine is not None
        os.set_blocking(fd, False)
        buf = bytearray(self.engine.request_buffer_size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INIT_TIMEOUT_S
        while True:
            try:
                n = os.readv(fd, [buf])
                break
            except BlockingIOError as err:
                if loop.time() > deadline:
                    raise QMPError("FUSE_INIT did not arrive from the kernel") from err
                await _readable(loop, fd, deadline - loop.time())
        mv = memoryview(buf)
        _len, opcode, unique = struct.unpack_from("<IIQ", mv)
        if opcode != p.INIT:
            raise QMPError(f"FUSE: expected FUSE_INIT, got opcode {opcode}")
        out = bytearray(p.OUT_HEADER.size + p.INIT_OUT.size)
        want = p.OVER_IO_URING if self.io_uring else 0
        res = self.engine.init(mv[p.IN_HEADER.size : n], memoryview(out)[p.OUT_HEADER.size :], want)
        if res >= 0 and self.io_uring:
            from qsd_py.export.fuse import uring_checks  # io_uring exports only: start-up

            uring_checks.check_negotiated(self.engine)  # refuse before replying: no silent fallback
        if res < 0:
            p.OUT_HEADER.pack_into(out, 0, p.OUT_HEADER.size, res, unique)
            os.write(fd, out[: p.OUT_HEADER.size])
            raise QMPError(f"FUSE_INIT failed: {os.strerror(-res)}")
        p.OUT_HEADER.pack_into(out, 0, p.OUT_HEADER.size + res, 0, unique)
        os.write(fd, out[: p.OUT_HEADER.size + res])

    def _start_transport(self) -> None:
        """One /dev/fuse queue per iothread (or one on the main loop). With io_uring, one
        reader of the session fd on the main loop, for FORGET and INTERRUPT."""
        assert self.engine is not None and self.mounted is not None
        if not self.iothreads or self.uring is not None:
            placements: list[tuple[asyncio.AbstractEventLoop, str]] = [
                (asyncio.get_running_loop(), "main")
            ]
        else:
            placements = [(t.loop, t.id) for t in self.iothreads]
        for i, (loop, where) in enumerate(placements):
            fd = self.mounted.fd if i == 0 else self._clone_fd(self.mounted.fd)
            queue = DevFuseQueue(fd, self.engine, loop, name=f"{self.id}/q{i}@{where}")
            queue.on_change = self._resync_queues
            self.queues.append(queue)
            if loop is asyncio.get_running_loop():
                queue.start()
            else:
                loop.call_soon_threadsafe(queue.start)

    # --- FUSE-over-io_uring ------------------------------------------------------------------
    def _check_uring(self) -> None:
        """Before mounting: the kernel can do it and the options make sense.

        The io_uring modules are imported here, by the first export that asks for io_uring:
        the others never pay for them at start-up."""
        from qsd_py.export.fuse import uring_checks

        uring_checks.queue_depth(self.opts)
        reason = uring_checks.unavailable_reason()
        if reason is not None:
            raise QMPError(reason)

    async def _start_uring(self) -> None:
        """After the INIT reply: register entries on every CPU's queue, spread round-robin
        over the iothreads, or (default) each served by a worker process bound to its CPU
        (qsd_py/export/fuse/workers.py says why). A node with no fast path (nbd: every
        request needs the node's coroutines), or one only the daemon can take (rbd: the
        image's librbd handle is the daemon's), keeps its queues on the main loop instead:
        a worker would only forward each request to the daemon, one more hop for nothing."""
        from qsd_py.export.fuse import uring as furing
        from qsd_py.export.fuse import uring_checks

        assert self.engine is not None and self.mounted is not None
        depth = uring_checks.queue_depth(self.opts)
        loops = [(t.loop, t.id) for t in self.iothreads]
        if not loops and not fastpath.forkable(self.engine.node):
            loops = [(asyncio.get_running_loop(), "main")]
        if loops:
            self.uring = furing.UringTransport(
                self.mounted.fd, self.engine, loops, depth=depth, name=self.id
            )
        else:
            from qsd_py.export.fuse.workers import WorkerTransport

            mounted = self.mounted
            self.uring = WorkerTransport(
                mounted.fd,
                self.engine,
                depth=depth,
                name=self.id,
                abort=lambda: fmount.abort_connection(mounted.path, mounted.privileged),
                queues=uring_checks.possible_cpus(),
            )
        await self.uring.start()

    async def _stop_uring(self, abort: bool) -> None:
        """Stop answering, abort the connection (parked entries then complete), wait for every
        entry and free the buffers; the rest of the teardown is the /dev/fuse one."""
        assert self.uring is not None
        try:
            await self.uring.stop_serving(abort)
        except Exception:  # noqa: BLE001 - teardown goes on
            log.exception("stopping FUSE io_uring queues of %s", self.id)
        mounted = self.mounted
        if mounted is not None and not fmount.abort_connection(mounted.path, mounted.privileged):
            # No way to abort: the connection ends once the lazily detached mount is unused.
            fmount.unmount(mounted.path, mounted.privileged)
        if not await self.uring.drain_and_release():
            log.error("%s: FUSE io_uring entries still held by the kernel", self.id)
        self.uring = None

    def _clone_fd(self, session_fd: int) -> int:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, p.FUSE_DEV_IOC_CLONE, struct.pack("<I", session_fd))
        except OSError:
            os.close(fd)
            raise
        self.clone_fds.append(fd)
        return fd

    def repoint_hook(self) -> Any:
        """Every transport follows a pivot (io_uring queue workers through new plans)."""
        return self.repoint

    def quiesce_hook(self) -> Any:
        """A drain (``BlockNode.drained``, a pivot) waits for the requests the engine serves,
        whatever loop or iothread runs them; fast-path writes are the plans' business
        (closed by the job's bitmap, re-planned on a pivot)."""
        return self.quiesce

    async def quiesce(self) -> Any:
        if self.engine is None:
            return lambda: None
        return await self.engine.quiesce()

    def repoint(self, node: BlockNode) -> None:
        """Serve ``node`` from now on (mirror's pivot): the engine and every queue. When
        this returns, no io_uring request uses the old node's plan any more."""
        self.node = node
        if self.engine is not None:
            self.engine.node = node
        if self.uring is not None:
            self.uring.refresh_length()
            self.uring.repoint()
        self._resync_queues()

    def _resync_queues(self) -> None:
        """The /dev/fuse queues' plans are stale (a pivot, fast writes closed or opened):
        each drops its plan on its loop, its transfers finish (settle.py), then it makes a
        new one."""
        from qsd_py.export.fuse.settle import drop_and_settle

        for queue in self.queues:
            drop_and_settle(
                queue.loop,
                queue.drop_plan,
                lambda q=queue: q.fast_busy,  # type: ignore[misc]
                queue.repoint,
                queue.name,
            )

    def after_command(self) -> None:
        """A QMP command may have resized the node: queue workers need its new length."""
        if self.uring is not None:
            self.uring.refresh_length()

    # --- stop ------------------------------------------------------------------------------
    def in_use(self) -> bool:
        if self.uring is not None and self.uring.in_flight():
            return True
        return any(q.stats.in_flight for q in self.queues)

    async def teardown(self, abort: bool) -> None:
        """Stop the queues, unmount, close the fds (callers still holding the file then get
        ENOTCONN, callers mid-request ECONNABORTED); the base then gives back node and
        iothreads."""
        if self.uring is not None:
            await self._stop_uring(abort)
        for queue in self.queues:
            try:
                await queue.run_on_loop(lambda q=queue: q.aclose(abort))
            except Exception:  # noqa: BLE001 - teardown goes on
                log.exception("stopping FUSE queue %s", queue.name)
        if self.mounted is not None:
            fmount.unmount(self.mounted.path, self.mounted.privileged)
            for fd in [*self.clone_fds, self.mounted.fd]:
                _close_quietly(fd)
            if _MOUNTPOINTS.get(self.key) is self:
                del _MOUNTPOINTS[self.key]
            self.mounted = None
        self.clone_fds.clear()
        self.queues.clear()

    # --- introspection ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-queue counters for ``x-`` introspection and tests (issue 4's visible proof)."""
        return {
            "id": self.id,
            "transport": "io_uring" if self.uring is not None else "dev-fuse",
            "negotiated": self.engine.describe() if self.engine else {},
            "queues": [q.info() for q in self.queues],
            "uring-queues": self.uring.info() if self.uring is not None else [],
        }


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, max(timeout, 0.001))
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as err:
        if err.errno != errno.EBADF:
            log.warning("closing fd %d: %s", fd, err)
