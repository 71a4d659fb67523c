"""The block-dirty-bitmap commands in an in-process daemon: QEMU 11.1's answers (taken from
its qemu-storage-daemon with real-qsd) for every bad case, writes marking the recording
bitmaps as a model says, and what query-named-block-nodes shows."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from qsd_py.daemon import Daemon
from qsd_py.errors import QMPError

NODE_LEN = 1000448  # a null-co node of size=1000000, in whole sectors


async def reply(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await daemon.execute(name, args)
    except QMPError as e:
        return ("error", e.desc)


def bitmaps(daemon: Daemon, node: str) -> list[dict[str, Any]] | None:
    for entry in daemon.graph.query(True):
        if entry["node-name"] == node:
            return entry.get("dirty-bitmaps")
    raise AssertionError(f"no node {node}")


@pytest.fixture
async def daemon() -> Daemon:
    d = Daemon()
    null = {"driver": "null-co", "node-name": "n", "size": 1000000}
    assert await reply(d, "blockdev-add", null) == {}
    return d


async def test_add_errors(daemon: Daemon) -> None:
    add = "block-dirty-bitmap-add"
    assert await reply(daemon, add, {"node": "n", "name": "b0"}) == {}
    gran = "Granularity must be power of 2 and at least 512"
    cases = [
        ({"name": "b0"}, "Bitmap already exists: b0"),
        ({"name": "b1", "granularity": 1000}, gran),
        ({"name": "b1", "granularity": 256}, gran),
        ({"name": "b1", "granularity": 0}, gran),
        ({"name": "b1", "granularity": 1 << 32}, "Parameter 'granularity' expects uint32_t"),
        ({"name": "bp", "persistent": True},
         "Can't store persistent bitmaps to n: Operation not supported"),
        ({"name": ""}, "Bitmap name cannot be empty"),
        ({"node": "nope", "name": "x"}, "Cannot find device='nope' nor node-name='nope'"),
    ]  # fmt: skip
    for args, text in cases:
        assert await reply(daemon, add, {"node": "n", **args}) == ("error", text), args
    assert await reply(daemon, add, {"node": "n", "name": "b1", "granularity": 1 << 31}) == {}
    disabled = {"node": "n", "name": "bd", "disabled": True, "granularity": 512}
    assert await reply(daemon, add, disabled) == {}
    idle = {"persistent": False, "busy": False, "count": 0}
    assert bitmaps(daemon, "n") == [
        {"name": "bd", "recording": False, "granularity": 512, **idle},
        {"name": "b1", "recording": True, "granularity": 1 << 31, **idle},
        {"name": "b0", "recording": True, "granularity": 65536, **idle},
    ]


async def test_missing_bitmaps_and_merge_errors(daemon: Daemon) -> None:
    assert await reply(daemon, "block-dirty-bitmap-add", {"node": "n", "name": "b0"}) == {}
    missing = ("error", "Dirty bitmap 'zz' not found")
    for cmd in ("remove", "clear", "enable", "disable"):
        args = {"node": "n", "name": "zz"}
        assert await reply(daemon, f"block-dirty-bitmap-{cmd}", args) == missing
    sha = "x-debug-block-dirty-bitmap-sha256"
    assert await reply(daemon, sha, {"node": "n", "name": "zz"}) == missing
    merge = "block-dirty-bitmap-merge"
    assert await reply(daemon, merge, {"node": "n", "target": "zz", "bitmaps": ["b0"]}) == missing
    assert await reply(daemon, merge, {"node": "n", "target": "b0", "bitmaps": ["zz"]}) == missing
    external = {"node": "n", "target": "b0", "bitmaps": [{"node": "qq", "name": "zz"}]}
    assert await reply(daemon, merge, external) == ("error", "Node 'qq' not found")
    assert await reply(daemon, "blockdev-add", {"driver": "null-co", "node-name": "m"}) == {}
    assert await reply(daemon, "block-dirty-bitmap-add", {"node": "m", "name": "o"}) == {}
    other = {"node": "n", "target": "b0", "bitmaps": [{"node": "m", "name": "o"}]}
    assert await reply(daemon, merge, other) == (
        "error",
        "Bitmaps are of different sizes (destination size is 1000448, source size is "
        "1073741824) and can't be merged",
    )


async def test_writes_against_model(daemon: Daemon) -> None:
    """Random writes, zeroes and discards through the node; clear, disable, enable and
    merge on the way: count and hash always as the model of the written chunks."""
    rng = random.Random(20)
    node = daemon.graph.find("n")
    assert node is not None
    add = "block-dirty-bitmap-add"
    assert await reply(daemon, add, {"node": "n", "name": "a", "granularity": 4096}) == {}
    assert await reply(daemon, add, {"node": "n", "name": "b", "granularity": 65536}) == {}
    model: dict[str, set[int]] = {"a": set(), "b": set()}
    gran = {"a": 4096, "b": 65536}
    recording = {"a": True, "b": True}
    for step in range(300):
        offset = rng.randrange(NODE_LEN)
        length = min(rng.randint(1, 200_000), NODE_LEN - offset)
        kind = rng.random()
        if kind < 0.6:
            await node.write(offset, bytes(length))
        elif kind < 0.8:
            await node.write_zeroes(offset, length)
        else:
            await node.discard(offset, length)
        for name in model:
            if recording[name]:
                g = gran[name]
                model[name].update(range(offset // g, (offset + length - 1) // g + 1))
        if step % 50 == 49:
            name = rng.choice(["a", "b"])
            what = rng.choice(["clear", "disable", "enable", "merge"])
            if what == "merge":
                src = "b" if name == "a" else "a"
                args = {"node": "n", "target": name, "bitmaps": [src]}
                assert await reply(daemon, "block-dirty-bitmap-merge", args) == {}
                g, gs = gran[name], gran[src]
                last = (NODE_LEN - 1) // g
                for c in model[src]:
                    model[name].update(range(c * gs // g, min(last, ((c + 1) * gs - 1) // g) + 1))
            else:
                args = {"node": "n", "name": name}
                assert await reply(daemon, f"block-dirty-bitmap-{what}", args) == {}
                if what == "clear":
                    model[name].clear()
                else:
                    recording[name] = what == "enable"
        for entry in bitmaps(daemon, "n") or []:
            g = gran[entry["name"]]
            want = len(model[entry["name"]]) * g  # a partial last chunk counts whole
            assert entry["count"] == want, (step, entry)
            assert entry["recording"] == recording[entry["name"]]


async def test_remove_and_readd(daemon: Daemon) -> None:
    add, rm = "block-dirty-bitmap-add", "block-dirty-bitmap-remove"
    assert await reply(daemon, add, {"node": "n", "name": "b"}) == {}
    assert await reply(daemon, rm, {"node": "n", "name": "b"}) == {}
    gone = ("error", "Dirty bitmap 'b' not found")
    assert await reply(daemon, rm, {"node": "n", "name": "b"}) == gone
    assert bitmaps(daemon, "n") is None
    assert await reply(daemon, add, {"node": "n", "name": "b"}) == {}


async def test_persistent_refused_on_read_only_and_v2(tmp_path: Path, daemon: Daemon) -> None:
    import subprocess

    for name, compat in (("ro.qcow2", "1.1"), ("v2.qcow2", "0.10")):
        path = tmp_path / name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}",
                        str(path), "1M"], check=True)  # fmt: skip
    ro = {"driver": "qcow2", "node-name": "r", "read-only": True,
          "file": {"driver": "file", "filename": str(tmp_path / "ro.qcow2")}}  # fmt: skip
    v2 = {"driver": "qcow2", "node-name": "v",
          "file": {"driver": "file", "filename": str(tmp_path / "v2.qcow2")}}  # fmt: skip
    assert await reply(daemon, "blockdev-add", ro) == {}
    assert await reply(daemon, "blockdev-add", v2) == {}
    add = "block-dirty-bitmap-add"
    assert await reply(daemon, add, {"node": "r", "name": "p", "persistent": True}) == (
        "error",
        "Cannot add a persistent bitmap to read-only or inactive node 'r'",
    )
    assert await reply(daemon, add, {"node": "v", "name": "p", "persistent": True}) == (
        "error",
        "Can't make bitmap 'p' persistent in 'v': Cannot store dirty bitmaps in qcow2 v2 files",
    )
    assert await reply(daemon, add, {"node": "r", "name": "t"}) == {}
    await daemon.graph.close_all()
