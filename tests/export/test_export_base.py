"""The generic export base: iothreads, node permissions, delete modes, clean failure.

A small export type written here (a real subclass, serving nothing) goes through the base's
life cycle on a real graph and real iothreads; what is checked is the state the base leaves
behind: the node's users, the iothreads' holds, and QEMU's texts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from qsd_py.block.graph import BlockGraph
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError
from qsd_py.export.base import BlockExport
from qsd_py.objects.registry import ObjectRegistry


class Daemon:
    def __init__(self) -> None:
        self.graph = BlockGraph()
        self.objects = ObjectRegistry()


class ProbeExport(BlockExport):
    """An export type that records what the base asks of it."""

    type = "probe"
    label = "PROBE"
    multithread = False

    def __init__(self, daemon: Any, opts: dict[str, Any], node: Any) -> None:
        super().__init__(daemon, opts, node)
        self.calls: list[str] = []
        self.busy = False
        self.fail_setup = False

    async def setup(self) -> None:
        self.calls.append("setup")
        if self.fail_setup:
            raise QMPError("setup failed")

    async def teardown(self, abort: bool) -> None:
        self.calls.append(f"teardown abort={abort}")

    def in_use(self) -> bool:
        return self.busy


class GrowingExport(ProbeExport):
    type = "grow"
    label = "GROW"
    multithread = True


class NoResizeSharing(ProbeExport):
    """Like QEMU's NBD exports: no resize of its own, and others may not resize meanwhile."""

    resize = False
    shared = PERM_ALL & ~Perm.RESIZE


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    d = Daemon()
    await d.graph.add({"driver": "null-co", "node-name": "n0", "size": 1 << 20})
    await d.graph.add({"driver": "null-co", "node-name": "ro", "read-only": True})
    try:
        yield d
    finally:
        await d.graph.close_all()
        d.objects.stop_all()


def make(cls: type[ProbeExport], daemon: Daemon, **opts: Any) -> ProbeExport:
    full = {"id": "e0", "node-name": "n0", **opts}
    return cls(daemon, full, BlockExport.lookup_node(daemon, full))  # type: ignore[arg-type]


async def test_start_takes_node_and_stop_gives_it_back(daemon: Daemon) -> None:
    exp = make(ProbeExport, daemon, writable=True)
    node = daemon.graph.lookup("n0")
    await exp.start()
    user = node.users["e0"]
    assert user.perm == Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
    assert exp.calls == ["setup"]
    await exp.stop("hard")
    assert "e0" not in node.users
    assert exp.calls == ["setup", "teardown abort=True"]


async def test_read_only_node_refused_as_writable(daemon: Daemon) -> None:
    with pytest.raises(QMPError) as err:
        make(ProbeExport, daemon, **{"node-name": "ro", "writable": True})
    assert err.value.desc == "Cannot export read-only node as writable"
    exp = make(ProbeExport, daemon, **{"node-name": "ro"})
    await exp.start()
    assert daemon.graph.lookup("ro").users["e0"].perm == Perm.CONSISTENT_READ
    await exp.stop("safe")


async def test_safe_stop_refused_while_in_use(daemon: Daemon) -> None:
    exp = make(ProbeExport, daemon)
    await exp.start()
    exp.busy = True
    with pytest.raises(QMPError) as err:
        await exp.stop("safe")
    assert err.value.desc == "export 'e0' still in use"
    assert "e0" in daemon.graph.lookup("n0").users
    await exp.stop("hard")
    assert "e0" not in daemon.graph.lookup("n0").users


async def test_iothread_rules(daemon: Daemon) -> None:
    daemon.objects.add({"qom-type": "iothread", "id": "io0"})
    daemon.objects.add({"qom-type": "iothread", "id": "io1"})
    cases = [
        (
            ProbeExport,
            {"iothread": ["io0", "io1"]},
            "PROBE export does not support multi-threading",
        ),
        (ProbeExport, {"iothread": ["io0"]}, "PROBE export does not support multi-threading"),
        (GrowingExport, {"iothread": []}, "The set of I/O threads must not be empty"),
        (
            GrowingExport,
            {"iothread": ["io0", "io1"], "fixed-iothread": True},
            "Cannot use fixed-iothread for a multi-threaded export",
        ),
        (GrowingExport, {"iothread": ["io0", "nothread"]}, 'iothread "nothread" not found'),
        (ProbeExport, {"iothread": "nothread"}, 'iothread "nothread" not found'),
    ]
    for cls, opts, text in cases:
        exp = make(cls, daemon, **opts)
        with pytest.raises(QMPError) as err:
            await exp.start()
        assert err.value.desc == text
        assert "e0" not in daemon.graph.lookup("n0").users  # nothing left behind
    single = make(ProbeExport, daemon, iothread="io1")
    await single.start()
    assert [t.id for t in single.iothreads] == ["io1"] and not single.multithreaded
    with pytest.raises(QMPError):
        daemon.objects.delete("io1")  # held by the export
    await single.stop("safe")
    multi = make(GrowingExport, daemon, iothread=["io0", "io1"])
    await multi.start()
    assert [t.id for t in multi.iothreads] == ["io0", "io1"] and multi.multithreaded
    await multi.stop("safe")
    daemon.objects.delete("io0")  # free again
    daemon.objects.delete("io1")


async def test_failed_setup_undoes_everything(daemon: Daemon) -> None:
    daemon.objects.add({"qom-type": "iothread", "id": "io0"})
    exp = make(ProbeExport, daemon, iothread="io0", writable=True)
    exp.fail_setup = True
    with pytest.raises(QMPError) as err:
        await exp.start()
    assert err.value.desc == "setup failed"
    assert exp.calls == ["setup", "teardown abort=True"]
    assert "e0" not in daemon.graph.lookup("n0").users
    daemon.objects.delete("io0")


async def test_shared_permissions_are_the_types(daemon: Daemon) -> None:
    """An export that does not share resize keeps a writable (resizing) export off the node."""
    first = make(NoResizeSharing, daemon, writable=True)
    await first.start()
    assert daemon.graph.lookup("n0").users["e0"].perm == Perm.CONSISTENT_READ | Perm.WRITE
    second = make(ProbeExport, daemon, id="e1", writable=True)
    with pytest.raises(QMPError) as err:
        await second.start()
    assert err.value.desc == (
        "Permission conflict on node 'n0': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'n0' as 'root' child) and unshared by an unnamed "
        "block device (uses node 'n0' as 'root' child)."
    )
    assert list(daemon.graph.lookup("n0").users) == ["e0"]
    await first.stop("safe")
    await second.start()
    await second.stop("safe")
