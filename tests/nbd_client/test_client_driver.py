"""The ``nbd`` driver in the test's own loop against qemu-nbd and nbdkit, over UNIX and TCP:
what it reads, writes, zeroes, discards and reports matches what the server holds."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from nbd_servers import NbdServer, ServerFactory, nbd_opts

from qsd_py.block.graph import BlockGraph
from qsd_py.block.node import STATUS_ALLOCATED, STATUS_DATA, STATUS_ZERO
from qsd_py.errors import QMPError

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(params=["unix", "inet"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def data_map(image: Path) -> list[tuple[int, int, bool]]:
    """qemu-img map of a raw image: (start, length, data) runs."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", "-f", "raw", str(image)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [(e["start"], e["length"], e["data"]) for e in json.loads(out.stdout)]


async def node_map(node, length: int) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    offset = 0
    while offset < length:
        st = await node.block_status(offset, length - offset)
        data = bool(st.flags & STATUS_DATA)
        if runs and runs[-1][2] == data:
            runs[-1] = (runs[-1][0], runs[-1][1] + st.length, data)
        else:
            runs.append((offset, st.length, data))
        offset += st.length
    return runs


async def test_io_matches_the_image(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path, transport: str
) -> None:
    image = tmp_path / "disk.img"
    model = bytearray(pattern(MiB)) + bytearray(3 * MiB)
    image.write_bytes(model[:MiB])
    os.truncate(image, 4 * MiB)
    srv = nbd_server("qemu-nbd", str(image), "--discard=unmap", transport=transport)
    node = await graph.add(nbd_opts(srv, discard="unmap"))
    assert node.length() == 4 * MiB

    buf = bytearray(4 * MiB)
    await node.read(0, memoryview(buf))
    assert buf == model

    data = pattern(300 * KiB, 2)
    await node.write(MiB + 123, data)  # unaligned, past the allocated part
    model[MiB + 123 : MiB + 123 + len(data)] = data
    await node.write_zeroes(4096, 8192)  # written as zeroes, stays allocated (NO_HOLE)
    model[4096 : 4096 + 8192] = bytes(8192)
    await node.write_zeroes(512 * KiB, 256 * KiB, unmap=True)  # may become a hole
    model[512 * KiB : 768 * KiB] = bytes(256 * KiB)
    await node.discard(64 * KiB, 64 * KiB)  # punched: reads zeroes afterwards
    model[64 * KiB : 128 * KiB] = bytes(64 * KiB)
    await node.flush()
    assert image.read_bytes() == model
    await node.read(0, memoryview(buf))
    assert buf == model

    assert await node_map(node, 4 * MiB) == data_map(image)
    st = await node.block_status(64 * KiB, MiB)
    assert st.flags & STATUS_ZERO and not st.flags & STATUS_DATA and st.length == 64 * KiB
    st = await node.block_status(0, 4096)
    assert st.flags & STATUS_DATA and st.flags & STATUS_ALLOCATED


async def test_nbdkit_memory_and_tail_past_an_unaligned_size(
    graph: BlockGraph, nbd_server: ServerFactory, transport: str
) -> None:
    """A size that is not whole sectors: the node is rounded up, the rest reads zeroes."""
    srv = nbd_server("nbdkit", "memory", "size=10000", transport=transport)
    node = await graph.add(nbd_opts(srv))
    assert node.length() == 10240
    await node.write(9000, b"x" * 1000)
    buf = bytearray(b"\xff" * 2048)
    await node.read(8192, memoryview(buf))
    assert buf == bytes(808) + b"x" * 1000 + bytes(240)
    st = await node.block_status(10000, 240)
    assert st.flags & STATUS_ZERO


async def test_many_requests_in_flight(graph: BlockGraph, nbd_server: ServerFactory) -> None:
    """nbdkit's delay filter holds every request 10 ms: 256 of them at once only finish in
    time if they are in flight together (replies out of order: test_client_fake_server)."""
    srv = nbd_server("nbdkit", "--filter=delay", "memory", "size=16M", "rdelay=10ms",
                     "wdelay=10ms")  # fmt: skip
    node = await graph.add(nbd_opts(srv))
    blocks = [pattern(4096, i) for i in range(256)]
    await asyncio.gather(*(node.write(i * 65536, b) for i, b in enumerate(blocks)))
    bufs = [bytearray(4096) for _ in blocks]
    await asyncio.gather(*(node.read(i * 65536, memoryview(buf)) for i, buf in enumerate(bufs)))
    assert bufs == blocks


