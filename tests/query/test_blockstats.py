"""query-block, query-blockstats and the write threshold, against a model of what the test
wrote: through FUSE-over-io_uring (served by the queue worker processes' fast path), over
/dev/fuse, over NBD, and through the node (forwarded requests)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from querykit import new_daemon, reply

from qsd_py.block.stats import HIGHEST, MAX_ROWS, WORDS

MiB = 1 << 20


def _pwrite_direct(path: Path, offset: int, data: bytes) -> None:
    import mmap

    buf = mmap.mmap(-1, max(len(data), mmap.PAGESIZE))
    buf[: len(data)] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [memoryview(buf)[: len(data)]], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def _pread_direct(path: Path, offset: int, size: int) -> bytes:
    import mmap

    buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [memoryview(buf)[:size]], offset) == size
        return buf[:size]
    finally:
        os.close(fd)
        buf.close()


def _cmd(client: Any, name: str, args: dict[str, Any]) -> Any:
    answer = client.cmd_raw(name, args)
    assert "return" in answer, answer
    return answer["return"]


def _by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["node-name"]: e for e in entries}


def _events(client: Any, name: str, wait: float = 2.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found += [e["data"] for e in client.get_events(wait=False) if e["event"] == name]
        if found:
            return found
        time.sleep(0.02)
    return found


async def test_shape_and_order(tmp_path: Path) -> None:
    """QEMU's shape: no BlockBackend entries; with query-nodes every node in creation
    order, all BlockBackend counters 0, the file driver's discard counters, the data child
    nested as ``parent``."""
    daemon, _ = new_daemon()
    img = tmp_path / "a.img"
    img.write_bytes(bytes(MiB))
    await reply(daemon, "blockdev-add", {"driver": "file", "node-name": "f0",
                                         "filename": str(img), "discard": "unmap"})  # fmt: skip
    await reply(daemon, "blockdev-add", {"driver": "raw", "node-name": "d0", "file": "f0",
                                         "discard": "unmap"})  # fmt: skip
    await reply(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n0"})
    assert await reply(daemon, "query-block", {}) == []
    assert await reply(daemon, "query-blockstats", {}) == []
    entries = await reply(daemon, "query-blockstats", {"query-nodes": True})
    assert [e["node-name"] for e in entries] == ["f0", "d0", "n0"]
    f0, d0, n0 = entries
    assert set(f0) == {"node-name", "stats", "driver-specific"}
    assert f0["driver-specific"] == {"driver": "file", "discard-nb-ok": 0,
                                     "discard-nb-failed": 0, "discard-bytes-ok": 0}  # fmt: skip
    assert d0["parent"] == f0 and "parent" not in n0 and "driver-specific" not in n0
    stats = d0["stats"]
    assert stats["timed_stats"] == [] and stats["account_failed"] is True
    assert "idle_time_ns" not in stats  # as QEMU's: only once a request was counted
    assert {k for k, v in stats.items() if v not in (0, True, [])} == set()
    assert list(stats)[-3:] == ["account_invalid", "account_failed", "timed_stats"]
    node = daemon.graph.lookup("d0")
    await node.write(4096, b"x" * 512)
    await node.write_zeroes(8192, 4096)
    await node.discard(0, 65536)  # no wr_highest_offset for discards, as in QEMU
    await node.read(0, memoryview(bytearray(1024)))
    await node.flush()
    entries = _by_name(await reply(daemon, "query-blockstats", {"query-nodes": True}))
    assert entries["d0"]["stats"]["wr_highest_offset"] == 12288
    assert entries["f0"]["stats"]["wr_highest_offset"] == 12288
    want = {"rd_bytes": 1024, "wr_bytes": 4608, "unmap_bytes": 65536, "rd_operations": 1,
            "wr_operations": 2, "flush_operations": 1, "unmap_operations": 1,
            "wr_highest_offset": 12288}  # fmt: skip
    for name in ("d0", "f0"):  # raw passes each request to its file once
        stats = entries[name]["stats"]
        assert {k: v for k, v in stats.items() if type(v) is int and v} == {
            **want, "idle_time_ns": stats["idle_time_ns"]}  # fmt: skip
        keys = list(stats)
        assert keys[keys.index("unmap_merged") + 1] == "idle_time_ns"  # QEMU's place
    assert 0 < entries["d0"]["stats"]["idle_time_ns"] < 60 * 10**9
    assert entries["n0"]["stats"]["rd_operations"] == 0
    assert entries["f0"]["driver-specific"]["discard-nb-ok"] == 1
    assert entries["f0"]["driver-specific"]["discard-bytes-ok"] == 65536


async def test_threshold_fires_once_then_disarms(tmp_path: Path) -> None:
    daemon, events = new_daemon()
    await reply(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n0"})
    answer = await reply(
        daemon, "block-set-write-threshold", {"node-name": "zz", "write-threshold": 1}
    )
    assert answer == ("error", "Device 'zz' not found")
    await reply(daemon, "block-set-write-threshold", {"node-name": "n0", "write-threshold": 65536})
    infos = await reply(daemon, "query-named-block-nodes", {})
    assert infos[0]["write_threshold"] == 65536
    node = daemon.graph.lookup("n0")
    await node.write(0, bytes(4096))
    await node.write(61440, bytes(8192))  # ends 4096 past it
    await node.write(MiB, bytes(4096))  # disarmed: nothing more
    assert events.take() == [{"event": "BLOCK_WRITE_THRESHOLD", "data": {
        "node-name": "n0", "amount-exceeded": 4096, "write-threshold": 65536}}]  # fmt: skip
    assert (await reply(daemon, "query-named-block-nodes", {}))[0]["write_threshold"] == 0
    await reply(daemon, "block-set-write-threshold", {"node-name": "n0", "write-threshold": MiB})
    await node.discard(MiB, 65536)  # discards cross it too
    assert [e["data"]["amount-exceeded"] for e in events.take()] == [65536]


def _start(qsd: Callable[..., Any], tmp_path: Path, uring: str) -> tuple[Any, Path, Path]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    mnt = tmp_path / "disk.raw"
    mnt.touch()
    sock = tmp_path / "nbd.sock"
    daemon = qsd(
        "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=on,discard=unmap",
        "--blockdev", "driver=raw,node-name=d0,file=f0,offset=65536,size=2097152,discard=unmap",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=fuse,id=e0,node-name=d0,mountpoint={mnt},writable=on,io_uring={uring}",
    )  # fmt: skip
    return daemon, mnt, sock


def _nbd_write(sock: Path, offset: int, size: int, op: str = "write") -> None:
    uri = f"nbd+unix:///d0?socket={sock}"
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"{op} {offset} {size}", uri],
                   check=True, capture_output=True)  # fmt: skip


@pytest.mark.parametrize("uring", ["on", "off"])
def test_model_through_every_transport(
    qsd: Callable[..., Any], tmp_path: Path, uring: str, request: pytest.FixtureRequest
) -> None:
    """Random writes through the mount (io_uring: the workers' fast path) and over NBD:
    each node's wr_highest_offset is the highest end the model computes for it (the raw
    node's window shifts the file's by 64 KiB), and a threshold armed on the file node
    fires once for the first write past it, whichever process served the write."""
    if uring == "on":
        request.getfixturevalue("uring_knob")
    daemon, mnt, sock = _start(qsd, tmp_path, uring)
    client = daemon.qmp()
    rng = random.Random(20)
    highest = 0
    try:
        for _ in range(40):
            offset = rng.randrange(0, 1024) * 1024 & ~4095
            size = 4096 * rng.randrange(1, 4)
            _pwrite_direct(mnt, offset, os.urandom(size))
            highest = max(highest, offset + size)
        entries = _by_name(_cmd(client, "query-blockstats", {"query-nodes": True}))
        assert entries["d0"]["stats"]["wr_highest_offset"] == highest
        assert entries["f0"]["stats"]["wr_highest_offset"] == highest + 65536
        _cmd(client, "block-export-del", {"id": "e0"})  # NBD would refuse the FUSE resize
        _events(client, "BLOCK_EXPORT_DELETED")
        _cmd(client, "block-export-add", {"type": "nbd", "id": "e1", "node-name": "d0",
                                        "writable": True})  # fmt: skip
        _nbd_write(sock, 1536 * 1024, 8192)
        entries = _by_name(_cmd(client, "query-blockstats", {"query-nodes": True}))
        assert entries["d0"]["stats"]["wr_highest_offset"] == 1536 * 1024 + 8192
        assert entries["d0"]["parent"]["stats"]["wr_highest_offset"] == 1600 * 1024 + 8192
        # Discards reach the file driver's counters (NBD trims; a FUSE punch-hole is a
        # write-zeroes, which QEMU's file driver does not count as one); none moves
        # wr_highest_offset.
        trims = [(0, 65536), (131072, 4096), (262144, 8192)]
        for offset, size in trims:
            _nbd_write(sock, offset, size, "discard")
        _cmd(client, "block-set-write-threshold", {"node-name": "d0", "write-threshold": 4096})
        _nbd_write(sock, 0, 4096)  # the NBD fast path: not past it
        _nbd_write(sock, 4096, 4096)  # past it: handed to the node, which sends the event
        assert _events(client, "BLOCK_WRITE_THRESHOLD") == [
            {"node-name": "d0", "write-threshold": 4096, "amount-exceeded": 4096}
        ]

        _cmd(client, "block-export-del", {"id": "e1"})
        _events(client, "BLOCK_EXPORT_DELETED")
        _cmd(client, "block-export-add", {"type": "fuse", "id": "e2", "node-name": "d0",
                                        "mountpoint": str(mnt), "writable": True,
                                        "io_uring": uring == "on"})  # fmt: skip
        subprocess.run(["fallocate", "-p", "-o", "524288", "-l", "65536", str(mnt)], check=True)
        entries = _by_name(_cmd(client, "query-blockstats", {"query-nodes": True}))
        assert entries["f0"]["driver-specific"] == {
            "driver": "file",
            "discard-nb-ok": len(trims),
            "discard-nb-failed": 0,
            "discard-bytes-ok": sum(size for _, size in trims),
        }
        assert entries["d0"]["stats"]["wr_highest_offset"] == 1536 * 1024 + 8192
        threshold = 1600 * 1024 + 8192 + 100  # on f0, in file offsets
        _cmd(client, "block-set-write-threshold", {"node-name": "f0", "write-threshold": threshold})
        _pwrite_direct(mnt, 0, os.urandom(4096))  # below: served fast, no event
        assert _events(client, "BLOCK_WRITE_THRESHOLD", wait=0.2) == []
        _pwrite_direct(mnt, 1600 * 1024, os.urandom(8192))  # ends at 1664 KiB + 8 KiB
        _pwrite_direct(mnt, 1700 * 1024, os.urandom(4096))  # disarmed by then
        events = _events(client, "BLOCK_WRITE_THRESHOLD")
        assert events == [{"node-name": "f0", "write-threshold": threshold,
                           "amount-exceeded": 1664 * 1024 + 8192 - threshold}]  # fmt: skip
        assert _events(client, "BLOCK_WRITE_THRESHOLD", wait=0.2) == []
        entries = _by_name(_cmd(client, "query-blockstats", {"query-nodes": True}))
        assert entries["d0"]["stats"]["wr_highest_offset"] == 1704 * 1024
        named = _by_name(_cmd(client, "query-named-block-nodes", {"flat": True}))
        assert named["f0"]["write_threshold"] == 0
    finally:
        client.close()


def test_rows_are_per_process() -> None:
    """The layout the fast path relies on: two cache lines per process row."""
    from qsd_py.block.stats import NodeStats

    st = NodeStats()
    st.cells[3 * WORDS + HIGHEST] = 5000
    st.wrote(100)
    assert st.highest() == 5000 and len(st.cells) == MAX_ROWS * 16 == MAX_ROWS * WORDS
    assert json.dumps(st.highest())


def _host_end(image: Path, offset: int, size: int) -> int:
    """Where the guest range ends in the qcow2 file (qemu-img map: one data extent)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    for ext in json.loads(out):
        if ext["start"] <= offset and offset + size <= ext["start"] + ext["length"]:
            assert ext["data"] and "offset" in ext, ext
            return ext["offset"] + offset - ext["start"] + size
    raise AssertionError(f"no single extent holds {offset}+{size}")


