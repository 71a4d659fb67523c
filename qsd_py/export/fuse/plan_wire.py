"""A fast plan sent to a queue worker process, and the generation that says it is current.

Queue workers (workers.py) are forks of the daemon: the plan they start with (an fd, a
cluster table) is the one of the node the export had at the fork. When the node under the
export changes (a pivot moves the export to the mirror's target, an overlay goes above it, a
child of the chain is replaced, a bitmap or a job closes fast writes), the daemon bumps the
transport's :class:`SharedGen` and sends every worker the plan of the node as it is now:
this module packs it (:func:`pack_plan`: the plan's numbers as JSON, its fds over
``SCM_RIGHTS``: the file's, and for qcow2 the memfds of the cluster table and of its readers'
counters) and rebuilds it on the worker's side (:func:`unpack_plan`).

A worker compares its plan's ``gen`` with the shared generation before each READ or WRITE
(one load from a shared page): a mismatch means a new plan is on its way, and until it is
installed the worker sends its requests to the daemon, whose engine already serves the new
node.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
from typing import Any

from qsd_py.block.fast_io import DAEMON_ONLY, FastPlan
from qsd_py.block.fast_map import _CELL, MAX_READERS

_MAX_FDS = 3
_MAX_MSG = 4096


class SharedGen:
    """One counter in a shared page, made before the fork: the daemon bumps it, the
    workers read it (``view[0]``)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED: the forks see the bumps
        self.view = memoryview(self._map).cast("Q")

    def bump(self) -> int:
        self.view[0] += 1
        return self.view[0]

    def close(self) -> None:
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            pass


class RemoteTable:
    """A worker's mapping of a cluster table the daemon made after the fork: what a
    :class:`FastPlan` reads of a :class:`~qsd_py.block.fast_map.ClusterTable`. Its reader
    slot is the daemon's to claim and give back."""

    def __init__(self, fd: int, counts_fd: int, cluster_bits: int, capacity: int) -> None:
        self.cluster_bits = cluster_bits
        self.capacity = capacity
        self._map = mmap.mmap(fd, capacity * 8)
        self._counters_map = mmap.mmap(counts_fd, MAX_READERS * _CELL)
        self.entries = memoryview(self._map).cast("Q")
        self.counts = memoryview(self._counters_map).cast("Q")

    def unclaim(self, slot: int) -> None:
        """Slots are the daemon's (a worker's plan never gives one back)."""


def reaches(plan: FastPlan | None) -> tuple[Any, ...] | None:
    """What a plan reaches (file, window, cluster table, kind): a change there needs new
    plans in the workers; one of ``writable`` alone does not."""
    if plan is None:
        return None
    return (plan.kind, plan.fd, plan.base, plan.align_mask, plan.read_zeroes,
            plan.inline_max, id(plan.table))  # fmt: skip


def pack_plan(plan: FastPlan | None, gen: int, slot: int) -> tuple[bytes, list[int]]:
    """The message announcing generation ``gen``: ``plan`` (None, or one only the daemon
    can take, an RBD image's: no fast path, every request goes to the daemon) with the
    cluster-table reader ``slot`` claimed for the worker it goes to. Its writes go to the
    daemon: the worker shares neither the fork pages (write gates, bitmaps to mark) nor
    the statistics cells of nodes newer than itself (docs/design.rst, *Plan changes under
    queue workers*)."""
    if plan is None or plan.kind in DAEMON_ONLY:
        return json.dumps({"gen": gen}).encode(), []
    desc: dict[str, Any] = {
        "gen": gen,
        "kind": plan.kind,
        "base": plan.base,
        "align": plan.align_mask + 1,
        "read-zeroes": plan.read_zeroes,
        "writable": False,
        "inline-max": plan.inline_max,
    }
    fds = [] if plan.fd < 0 else [plan.fd]
    table = plan.table
    if table is not None:
        desc.update(slot=slot, bits=table.cluster_bits, capacity=table.capacity)
        fds += [table.fd, table.counts_fd]
    return json.dumps(desc).encode(), fds


def unpack_plan(body: bytes, fds: list[int], backend: Any) -> tuple[int, FastPlan | None]:
    """``(gen, plan)`` from a :func:`pack_plan` message, its I/O on ``backend`` (the worker's
    io_uring backend). The plan owns the file's fd from now on (:func:`close_plan`); the
    table's fds are closed once mapped."""
    desc = json.loads(body)
    if "kind" not in desc:
        return desc["gen"], None
    table = None
    if "slot" in desc:
        table = RemoteTable(fds[-2], fds[-1], desc["bits"], desc["capacity"])
        for fd in fds[-2:]:
            os.close(fd)
        fds = fds[:-2]
    plan = FastPlan(
        desc["kind"],
        fd=fds[0] if fds else -1,
        base=desc["base"],
        align=desc["align"],
        read_zeroes=desc["read-zeroes"],
        writable=desc["writable"],
        backend=backend if fds else None,
        inline_max=desc["inline-max"],
        table=table,  # type: ignore[arg-type]
        slot=desc.get("slot", -1),
    )
    plan.gen = desc["gen"]
    return plan.gen, plan


def close_plan(plan: FastPlan) -> None:
    """A worker's received plan is done with: close its file's fd (the tables' mappings
    go with the last view)."""
    if plan.fd >= 0:
        os.close(plan.fd)
        plan.fd = -1


def send_plan(sock: socket.socket, body: bytes, fds: list[int]) -> None:
    socket.send_fds(sock, [body], fds)


def recv_plan(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """The next plan message, or None (nothing yet, or the daemon is gone: empty body)."""
    try:
        body, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MSG, _MAX_FDS)
    except BlockingIOError:
        return None
    return body, fds
