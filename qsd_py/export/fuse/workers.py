"""FUSE-over-io_uring queues served by worker processes, one per CPU.

Why processes: a queue served on the CPU that issued the request keeps both wake-ups on that
CPU (docs/design.rst, *Threads and loops*), but threads of one process share the GIL, and at
depth handing it between CPUs cost more than the parallel work won (``scripts/gil-probe``:
two single-CPU daemons served 2.5-2.8x what one daemon's two queue threads did). A worker is a
``fork`` of the daemon taken once the export answered FUSE_INIT: it holds the FUSE fd, the
backing file's fd and a copy of the engine, binds itself to its CPU, and serves its queues with
the same :class:`~qsd_py.export.fuse.uring.UringQueue` as a thread would.

What stays in the daemon: the block graph. A worker answers only READ and WRITE on the fast
path (fastpath.py) itself; every other request (GETATTR, SETATTR, FLUSH, a growing write, ...)
is sent as bytes to the daemon, whose engine answers it (bytes in, bytes out), and the reply
bytes come back. The node's length, which the fast path's EOF rules need, lives in a shared
page (:class:`~qsd_py.export.fuse.shared_length.SharedLength`) that the daemon updates after
every request it answers and every QMP command (:func:`refresh_lengths`). A worker that dies
makes the daemon abort the connection: callers get an error instead of a queue nobody serves.

The requests, replies and stop go over a stream socket pair in frames (worker_wire.py). A
second, blocking socket pair carries the synchronous counter queries of
``x-query-fuse-queues`` and safe deletes, answered from the worker's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, NoReturn

from qsd_py.block import fast_io
from qsd_py.block.fast_map import register_reader_process
from qsd_py.block.stats import claim_process_row, release_process_row, set_process_row
from qsd_py.errors import QMPError
from qsd_py.export.fuse import plan_wire
from qsd_py.export.fuse import proto as p
from qsd_py.export.fuse import worker_wire as wire
from qsd_py.export.fuse.engine import QueueStats
from qsd_py.export.fuse.shared_length import SharedLength
from qsd_py.export.fuse.uring_checks import register_failure

if TYPE_CHECKING:
    from qsd_py.block.fast_io import FastPlan
    from qsd_py.block.fast_map import ClusterTable
    from qsd_py.export.fuse.engine import FuseEngine
    from qsd_py.export.fuse.uring import UringQueue

log = logging.getLogger("qsd_py.export.fuse")

START_TIMEOUT_S = 10.0
STATS_TIMEOUT_S = 2.0
EXIT_TIMEOUT_S = 5.0
REAP_WAIT_S = 1.0
PLAN_ACK_TIMEOUT_S = 5.0
_ACK = struct.Struct("<Q")  # a worker's acknowledgement of a generation

_HEADER = p.URING_REQ_HEADER_SZ
_ARG = p.URING_ARG_OFFSET
_ARG_END = _ARG + p.URING_OP_IN_OUT_SZ
_PR_SET_PDEATHSIG = 1
_OPCODE = struct.Struct("<I")  # fuse_in_header.opcode at 4
# Requests whose answer depends on no state of the daemon: the worker's copy of the engine
# answers them (RELEASE comes after every close, and nobody waits for its reply).
_STATELESS = frozenset({p.RELEASE})

# Transports whose workers read a node length from shared memory.
_LIVE: weakref.WeakSet[WorkerTransport] = weakref.WeakSet()


def refresh_lengths() -> None:
    """Publish every served node's current length to its workers (after anything that may
    have changed it: a request the daemon answered, a QMP command)."""
    for transport in list(_LIVE):
        transport.refresh_length()


# --- the daemon's side -----------------------------------------------------------------------
class _Worker:
    """The daemon's handle on one worker process."""

    def __init__(self, cpu: int | None, qids: list[int]) -> None:
        self.cpu = cpu
        self.row = -1  # its row in the nodes' shared counters (qsd_py/block/stats.py)
        self.qids = qids
        self.pid = 0
        self.writer: asyncio.StreamWriter | None = None
        self.stats_sock: socket.socket | None = None
        self.stats_seq = 0  # the tag of the last counter query sent
        self.stats_buf = b""  # what was read of the answers and not yet taken
        self.last_info: list[dict[str, Any]] = []
        self.ready: asyncio.Future[list[dict[str, Any]]] | None = None
        self.stopped: asyncio.Future[None] | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.exit_status: int | None = None
        self.died = False  # ended before the daemon asked it to stop
        self.reader = -1  # its slot among the node's cluster-table readers (qcow2)
        self.table: ClusterTable | None = None  # the table that slot is in
        self.plan_sock: socket.socket | None = None  # new plans out, acknowledgements in