def test_qcow2_through_the_workers_cluster_table(
    qsd: Callable[..., Any], tmp_path: Path, uring_knob: Path
) -> None:
    """qcow2 over FUSE-over-io_uring: a write into a fresh cluster is allocated by the
    daemon and its data written by the worker through the cluster table; the qcow2 node's
    value is the guest end and the file node's the host end of that write (qemu-img map
    says where it lies): only the worker saw either."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "4M"],
                   check=True, capture_output=True)  # fmt: skip
    mnt = tmp_path / "disk.raw"
    mnt.touch()
    daemon = qsd(
        "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=on",
        "--blockdev", "driver=qcow2,node-name=d0,file=f0",
        "--export", f"type=fuse,id=e0,node-name=d0,mountpoint={mnt},writable=on,io_uring=on",
    )  # fmt: skip
    client = daemon.qmp()
    try:
        _pwrite_direct(mnt, 3 * MiB + 61440, os.urandom(4096))  # the end of its cluster
        _pwrite_direct(mnt, 3 * MiB, os.urandom(4096))  # in place, below both ends
        before = _counters(client)
        _pread_direct(mnt, MiB, 8192)  # unallocated: zeroes, the file is not read
        _pread_direct(mnt, 3 * MiB, 4096)  # the data: the file is read
        stats = _by_name(_cmd(client, "query-blockstats", {"query-nodes": True}))
        queues = _cmd(client, "x-query-fuse-queues", {"id": "e0"})
    finally:
        client.close()
    assert daemon.stop() == 0  # the image closed, its lock gone: qemu-img may read it
    assert stats["d0"]["stats"]["wr_highest_offset"] == 3 * MiB + 65536
    assert stats["f0"]["stats"]["wr_highest_offset"] == _host_end(image, 3 * MiB + 61440, 4096)
    assert sum(q["bytes-written"] for q in queues[0]["uring-queues"]) == 8192
    d0, f0 = stats["d0"]["stats"], stats["f0"]["stats"]
    assert (d0["wr_operations"], d0["wr_bytes"], d0["rd_operations"], d0["rd_bytes"]) == (
        2, 8192, 2, 12288)  # fmt: skip
    assert f0["rd_operations"] - before["f0"]["rd_operations"] == 1
    assert f0["rd_bytes"] - before["f0"]["rd_bytes"] == 4096


def test_threads_mark_rows_of_their_own() -> None:
    """Two threads of one process never share a cell (a read-compare-store of one could
    undo the other's); a thread's row is given back when the thread is gone."""
    import threading

    from qsd_py.block import stats

    st = stats.NodeStats()
    rows: list[int] = []

    def write(end: int) -> None:
        st.wrote(end)
        rows.append(stats.process_row())

    threads = [threading.Thread(target=write, args=(e,)) for e in (100, 200)]
    for t in threads:
        t.start()
        t.join()
    assert 0 not in rows and len(set(rows)) == 2  # the first thread's object still exists
    assert [st.cells[r * WORDS + HIGHEST] for r in rows] == [100, 200]
    assert st.highest() == 200 and st.cells[HIGHEST] == 0
    del threads, t
    import gc

    gc.collect()
    assert all(r in stats._free_rows for r in rows)


# --- the counters against a model of the requests a client made -----------------------------
_COUNTERS = (
    "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
    "flush_operations", "unmap_operations", "failed_rd_operations", "failed_wr_operations",
    "failed_flush_operations", "failed_unmap_operations",
)  # fmt: skip


def _requests(seed: int, kinds: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """Random requests (kind, offset, size) inside the 2 MiB node, 4 KiB aligned (O_DIRECT)."""
    rng = random.Random(seed)
    out = []
    for _ in range(60):
        size = 4096 * rng.randrange(1, 17)
        out.append((rng.choice(kinds), rng.randrange(0, (2 * MiB - size) // 4096) * 4096, size))
    return out


def _model(requests: list[tuple[str, int, int]], as_op: dict[str, str]) -> dict[str, int]:
    """What a node counts for ``requests``: ``as_op`` says which counter each kind is."""
    want = dict.fromkeys(_COUNTERS, 0)
    for kind, _offset, size in requests:
        op = as_op[kind]
        want[f"{op}_operations"] += 1
        if op != "flush":
            want[f"{op}_bytes"] += size
    return want


def _counters(client: Any) -> dict[str, dict[str, int]]:
    entries = _by_name(_cmd(client, "query-blockstats", {"query-nodes": True}))
    return {n: {k: e["stats"][k] for k in _COUNTERS} for n, e in entries.items()}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in _COUNTERS}


def _through_fuse(mnt: Path, requests: list[tuple[str, int, int]]) -> int:
    """The requests on one O_DIRECT descriptor of the mount (its close's FLUSH comes after
    the counters are read: the caller closes it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    buf = mmap.mmap(-1, 64 * 1024)
    fd = os.open(mnt, os.O_RDWR | os.O_DIRECT)
    try:
        for kind, offset, size in requests:
            view = memoryview(buf)[:size]
            if kind == "write":
                buf[:size] = os.urandom(size)
                assert os.pwritev(fd, [view], offset) == size
            elif kind == "read":
                assert os.preadv(fd, [view], offset) == size
            elif kind == "punch":
                rc = libc.fallocate(fd, punch, ctypes.c_long(offset), ctypes.c_long(size))
                assert rc == 0, os.strerror(ctypes.get_errno())
            else:
                os.fsync(fd)
            view.release()
    except BaseException:
        os.close(fd)
        raise
    return fd


def _through_nbd(sock: Path, requests: list[tuple[str, int, int]]) -> None:
    """The requests from one libnbd connection (nbdsh), simple replies: every read is one
    read of the node (a structured read may answer holes from block status alone)."""
    lines = ["h.set_request_structured_replies(False)",
             f"h.connect_uri('nbd+unix:///d0?socket={sock}')"]  # fmt: skip
    for kind, offset, size in requests:
        lines.append({
            "write": f"h.pwrite(b'x' * {size}, {offset})",
            "read": f"assert len(h.pread({size}, {offset})) == {size}",
            "trim": f"h.trim({size}, {offset})",
            "zero": f"h.zero({size}, {offset})",
            "flush": "h.flush()",
        }[kind])  # fmt: skip
    lines.append("h.shutdown()")
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}  # its python3
    done = subprocess.run(["nbdsh", "-c", "\n".join(lines)], capture_output=True, timeout=60,
                          env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("transport", ["fuse-uring", "devfuse", "nbd", "nbd-iothread"])
def test_counters_equal_the_model(
    qsd: Callable[..., Any], tmp_path: Path, transport: str, request: pytest.FixtureRequest
) -> None:
    """Reads, writes, discards and flushes through one transport: the exported raw node's
    counters (and its file's: raw passes each request down once) grow by exactly what the
    model of those requests says. FUSE-over-io_uring: reads and writes served by the queue
    worker processes' fast path (their rows of the shared page), the rest forwarded to the
    daemon; a FUSE punch-hole is a write of zeroes, as QEMU's export makes it."""
    uring = "on" if transport == "fuse-uring" else "off"
    if uring == "on":
        request.getfixturevalue("uring_knob")
    daemon, mnt, sock = _start(qsd, tmp_path, uring)
    client = daemon.qmp()
    try:
        if transport.startswith("nbd"):
            _cmd(client, "block-export-del", {"id": "e0"})
            _events(client, "BLOCK_EXPORT_DELETED")
            where = {}
            if transport == "nbd-iothread":  # counted in the iothread's row of its own
                _cmd(client, "object-add", {"qom-type": "iothread", "id": "io0"})
                where = {"iothread": "io0"}
            _cmd(client, "block-export-add", {"type": "nbd", "id": "e1", "node-name": "d0",
                                            "writable": True, **where})  # fmt: skip
            requests = _requests(7, ("write", "read", "trim", "zero", "flush", "write", "read"))
            as_op = {"write": "wr", "zero": "wr", "read": "rd", "trim": "unmap", "flush": "flush"}
        else:
            requests = _requests(8, ("write", "read", "punch", "fsync", "write", "read"))
            as_op = {"write": "wr", "punch": "wr", "read": "rd", "fsync": "flush"}
        before = _counters(client)
        if transport.startswith("nbd"):
            _through_nbd(sock, requests)
        else:
            fd = _through_fuse(mnt, requests)
        after = _counters(client)
        if not transport.startswith("nbd"):
            os.close(fd)
        if uring == "on":
            queues = _cmd(client, "x-query-fuse-queues", {"id": "e0"})[0]["uring-queues"]
            reads = sum(size for kind, _, size in requests if kind == "read")
            assert sum(q["bytes-read"] for q in queues) == reads  # served by the workers
    finally:
        client.close()
    want = _model(requests, as_op)
    assert _delta(after["d0"], before["d0"]) == want
    assert _delta(after["f0"], before["f0"]) == want


async def test_failed_requests_are_counted_apart(tmp_path: Path) -> None:
    """A request that fails counts in ``failed_*`` of every node it failed in (blkdebug
    fails the qcow2 node's data reads after its first one) and moves no bytes; the
    requests that succeeded beside it keep their own counts."""
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "1M"],
                   check=True, capture_output=True)  # fmt: skip
    daemon, _ = new_daemon()
    await reply(daemon, "blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": {
        "driver": "blkdebug", "node-name": "dbg", "inject-error": [
            {"event": "read_aio", "errno": 5}],
        "image": {"driver": "file", "node-name": "f0", "filename": str(image)}}})  # fmt: skip
    node = daemon.graph.lookup("q0")
    before = _by_name(await reply(daemon, "query-blockstats", {"query-nodes": True}))
    await node.write(0, b"y" * 4096)
    for _ in range(2):
        with pytest.raises(OSError):
            await node.read(0, memoryview(bytearray(4096)))
    after = _by_name(await reply(daemon, "query-blockstats", {"query-nodes": True}))
    q0 = after["q0"]["stats"]
    assert {k: q0[k] for k in _COUNTERS} == {
        **dict.fromkeys(_COUNTERS, 0), "wr_operations": 1, "wr_bytes": 4096,
        "failed_rd_operations": 2}  # fmt: skip
    dbg = _delta(after["dbg"]["stats"], before["dbg"]["stats"])
    assert dbg["failed_rd_operations"] == 2
    f0 = _delta(after["f0"]["stats"], before["f0"]["stats"])
    assert f0["failed_rd_operations"] == 0  # the file never saw the failed reads
    assert f0["rd_operations"] == dbg["rd_operations"]  # blkdebug passes the rest on


