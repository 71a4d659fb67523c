"""The host_device driver on a real loop device and on /dev/null: I/O reaches the device,
a device keeps its size, each of ``file``/``host_device`` refuses the other's kind of file
with QEMU 11.1's text, and a block device's queue limits come from sysfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import skip_or_fail

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError

MiB = 1 << 20


@pytest.fixture
def loop_device(image: Callable[..., Path]) -> Iterator[tuple[str, Path]]:
    """A loop device over a 1 MiB sparse file: (device path, backing file)."""
    backing = image(MiB, name="loop-backing")
    made = subprocess.run(
        ["losetup", "--show", "-f", str(backing)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        skip_or_fail(f"no loop device: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


async def test_io_reaches_the_device_and_its_size_is_the_devices(
    graph: BlockGraph, loop_device: tuple[str, Path]
) -> None:
    device, backing = loop_device
    node = await graph.add({"driver": "host_device", "node-name": "d", "filename": device})
    assert node.length() == MiB and node.format_name == "host_device"
    payload = os.urandom(8192)
    await node.write(4096, payload)
    await node.flush()
    assert backing.read_bytes()[4096 : 4096 + 8192] == payload
    buf = bytearray(8192)
    await node.read(4096, memoryview(buf))
    assert bytes(buf) == payload


async def test_a_device_cannot_grow_and_a_smaller_size_changes_nothing(
    graph: BlockGraph, loop_device: tuple[str, Path]
) -> None:
    device, _ = loop_device
    node = await graph.add({"driver": "host_device", "node-name": "d", "filename": device})
    with pytest.raises(OSError, match="Cannot grow device files"):
        await node.truncate(2 * MiB)
    with pytest.raises(OSError, match="Preallocation mode 'falloc' unsupported"):
        await node.truncate(MiB // 2, "falloc")
    await node.truncate(MiB // 2)
    assert node.length() == MiB


async def test_each_driver_refuses_the_others_kind_of_file(
    graph: BlockGraph, loop_device: tuple[str, Path], image: Callable[..., Path]
) -> None:
    device, _ = loop_device
    regular = image(MiB, name="regular")
    with pytest.raises(QMPError) as err:
        await graph.add({"driver": "host_device", "node-name": "r", "filename": str(regular)})
    assert str(err.value) == (
        f"'host_device' driver requires '{regular}' to be either a character or block device"
    )
    with pytest.raises(QMPError) as err:
        await graph.add({"driver": "file", "node-name": "f", "filename": device})
    assert str(err.value) == f"'file' driver requires '{device}' to be a regular file"
    assert graph.find("r") is None and graph.find("f") is None


async def test_block_device_limits_are_the_queues(
    graph: BlockGraph, loop_device: tuple[str, Path]
) -> None:
    device, _ = loop_device
    node = await graph.add({"driver": "host_device", "node-name": "d", "filename": device})
    st = os.stat(device)
    queue = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/queue")
    limits = node.limits()
    assert limits["max-hw-iov"] == int((queue / "max_segments").read_text())
    assert limits["max-hw-transfer"] == int((queue / "max_sectors_kb").read_text()) * 1024
    assert list(limits)[:2] == ["write-zeroes-alignment", "request-alignment"]


async def test_a_character_device_has_no_queue_limits(graph: BlockGraph) -> None:
    node = await graph.add({"driver": "host_device", "node-name": "n", "filename": "/dev/null"})
    assert node.length() == 0
    assert "max-hw-iov" not in node.limits()


@pytest.mark.realqsd
def test_the_conversation_is_qemus() -> None:
    """Adding both drivers on both kinds of file and resizing the device, over a stdio
    monitor: QEMU 11.1's daemon and qsd-py answer alike (the version's package aside)."""
    import json
    import sys

    from realqsd_support import require_real_qsd, shared_dir

    real_qsd = require_real_qsd()
    with shared_dir("host-device") as work:
        regular = work / "regular.img"
        regular.write_bytes(b"")
        os.truncate(regular, MiB)
        device = subprocess.run(
            ["losetup", "--show", "-f", str(regular)], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            adds = [("host_device", "r", str(regular)), ("host_device", "d", device),
                    ("file", "f", device), ("host_device", "n", "/dev/null")]  # fmt: skip
            script = [{"execute": "qmp_capabilities"}]
            script += [
                {"execute": "blockdev-add",
                 "arguments": {"driver": drv, "node-name": name, "filename": path}}
                for drv, name, path in adds
            ]  # fmt: skip
            script += [
                {"execute": "block_resize", "arguments": {"node-name": "d", "size": size}}
                for size in (2 * MiB, MiB // 2, MiB)
            ]
            script.append({"execute": "quit"})
            qmp_in = "".join(json.dumps(cmd) + "\n" for cmd in script)
            argv = ["--chardev", "stdio,id=s", "--monitor", "chardev=s"]

            def talk(prefix: list[str]) -> list[dict]:
                out = subprocess.run([*prefix, *argv], input=qmp_in, capture_output=True,
                                     text=True, timeout=60, check=True).stdout  # fmt: skip
                replies = [json.loads(line) for line in out.splitlines()][1:]
                return [r for r in replies if "event" not in r]

            real = talk([str(real_qsd), "run", "qemu-storage-daemon"])
            ours = talk([sys.executable, "-m", "qsd_py"])
        finally:
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
    assert ours == real
    assert real[1]["error"]["desc"].startswith("'host_device' driver requires")
