"""The driver against QEMU 11.1 on the corpus' run-time damages (damage.py, recorded in
data/qemu-11.1-open.json): each qemu-io command QEMU ran on a fresh copy of a damaged image is
run here through a qcow2 node on a fresh copy too; the request must succeed or fail as it did
in QEMU, the driver must print the lines QEMU printed besides qemu-io's own, and the image's
incompatible feature bits must end up the same (the corrupt bit above all)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import damage
import expectations
import pytest

from qsd_py.block.graph import BlockGraph
from qsd_py.errors import QMPError
from qsd_py.main import PROG

EXPECTED = expectations.load()["damages"]
SIZES = {"k": 1 << 10, "M": 1 << 20}


def runs() -> Iterator[tuple[str, str]]:
    for did, record in EXPECTED.items():
        if record["kind"] == "runtime":
            for key in record:
                if key.startswith("qemu-io "):
                    yield did, key


def number(text: str) -> int:
    if text[-1] in SIZES:
        return int(text[:-1]) * SIZES[text[-1]]
    return int(text, 0)


def options(did: str, d: Path) -> dict[str, Any]:
    """The damage's extra node options, "$DIR" standing for the image's directory."""
    text = repr(damage.DAMAGES[did].options).replace("$DIR", str(d))
    return eval(text)  # noqa: S307 - our own literal dicts of strings


async def run_command(node: Any, command: str) -> str:
    """qemu-io's first line for the command (``read``/``write [-P n]``), our way."""
    words = command.split()
    op, offset, length = words[0], number(words[-2]), number(words[-1])
    try:
        if op == "read":
            await node.read(offset, memoryview(bytearray(length)))
            return f"read {length}/{length} bytes at offset {offset}"
        pattern = number(words[2]) if words[1] == "-P" else 0xCD
        await node.write(offset, bytes([pattern]) * length)
        return f"wrote {length}/{length} bytes at offset {offset}"
    except OSError as err:
        return f"{op} failed: {os.strerror(err.errno or errno.EIO)}"


@pytest.mark.parametrize(("did", "key"), list(runs()))
async def test_runtime_damage_as_in_qemu(
    did: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = EXPECTED[did][key]
    read_only = key.startswith("qemu-io -r ")
    command = key.removeprefix("qemu-io -r ").removeprefix("qemu-io ")
    img = damage.DAMAGES[did].make(tmp_path)
    graph = BlockGraph()
    capsys.readouterr()
    try:
        node = await graph.add(
            {
                "driver": "qcow2",
                "node-name": "q",
                "file": {"driver": "file", "filename": str(img)},
                "read-only": read_only,
                **options(did, tmp_path),
            }
        )
        first = await run_command(node, command)
    finally:
        await graph.close_all()
    printed = capsys.readouterr().err.splitlines()
    assert [first, *printed] == record["output"]
    assert expectations.feature_bits(img).get("incompatible") == record["incompatible after"]


# Where qsd-py answers otherwise than QEMU 11.1 on purpose. QEMU opens a read-only backing
# chain that loops back on itself without end (no reply, memory growing: its record is
# expectations.HANG); read-write, the image's own lock stops it. qsd-py refuses the loop with
# an error that names it, whatever name the chain gives the file again.
def loop(name: str) -> str:
    return f"Backing file '$DIR/{name}' is already in the chain: a loop"


DELIBERATE = {
    ("backing-loop", "read-only"): "Could not open backing file: " * 2 + loop("img.qcow2"),
    ("backing-self", "read-only"): "Could not open backing file: " + loop("img.qcow2"),
    ("backing-self-by-symlink", "read-only"): "Could not open backing file: " + loop("sym.qcow2"),
    ("backing-self-by-hardlink", "read-only"): "Could not open backing file: " + loop("link.qcow2"),
}


async def open_outcome(did: str, img: Path, read_only: bool) -> str:
    """blockdev-add of the damage's image as a qcow2 node over a file node, closed again:
    "ok" or the error's text ("$DIR" for the image's directory); an open that does not end
    is cut off as QEMU's was."""
    d = img.parent
    graph = BlockGraph()
    opts = {
        "driver": "qcow2",
        "node-name": "q",
        "file": {"driver": "file", "filename": str(img)},
        "read-only": read_only,
        **options(did, d),
    }
    try:
        await asyncio.wait_for(graph.add(opts), expectations.OPEN_TIMEOUT)
        return "ok"
    except QMPError as err:
        return err.desc.replace(str(d), "$DIR")
    except TimeoutError:
        return expectations.HANG
    finally:
        await graph.close_all()


def traces(img: Path, header: bytes, features: dict[str, int], stderr: str) -> dict[str, Any]:
    """What an open left behind, as the expectations record it: the lines on stderr (QEMU's
    program name for ours), the header cluster if it changed, the feature bits if they did."""
    found: dict[str, Any] = {}
    lines = [line.replace(str(img.parent), "$DIR") for line in stderr.splitlines()]
    lines = [line.replace(f"{PROG}: ", "qemu-storage-daemon: ", 1) for line in lines]
    if any(line.strip() for line in lines):
        found["stderr"] = [line for line in lines if line.strip()]
    written = expectations.first_cluster(img)
    if written != header:
        found["rewrote header"] = hashlib.sha256(written).hexdigest()
    if expectations.feature_bits(img) != features:
        found["features after"] = expectations.feature_bits(img)
    return found


@pytest.mark.parametrize("mode", ["read-write", "read-only"])
@pytest.mark.parametrize("did", list(EXPECTED))
async def test_open_as_in_qemu(
    did: str, mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every damage of the corpus opened through the driver: it opens where QEMU's did, and
    fails with QEMU's text where QEMU's failed (header, snapshot table, backing chain, data
    file), except for the DELIBERATE differences. It prints what QEMU printed (warnings, the
    repair of a dirty image) and leaves the header as QEMU did (rewritten, repaired, as is)."""
    img = damage.DAMAGES[did].make(tmp_path)
    header, features = expectations.first_cluster(img), expectations.feature_bits(img)
    capsys.readouterr()
    outcome = await open_outcome(did, img, read_only=mode == "read-only")
    record = EXPECTED[did]
    if (did, mode) in DELIBERATE:
        assert record[mode] == expectations.HANG
        assert outcome == DELIBERATE[did, mode]
    else:
        assert outcome == record[mode]
    left = traces(img, header, features, capsys.readouterr().err)
    prefix = f"{mode} "
    qemus = {k.removeprefix(prefix): v for k, v in record.items() if k.startswith(prefix)}
    assert left == qemus