def test_fast_request_that_fails_moves_to_failed() -> None:
    """What a transport does when a fast transfer that ``route`` counted fails: the
    request leaves rd_*/wr_* of every node of the chain for failed_*; one handed to the
    node after all (``redone``) only leaves, as the node counts it again."""
    from qsd_py.block import fast_io, stats

    top, below = stats.NodeStats(), stats.NodeStats()
    plan = fast_io.FastPlan(fast_io.NULL)
    plan.tally, plan.tally_below = (top.cells,), (below.cells,)
    for node in (top, below):
        node.account(stats.RD_OPS, stats.RD_BYTES, 512)  # one the node served itself
    fast_io._tally(plan, plan.tally, False, 4096)
    fast_io._tally(plan, plan.tally_below, False, 4096)
    fast_io.failed(plan, 4096, False)
    fast_io._tally(plan, plan.tally, True, 8192)
    fast_io._tally(plan, plan.tally_below, True, 8192)
    fast_io.failed(plan, 8192, True, redone=True)
    for node in (top, below):
        totals = node.totals()
        assert [totals[w] for w in (stats.RD_OPS, stats.RD_BYTES, stats.FAILED_RD,
                                    stats.WR_OPS, stats.WR_BYTES, stats.FAILED_WR)] == [
            1, 512, 1, 0, 0, 0]  # fmt: skip
        assert totals[stats.LAST_IO] > 0