async def test_requests_split_at_the_servers_maximum_and_aligned_to_its_minimum(
    graph: BlockGraph, nbd_server: ServerFactory
) -> None:
    """nbdkit's blocksize-policy filter advertises 512..64 KiB and fails requests outside
    them: large and unaligned requests must still work."""
    srv = nbd_server(
        "nbdkit", "--filter=blocksize-policy", "memory", "size=4M",
        "blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    )  # fmt: skip
    node = await graph.add(nbd_opts(srv))
    info = node.export_info
    assert (info.min_block, info.pref_block, info.max_block) == (512, 4096, 65536)
    assert node.limits()["request-alignment"] == 512
    model = bytearray(4 * MiB)
    data = pattern(MiB + 1000, 3)
    await node.write(777, data)
    model[777 : 777 + len(data)] = data
    # Three read-modify-writes of one block at once: none may undo another.
    await asyncio.gather(node.write(3, b"abc"), node.write(300, b"def"), node.write(0, b"g"))
    model[3:6], model[300:303], model[0:1] = b"abc", b"def", b"g"
    await node.write_zeroes(100, 200 * KiB)
    model[100 : 100 + 200 * KiB] = bytes(200 * KiB)
    buf = bytearray(4 * MiB)
    await node.read(0, memoryview(buf))
    assert buf == model
    small = bytearray(7)
    await node.read(1001, memoryview(small))
    assert small == model[1001:1008]


async def test_server_errors_become_errno(graph: BlockGraph, nbd_server: ServerFactory,
                                          tmp_path: Path) -> None:  # fmt: skip
    trigger = tmp_path / "errors-on"
    srv = nbd_server(
        "nbdkit", "--filter=error", "memory", "size=1M",
        "error=ENOSPC", "error-pwrite-rate=1", f"error-file={trigger}",
        "error-pread=EIO", "error-pread-rate=1",
    )  # fmt: skip
    node = await graph.add(nbd_opts(srv))
    await node.write(0, b"ok")
    trigger.touch()
    with pytest.raises(OSError) as err:
        await node.write(0, b"x" * 512)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as err:
        await node.read(0, memoryview(bytearray(512)))
    assert err.value.errno == errno.EIO
    trigger.unlink()
    buf = bytearray(2)
    await node.read(0, memoryview(buf))  # the connection is fine afterwards
    assert buf == b"ok"


async def test_read_only_export(graph: BlockGraph, nbd_server: ServerFactory,
                                tmp_path: Path) -> None:  # fmt: skip
    image = tmp_path / "ro.img"
    image.write_bytes(b"r" * MiB)
    srv = nbd_server("qemu-nbd", str(image), "--read-only")
    with pytest.raises(QMPError, match="^Could not open image: Permission denied$"):
        await graph.add(nbd_opts(srv))
    node = await graph.add(nbd_opts(srv, **{"read-only": True}))
    assert node.read_only
    node2 = await graph.add(nbd_opts(srv, "n1", **{"auto-read-only": True}))
    assert node2.read_only


async def test_open_errors(graph: BlockGraph, nbd_server: ServerFactory,
                           tmp_path: Path) -> None:  # fmt: skip
    missing = str(tmp_path / "nothing.sock")
    opts = {"driver": "nbd", "node-name": "n0", "server": {"type": "unix", "path": missing}}
    with pytest.raises(QMPError) as err:
        await graph.add(opts)
    assert str(err.value) == f"Failed to connect to '{missing}': No such file or directory"

    image = tmp_path / "x.img"
    image.write_bytes(bytes(MiB))
    srv = nbd_server("qemu-nbd", str(image))
    with pytest.raises(QMPError, match="^Requested export not available$"):
        await graph.add(nbd_opts(srv) | {"export": "other"})
    assert "n0" not in graph


async def test_open_timeout_waits_for_a_late_server(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path
) -> None:
    image = tmp_path / "late.img"
    image.write_bytes(b"L" * MiB)
    srv = nbd_server("qemu-nbd", str(image), wait=False)
    srv.kill()  # not there when the node is opened
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, srv.start, False)
    node = await graph.add(nbd_opts(srv, **{"open-timeout": 10}))
    buf = bytearray(4)
    await node.read(0, memoryview(buf))
    assert buf == b"LLLL"


async def test_server_killed_and_back_within_reconnect_delay_loses_nothing(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path, transport: str
) -> None:
    image = tmp_path / "re.img"
    image.write_bytes(bytes(4 * MiB))
    srv = nbd_server("qemu-nbd", str(image), transport=transport)
    node = await graph.add(nbd_opts(srv, **{"reconnect-delay": 10}))
    await node.write(0, b"before")
    srv.kill()
    blocks = [pattern(64 * KiB, i) for i in range(32)]
    writes = asyncio.gather(*(node.write(i * 64 * KiB, b) for i, b in enumerate(blocks)))
    await asyncio.sleep(0.3)
    assert not writes.done()  # waiting for the server, not failed
    srv.start()
    await asyncio.wait_for(writes, 20)
    await node.flush()
    data = image.read_bytes()
    assert data[: 32 * 64 * KiB] == b"".join(blocks)