class WorkerTransport:
    """Every kernel queue of one FUSE connection, served by a worker process per CPU this
    daemon may run on (queues of other possible CPUs go round-robin over them). Same
    interface as :class:`~qsd_py.export.fuse.uring.UringTransport`."""

    def __init__(
        self, fd: int, engine: FuseEngine, *, depth: int, name: str, abort: Any, queues: int
    ) -> None:
        self.fd = fd
        self.engine = engine
        self.depth = depth
        self.name = name
        self._abort = abort  # callable: end the FUSE connection (a worker died)
        self.stopping = False
        self.length = SharedLength()
        cpus = sorted(os.sched_getaffinity(0))
        qids: dict[int, list[int]] = {cpu: [] for cpu in cpus}
        for qid in range(queues):
            qids[qid if qid in qids else cpus[qid % len(cpus)]].append(qid)
        self.workers = [_Worker(cpu, q) for cpu, q in qids.items()]
        self._tasks: set[asyncio.Task[None]] = set()
        # Payload buffers of forwarded requests, reused: one per request answered at once.
        self._buffers: list[bytearray] = []
        self._stats_lock = threading.Lock()
        self._table: ClusterTable | None = None  # one counter query at a time, from any thread
        # The node's generation, bumped on every change of what the workers' plans must be,
        # and the daemon's own copy of the plan, whose ``on_change`` the block layer calls.
        self.gen = plan_wire.SharedGen()
        self._watched: FastPlan | None = None
        self._reaches: tuple[Any, ...] | None = None  # what the workers' plans reach
        _LIVE.add(self)

    def refresh_length(self) -> None:
        self.length.publish(self.engine.node.length())

    # --- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Fork the workers (call after the INIT reply); each registers its queues' entries.
        Raise QMPError naming the kernel's answer if a REGISTER failed."""
        self.refresh_length()
        target = self.engine.node.fast_target()
        keep = {self.fd}
        if target is not None and target.file is not None and target.file.fd >= 0:
            keep.add(target.file.fd)
        self._table = target.table if target is not None else None
        self._reaches = plan_wire.reaches(self._watch())  # before the forks: changes from
        # now on reach every worker
        for w in self.workers:
            if self._table is not None:
                w.reader = self._table.claim()  # claimed here: the table's readers are ours
                w.table = self._table
            self._fork(w, keep)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = [await w.ready for w in self.workers if w.ready is not None]
        except TimeoutError as err:
            raise QMPError("FUSE-over-io_uring: a queue worker did not start") from err
        for report in ready:
            for q in report:
                if q["failure"]:  # an errno
                    raise QMPError(register_failure(q["qid"], q["failure"]))

    # --- the node changes ----------------------------------------------------------------------
    def _watch(self) -> FastPlan | None:
        """Make the daemon's copy of the plan of the engine's node now, registered along the
        chain so that the block layer reaches :meth:`replan` (``on_change``)."""
        old = self._watched
        if old is not None:
            old.on_change = None
            old.release()
        plan = fast_io.plan_for(self.engine.node, ring_io=True, writable=self.engine.writable)
        if plan is not None:
            plan.on_change = self._changed
            plan.settle = self._settle
        self._watched = plan
        return plan

    async def _settle(self) -> None:
        """The node closed its plans to writes (its fork page's gate is set): a write a
        worker started before still lands; a new plan for every worker drains them (each
        acknowledges once nothing its old plan routed is in flight)."""
        self.replan()

    def repoint(self) -> None:
        """The engine serves another node (a pivot, an overlay above it): new plans."""
        self.replan()

    def _changed(self) -> None:
        """The block layer says the plan changed: new plans only if what it reaches did (a
        closed or opened ``writable`` reaches the workers through the fork pages' gates,
        and received plans never write)."""
        if self.stopping:
            return
        plan = self._watch()
        if plan_wire.reaches(plan) != self._reaches:
            self.replan()

    def replan(self) -> None:
        """The plan of the engine's node changed: bump the generation (from now on every
        worker sends its READs and WRITEs to the daemon), send each worker the new plan and
        wait until each has acknowledged it, which it does once no request routed by its old
        plan is in flight. Blocking, a few I/O latencies: when this returns (when the pivot,
        or the closing of fast writes, is done) no request uses an old plan. A worker that
        does not answer in time gets its connection aborted rather than writing somewhere
        stale."""
        if self.stopping:
            return
        plan = self._watch()
        self._reaches = plan_wire.reaches(plan)
        gen = self.gen.bump()
        table = plan.table if plan is not None else None
        freed: list[tuple[ClusterTable, int]] = []
        asked = []
        for w in self.workers:
            if w.plan_sock is None or w.exit_status is not None:
                continue
            if w.table is not table:
                if w.table is not None and w.reader >= 0:
                    freed.append((w.table, w.reader))
                w.table, w.reader = table, table.claim() if table is not None else -1
            sent = plan if table is None or w.reader >= 0 else None  # no slot: no fast path
            try:
                plan_wire.send_plan(w.plan_sock, *plan_wire.pack_plan(sent, gen, w.reader))
            except OSError:
                continue  # the worker is gone: its end is handled by _serve_worker
            asked.append(w)
        deadline = time.monotonic() + PLAN_ACK_TIMEOUT_S
        if not all([self._acked(w, gen, deadline) for w in asked]):
            log.error("%s: a queue worker did not take the node's new plan: aborting the FUSE "
                      "connection", self.name)  # fmt: skip
            self._abort()
        for old_table, slot in freed:
            old_table.unclaim(slot)

    def _acked(self, w: _Worker, gen: int, deadline: float) -> bool:
        """Wait (blocking) for ``w``'s acknowledgement of generation ``gen``."""
        sock = w.plan_sock
        assert sock is not None
        while True:
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = sock.recv(_ACK.size)
            except OSError:
                return False
            if len(data) != _ACK.size:
                return False  # the worker is gone
            if _ACK.unpack(data)[0] >= gen:
                return True

    def _fork(self, w: _Worker, keep: set[int]) -> None:
        w.row = claim_process_row()
        fast_io.share_counts(self._watched, w.row)  # the worker counts the top node only
        loop = asyncio.get_running_loop()
        ctl, ctl_child = socket.socketpair()
        stats, stats_child = socket.socketpair()
        plans, plans_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        w.ready = loop.create_future()
        w.stopped = loop.create_future()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            ctl.close()
            stats.close()
            plans.close()
            fds = {ctl_child.fileno(), stats_child.fileno(), plans_child.fileno()}
            _worker_main(self, w, keep | fds, ctl_child, stats_child, plans_child)
        w.pid = pid
        ctl_child.close()
        stats_child.close()
        plans_child.close()
        w.stats_sock = stats
        w.plan_sock = plans
        w.reader_task = loop.create_task(self._serve_worker(w, ctl))

    async def _serve_worker(self, w: _Worker, sock: socket.socket) -> None:
        """Read the worker's frames: its start report, requests to answer, its stop ack.
        End of stream without a stop: the worker died, so the connection is aborted."""
        reader, w.writer = await asyncio.open_unix_connection(sock=sock)
        try:
            while True:
                kind, tag, body = await wire.read_frame(reader)
                if kind == wire.READY and w.ready is not None and not w.ready.done():
                    w.ready.set_result(json.loads(body))
                elif kind in (wire.REQ, wire.PREPARE):
                    answer = self._answer if kind == wire.REQ else self._prepare
                    task = asyncio.get_running_loop().create_task(answer(w, tag, body))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif kind == wire.STOPPED and w.stopped is not None and not w.stopped.done():
                    w.stopped.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        for fut in (w.ready, w.stopped):
            if fut is not None and not fut.done():
                fut.set_exception(QMPError("FUSE-over-io_uring: a queue worker ended"))
        if not self.stopping:
            w.died = True
            self._abort()
            await self._wait_reaped(w, REAP_WAIT_S)
            log.error("%s: queue worker %d (CPU %s) ended (status %s): aborting the FUSE "
                      "connection", self.name, w.pid, w.cpu, w.exit_status)  # fmt: skip
        else:
            self._reap(w)

    async def _wait_reaped(self, w: _Worker, timeout: float) -> None:
        """Its socket closes while the worker exits, a moment before it can be reaped: wait
        that moment, so that the log says how it ended."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._reap(w) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)

    async def _answer(self, w: _Worker, tag: int, body: bytes) -> None:
        """Answer a forwarded request with the daemon's engine; reply with its bytes."""
        hdr = memoryview(bytearray(body[:_HEADER]))
        payload = self._buffers.pop() if self._buffers else bytearray(self.engine.payload_size)
        data = memoryview(body)[_HEADER:]
        payload[: len(data)] = data
        out = memoryview(payload)
        stats = QueueStats()
        res = await self.engine.handle(hdr[: p.IN_HEADER.size], hdr[_ARG:_ARG_END], out, out, stats)
        res = 0 if res is None else res
        refresh_lengths()
        if w.writer is not None and not w.writer.is_closing():
            w.writer.write(wire.reply_frame(tag, res, stats, out[: max(res, 0)]))  # a copy is sent
        self._buffers.append(payload)  # answered: nothing refers to it any more

    async def _prepare(self, w: _Worker, tag: int, body: bytes) -> None:
        """A worker's PREPARE: ask the node to make the range writable in place."""
        offset, length = wire.unpack_range(body)
        try:
            ok = await self.engine.node.prepare_fast_write(offset, length)
        except OSError:
            ok = False  # the forwarded write will meet the error and report it
        if w.writer is not None and not w.writer.is_closing():
            w.writer.write(wire.reply_frame(tag, int(ok), QueueStats(), b""))

    def _reap(self, w: _Worker, block: bool = False) -> bool:
        if w.exit_status is None and w.pid:
            try:
                pid, status = os.waitpid(w.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = w.pid, 0
            if pid:
                w.exit_status = os.waitstatus_to_exitcode(status)
        return w.exit_status is not None

    # --- counters --------------------------------------------------------------------------
    def _ask(self, w: _Worker) -> int:
        """Send ``w`` a counter query tagged with a new number; 0 if it cannot be asked."""
        sock = w.stats_sock
        if sock is None or w.exit_status is not None:
            return 0
        w.stats_seq += 1
        try:
            sock.sendall(b"%d\n" % w.stats_seq)
        except OSError:
            return 0
        return w.stats_seq

    def _collect(self, w: _Worker, seq: int, deadline: float) -> list[dict[str, Any]]:
        """The answer to query ``seq``, read until ``deadline`` (time.monotonic). Answers to
        older queries that timed out arrive first and are dropped: without the tags, every
        answer after one timeout would have been the one before it. No answer in time: the
        last counters known."""
        sock = w.stats_sock
        while sock is not None and seq:
            line, nl, rest = w.stats_buf.partition(b"\n")
            if nl:
                w.stats_buf = rest
                tag, _, body = line.partition(b" ")
                if int(tag) == seq:
                    w.last_info = json.loads(body)
                    break
                continue
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
            except OSError:  # timed out, or the worker is gone
                break
            if not chunk:
                break
            w.stats_buf += chunk
        return w.last_info

    def info(self) -> list[dict[str, Any]]:
        """Every worker's queue counters now: a blocking round trip with all workers at
        once, :data:`STATS_TIMEOUT_S` at most in all (a stopped worker's are the last
        known). Blocking, so that any thread may ask (tests ask from theirs)."""
        with self._stats_lock:
            asked = [(w, self._ask(w)) for w in self.workers]
            deadline = time.monotonic() + STATS_TIMEOUT_S
            queues = [q for w, seq in asked for q in self._collect(w, seq, deadline)]
        return sorted(queues, key=lambda q: q["qid"])

    def in_flight(self) -> int:
        return sum(q["in-flight"] for q in self.info())

    # --- stop ------------------------------------------------------------------------------
    async def stop_serving(self, abort: bool) -> None:
        """Tell every worker to take no new request (``abort``: cancel what runs) and wait
        until each has done so."""
        self.stopping = True
        for w in self.workers:
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(wire.frame(wire.STOP, int(abort)))
        for w in self.workers:
            if w.stopped is not None:
                with contextlib.suppress(QMPError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(w.stopped), EXIT_TIMEOUT_S)

    async def drain_and_release(self, timeout: float = EXIT_TIMEOUT_S) -> bool:
        """After the connection was aborted: wait for every worker to get its entries back
        and exit (killed if it does not); False if one had to be killed."""
        self.stopping = True
        clean = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for w in self.workers:
            while not self._reap(w) and loop.time() < deadline:
                await asyncio.sleep(0.005)
            if not self._reap(w):
                clean = False
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                self._reap(w, block=True)
            clean &= w.exit_status == 0 or w.died  # a dead worker's entries died with it
        for w in self.workers:
            if w.reader_task is not None:
                with contextlib.suppress(BaseException):
                    await w.reader_task
            if w.writer is not None:
                w.writer.close()
                with contextlib.suppress(OSError):
                    await w.writer.wait_closed()  # the fd is gone when we return
            if w.stats_sock is not None:
                w.stats_sock.close()
            if w.plan_sock is not None:
                w.plan_sock.close()
                w.plan_sock = None
        for task in list(self._tasks):
            task.cancel()
        _LIVE.discard(self)
        for w in self.workers:
            release_process_row(w.row)
            w.row = -1
        self.length.close()
        for w in self.workers:
            if w.table is not None and w.reader >= 0:
                w.table.unclaim(w.reader)
                w.reader = -1
        if self._watched is not None:
            self._watched.on_change = None
            self._watched.release()
            self._watched = None
        return clean


# --- the worker's side -------------------------------------------------------------------------
def _worker_main(
    t: WorkerTransport,
    w: _Worker,
    keep: set[int],
    ctl: socket.socket,
    stats: socket.socket,
    plans: socket.socket,
) -> NoReturn:
    """In the forked child: leave the daemon behind, serve the queues, exit."""
    code = 1
    try:
        set_process_row(w.row)  # before any plan is made here
        _detach(keep, w.cpu)
        code = asyncio.run(_serve(t, w, ctl, stats, plans))
    except BaseException:  # noqa: BLE001 - a worker reports and exits, whatever happened
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


def _detach(keep: set[int], cpu: int | None) -> None:
    """Of the daemon keep only what serving needs: the listed fds (and stdio), no signal
    handlers or wake-up fd of its loop, no rings of its loops. Die with the daemon."""
    from qsd_py.block import aio
    from qsd_py.uring import aio as uring_aio

    low = 3  # stdio stays
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    asyncio.events._set_running_loop(None)  # forked inside the daemon's running loop
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the daemon's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)  # the daemon died before the line above took effect
    uring_aio._POLLERS.clear()  # the daemon's rings, mapped but not ours
    aio._backends.clear()  # pools whose threads stayed behind in the daemon
    if cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


def _worker_queue(fwd: wire.Forwarder) -> type[UringQueue]:
    """A :class:`UringQueue` whose engine requests go to the daemon through ``fwd`` (and
    writes too while a node of the plan's chain has its fork page's gate closed: a
    backup's copy-before-write filter, a stream, a bitmap the worker cannot mark)."""
    from qsd_py.export.fuse import fastpath
    from qsd_py.export.fuse.uring import HANDLED, UringQueue

    class WorkerQueue(UringQueue):
        def handle(self, entry: Any) -> Awaitable[int | object | None]:
            op = _OPCODE.unpack_from(entry.hdr, 4)[0]
            if op in _STATELESS:
                return super().handle(entry)  # this copy of the engine answers as well
            plan = self.plan
            if op == p.WRITE and plan is not None and plan.table is not None and plan.writable:
                return self._write_fresh(entry)
            return fwd.forward(entry.hdr, entry.payload, self.stats)

        async def _write_fresh(self, entry: Any) -> int | object:
            """A WRITE the fast path refused: where it meets fresh clusters (zeroes with no
            host cluster), have the daemon allocate them and write the data here; the
            rest is forwarded whole."""
            plan = self.plan
            assert plan is not None
            offset, size = p.IO_EXTENT.unpack_from(entry.arg)
            if fastpath.all_zeroes(plan, offset, size) and await fwd.prepare(offset, size):
                plan = self.plan  # the awaited answer may come after a new plan
                if plan is not None and plan.gen == self.gen_view[0]:
                    if self._fast(entry, plan, True):
                        return HANDLED
            return await fwd.forward(entry.hdr, entry.payload, self.stats)

    return WorkerQueue


async def _serve(
    t: WorkerTransport, w: _Worker, ctl: socket.socket, stats: socket.socket, plans: socket.socket
) -> int:
    """The worker's loop: register, report, serve; stop when told, exit once drained."""
    from qsd_py.export.fuse.uring import start_queues

    loop = asyncio.get_running_loop()
    engine = t.engine
    # This copy of the node is frozen at the fork: its length is the daemon's, published.
    engine.node.length = t.length.read  # type: ignore[method-assign]
    fwd = wire.Forwarder()
    reader, fwd.writer = await asyncio.open_unix_connection(sock=ctl)
    queue_type = _worker_queue(fwd)
    queues = [
        queue_type(
            qid,
            t.fd,
            engine,
            loop,
            depth=t.depth,
            payload_size=engine.payload_size,
            name=f"{t.name}/uring-q{qid}@cpu{w.cpu}",
        )  # fmt: skip
        for qid in w.qids
    ]
    if w.reader >= 0:
        register_reader_process()  # the daemon's barriers must reach this process
    for q in queues:
        q.reader = w.reader  # one slot for the process: its queues share one thread
        q.gen_view = t.gen.view
    await start_queues(queues)
    report = [{"qid": q.qid, "live": q.live, "failure": -q.failure} for q in queues]
    fwd.writer.write(wire.frame(wire.READY, 0, json.dumps(report).encode()))
    stats.setblocking(False)
    loop.add_reader(stats.fileno(), _answer_stats, stats, queues)
    plans.setblocking(False)
    replans = _Replans(plans, queues)
    loop.add_reader(plans.fileno(), replans.on_readable)
    stop: asyncio.Future[bool | None] = loop.create_future()
    pump = loop.create_task(_pump(reader, fwd, stop))
    abort = await stop
    if abort is None:  # the daemon closed the wire without a stop: nothing to serve for
        for q in queues:
            q.closing = True
        return 1
    await asyncio.gather(*(q.stop_serving(abort) for q in queues))
    fwd.writer.write(wire.frame(wire.STOPPED, 0))
    # The daemon now aborts the connection; every entry comes back, then we are done.
    drained = all(await asyncio.gather(*(q.wait_drained(EXIT_TIMEOUT_S) for q in queues)))
    pump.cancel()
    loop.remove_reader(stats.fileno())
    loop.remove_reader(plans.fileno())
    for q in queues:
        q.release()
    return 0 if drained else 1


async def _pump(
    reader: asyncio.StreamReader, fwd: wire.Forwarder, stop: asyncio.Future[bool | None]
) -> None:
    """The worker's reader of the daemon's frames: replies to forwarded requests, and the
    stop (its ``abort`` flag in the tag). End of stream: ``stop`` gets None."""
    try:
        while True:
            kind, tag, body = await wire.read_frame(reader)
            if kind == wire.REP:
                fwd.reply(tag, body)
            elif kind == wire.STOP and not stop.done():
                stop.set_result(bool(tag))
    except (asyncio.IncompleteReadError, ConnectionError):
        fwd.fail_all()
        if not stop.done():
            stop.set_result(None)


def _answer_stats(sock: socket.socket, queues: list[UringQueue]) -> None:
    """On the worker's loop: counter queries from the daemon, one tag a line; answer the
    newest (older ones were given up on) with one line: its tag, then the JSON."""
    try:
        data = sock.recv(4096)
        if not data:
            return
        tag = data.rstrip(b"\n").rpartition(b"\n")[2]
        info = [q.info() for q in queues]
        sock.setblocking(True)
        sock.sendall(tag + b" " + json.dumps(info).encode() + b"\n")
        sock.setblocking(False)
    except OSError:
        pass


class _Replans:
    """The worker's side of :meth:`WorkerTransport.replan`: take a new plan, one at a time,
    in the order sent."""

    def __init__(self, sock: socket.socket, queues: list[UringQueue]) -> None:
        self.sock = sock
        self.queues = queues
        self.pending: list[tuple[bytes, list[int]]] = []
        self.task: asyncio.Task[None] | None = None

    def on_readable(self) -> None:
        msg = plan_wire.recv_plan(self.sock)
        if msg is None:
            return
        if not msg[0]:  # the daemon closed its end
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            return
        for q in self.queues:
            if q.plan is not None:  # at once: nothing more goes the old way
                q._retired.append(q.plan)
                q.plan = None
        self.pending.append(msg)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._take_all())

    async def _take_all(self) -> None:
        try:
            while self.pending:
                await self._take(*self.pending.pop(0))
        finally:
            self.task = None

    async def _take(self, body: bytes, fds: list[int]) -> None:
        """Wait until no request routed by an old plan is in flight, install the new one,
        close what the old ones held, acknowledge."""
        from qsd_py.block import aio

        queues = self.queues
        while any(q.fast_busy for q in queues):
            await asyncio.sleep(0.0002)
        backend = aio.get_backend("io_uring") if fds else None
        gen, plan = plan_wire.unpack_plan(body, fds, backend)
        for q in queues:
            q.install(plan)
            for old in q._retired:
                if old.gen:  # a plan this worker received, with fds of its own
                    plan_wire.close_plan(old)
            q._retired = [old for old in q._retired if not old.gen]
        self.sock.setblocking(True)
        try:
            self.sock.send(_ACK.pack(gen))
        except OSError:
            pass
        finally:
            self.sock.setblocking(False)