async def test_route_counts_each_node_and_gives_back_at_a_threshold(
    graph: Any, tmp_path: Path
) -> None:
    """The fast write counts every node of a raw-over-file chain (the raw window shifts the
    file's highest end); one that would cross the file node's armed threshold goes to the
    node with no count left behind on the raw node above it; a node below with a bitmap to
    mark (byte 1 of its fork page) closes fast writes, the exported node's does not (its
    queues mark it: ``listed``)."""
    from qsd_py.block import fast_io, stats

    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(2 * MiB))
    top = await graph.add({"driver": "raw", "node-name": "r", "offset": 65536,
                           "file": {"driver": "file", "filename": str(image)}})  # fmt: skip
    below = top.children["file"].node
    plan = fast_io.plan_for(top)
    assert plan is not None

    def counts() -> list[tuple[int, int, int]]:
        return [(t[stats.WR_OPS], t[stats.WR_BYTES], t[stats.HIGHEST])
                for t in (top.stats.totals(), below.stats.totals())]  # fmt: skip

    assert fast_io.route(plan, 4096, 4096, True)[0] != fast_io.ENGINE
    assert counts() == [(1, 4096, 8192), (1, 4096, 65536 + 8192)]
    below.stats.cells[stats.THRESHOLD] = 65536 + 12288  # the next write ends past it
    assert fast_io.route(plan, 8192, 8192, True) == (fast_io.ENGINE, 0, 0)
    assert [c[:2] for c in counts()] == [(1, 4096), (1, 4096)]
    below.stats.cells[stats.THRESHOLD] = 0
    below.fork_page[1] = 1
    assert fast_io.route(plan, 8192, 8192, True)[0] == fast_io.ENGINE
    below.fork_page[1] = 0
    top.fork_page[1] = 1
    assert plan.listed[0] and fast_io.route(plan, 8192, 8192, True)[0] != fast_io.ENGINE
    top.fork_page[1] = 0
    assert fast_io.route(plan, 0, 4096, False)[0] != fast_io.ENGINE
    top_totals = top.stats.totals()
    assert (top_totals[stats.RD_OPS], top_totals[stats.WR_OPS]) == (1, 2)