async def test_server_killed_mid_io_requests_are_resent(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path
) -> None:
    """Requests in flight when the server dies (held up by nbdkit's delay filter) are sent
    again to the restarted server."""
    state = tmp_path / "state.img"
    state.write_bytes(bytes(MiB))
    srv = nbd_server("nbdkit", "--filter=delay", "file", str(state), "wdelay=200ms")
    node = await graph.add(nbd_opts(srv, **{"reconnect-delay": 10}))
    writes = asyncio.gather(*(node.write(i * 4096, bytes([i + 1]) * 4096) for i in range(16)))
    await asyncio.sleep(0.05)  # all sent, none answered
    srv.restart()
    await asyncio.wait_for(writes, 20)
    await node.flush()
    data = state.read_bytes()
    assert all(data[i * 4096 : (i + 1) * 4096] == bytes([i + 1]) * 4096 for i in range(16))


async def test_server_that_stays_away_fails_requests_with_eio(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path
) -> None:
    image = tmp_path / "gone.img"
    image.write_bytes(bytes(MiB))
    srv = nbd_server("qemu-nbd", str(image))
    node = await graph.add(nbd_opts(srv, **{"reconnect-delay": 1}))
    srv.kill()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(OSError) as err:
        await asyncio.wait_for(node.read(0, memoryview(bytearray(512))), 10)
    assert err.value.errno == errno.EIO
    assert 0.8 < loop.time() - start < 5
    start = loop.time()
    with pytest.raises(OSError) as err:  # after the delay: at once
        await node.read(0, memoryview(bytearray(512)))
    assert loop.time() - start < 0.5
    srv.start()  # back later: the node works again once reconnected
    for _ in range(100):
        try:
            await node.read(0, memoryview(bytearray(512)))
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("node did not reconnect")


async def test_without_reconnect_delay_a_lost_server_fails_at_once(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path
) -> None:
    image = tmp_path / "now.img"
    image.write_bytes(bytes(MiB))
    srv = nbd_server("qemu-nbd", str(image))
    node = await graph.add(nbd_opts(srv))
    srv.kill()
    with pytest.raises(OSError) as err:
        await asyncio.wait_for(node.write(0, b"x" * 512), 5)
    assert err.value.errno == errno.EIO


def test_server_address_in_filename(nbd_server: ServerFactory, tmp_path: Path) -> None:
    unix = NbdServer([], {"type": "unix", "path": "/run/x.sock"})
    inet = NbdServer([], {"type": "inet", "host": "example", "port": "10809"})
    from qsd_py.block.drivers.nbd import NbdNode

    def name(srv: NbdServer, **extra) -> str:
        return NbdNode(BlockGraph(), nbd_opts(srv) | extra).filename()

    assert name(unix) == "nbd+unix:///disk?socket=/run/x.sock"
    assert name(inet) == "nbd://example:10809/disk"
    no_export = {"driver": "nbd", "node-name": "n", "server": unix.addr}
    assert NbdNode(BlockGraph(), no_export).filename() == "nbd+unix://?socket=/run/x.sock"


async def test_x_dirty_bitmap_reads_the_bitmap_through_block_status(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path
) -> None:
    """With x-dirty-bitmap, block status reports the server's bitmap: dirty ranges look
    unallocated (the dirty bit is where base:allocation's hole bit is), as in QEMU."""
    image = tmp_path / "bm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    subprocess.run(["qemu-io", "-c", "write 64k 64k", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    srv = nbd_server("qemu-nbd", str(image), "-f", "qcow2", "-B", "b0", "--read-only")
    bitmap = {"x-dirty-bitmap": "qemu:dirty-bitmap:b0", "read-only": True}
    node = await graph.add(nbd_opts(srv, **bitmap))
    assert [(o, n, d) for o, n, d in await node_map(node, MiB)] == [
        (0, 64 * KiB, True),
        (64 * KiB, 64 * KiB, False),
        (128 * KiB, MiB - 128 * KiB, True),
    ]
    with pytest.raises(QMPError, match="^Could not open image: Invalid argument$"):
        await graph.add(nbd_opts(srv, "n1", **{"x-dirty-bitmap": "b0", "read-only": True}))


async def test_raw_window_over_an_nbd_node(
    graph: BlockGraph, nbd_server: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "raw.img"
    data = pattern(MiB, 4)
    path.write_bytes(data)
    srv = nbd_server("qemu-nbd", str(path))
    raw = await graph.add({"driver": "raw", "node-name": "r0", "offset": 65536, "size": 131072,
                           "file": nbd_opts(srv) | {"node-name": "n0"}})  # fmt: skip
    assert raw.length() == 131072
    buf = bytearray(131072)
    await raw.read(0, memoryview(buf))
    assert buf == data[65536 : 65536 + 131072]
    await raw.write(10, b"window")
    await raw.flush()
    assert path.read_bytes()[65546:65552] == b"window"
    assert raw.info()["file"].startswith("json:")