async def test_a_worker_row_below_the_top_is_derived(graph: Any, tmp_path: Path) -> None:
    """What a queue worker's plan counts: the node below the exported raw node takes the
    worker's row from the raw node's (one count per request), reads the same totals and
    its highest end shifted by the window, still stops fast writes at its threshold, and
    gets the counts into its own row when the worker's row is given back; a reused row
    is counted directly."""
    from qsd_py.block import fast_io, stats

    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(2 * MiB))
    top = await graph.add({"driver": "raw", "node-name": "r", "offset": 65536,
                           "file": {"driver": "file", "filename": str(image)}})  # fmt: skip
    below = top.children["file"].node
    row = stats.claim_process_row()
    fast_io.share_counts(fast_io.plan_for(top), row)  # the daemon, before the fork
    stats._local.row = row  # this thread plays the worker (stats.set_process_row)
    try:
        plan = fast_io.plan_for(top)
        assert plan is not None and len(plan.counted) == 1 and len(plan.watched) == 1
        assert fast_io.route(plan, 4096, 4096, True)[0] != fast_io.ENGINE
        assert fast_io.route(plan, 0, 8192, False)[0] != fast_io.ENGINE
        below.stats.cells[stats.THRESHOLD] = 65536 + 12288
        assert fast_io.route(plan, 8192, 8192, True) == (fast_io.ENGINE, 0, 0)
        below.stats.cells[stats.THRESHOLD] = 0
    finally:
        stats._local.row = 0

    def counts(node: Any) -> tuple[int, ...]:
        t = node.stats.totals()
        return (t[stats.WR_OPS], t[stats.WR_BYTES], t[stats.RD_OPS], t[stats.RD_BYTES],
                node.stats.highest())  # fmt: skip

    assert counts(top) == (1, 4096, 1, 8192, 8192)
    assert counts(below) == (1, 4096, 1, 8192, 65536 + 8192)
    at = row * stats.WORDS
    assert not any(below.stats.cells[at : at + stats.WORDS])  # the worker never wrote it
    stats.release_process_row(row)  # the worker is gone
    assert counts(below) == (1, 4096, 1, 8192, 65536 + 8192) and not below.stats.derived
    assert below.stats.cells[at + stats.WR_OPS] == 1
    again = stats.claim_process_row()
    try:
        fast_io.share_counts(fast_io.plan_for(top), again)
        assert again != row or not below.stats.derived  # a used row is not derived
    finally:
        stats.release_process_row(again)
