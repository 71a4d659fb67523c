"""The same conversations held with QEMU 11.1's qemu-storage-daemon and with qsd-py:
query-block, query-blockstats, the write threshold and its event, the block graph,
x-blockdev-change, x-blockdev-set-iothread and transaction (opt-in: --real-qsd)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from jobs.conversation import Daemon
from realqsd_support import shared_dir

pytestmark = pytest.mark.realqsd


def _hold(real: bool, workdir: Path, args: list[str], script: list[Any]) -> list[Any]:
    """Run ``script`` (``[command, args]``, or ``["io", [qemu-io commands]]`` against the
    NBD export ``d0``): each reply, and the events that came within 0.3 s."""
    d = _start(workdir, real, args)
    out: list[Any] = []
    try:
        _wait_started(d, args.count("--export"))
        for name, arg in script:
            if name == "io":
                cmds = [x for c in arg for x in ("-c", c)]
                uri = f"nbd+unix:///d0?socket={workdir / 'nbd.sock'}"
                subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], check=True,
                               capture_output=True)  # fmt: skip
                time.sleep(0.3)
            else:
                out.append({"cmd": name, "args": arg, "reply": _focus(name, d.cmd(name, arg))})
            events = d.events()
            if events:
                out.append({"events": events})
    finally:
        d.close()
    return out


def _start(workdir: Path, real: bool, args: list[str]) -> Daemon:
    """The daemon, connected: its socket file appears at bind(), a moment before listen(),
    so a refused first connection is tried again with a new daemon."""
    from qemu.qmp.protocol import ConnectError

    for attempt in range(3):
        try:
            return Daemon(workdir, real, args)
        except ConnectError:
            if attempt == 2:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _wait_started(d: Daemon, exports: int) -> None:
    """The monitor answers once its own option is done; wait for the options after it."""
    deadline = time.monotonic() + 20
    while len(d.cmd("query-block-exports").get("return", [])) < exports:
        assert time.monotonic() < deadline, "the exports did not come up"
        time.sleep(0.02)


def _focus(name: str, reply: dict[str, Any]) -> dict[str, Any]:
    """query-named-block-nodes: only what these commands change (the write threshold).
    query-blockstats: the counters qsd-py keeps where QEMU's daemon shows zeroes (see
    docs/design.rst) compared by type only; every other member, wr_highest_offset and the
    file driver's discard counters by value."""
    if name == "query-named-block-nodes" and "return" in reply:
        return {n["node-name"]: n["write_threshold"] for n in reply["return"]}
    if name == "query-blockstats" and "return" in reply:
        return {"return": [_stats_shape(e) for e in reply["return"]]}
    return reply


#: BlockDeviceStats members qsd-py counts per node (QEMU's daemon: 0 or false).
COUNTED = {
    "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
    "flush_operations", "unmap_operations", "failed_rd_operations", "failed_wr_operations",
    "failed_flush_operations", "failed_unmap_operations", "account_invalid", "account_failed",
}  # fmt: skip


def _stats_shape(entry: dict[str, Any]) -> dict[str, Any]:
    """A BlockStats entry with the counted members replaced by their type name; the
    optional idle_time_ns (present once qsd-py counted a request) left out."""
    out = dict(entry)
    out["stats"] = {k: type(v).__name__ if k in COUNTED else v
                    for k, v in entry["stats"].items() if k != "idle_time_ns"}  # fmt: skip
    for key in ("parent", "backing"):
        if key in entry:
            out[key] = _stats_shape(entry[key])
    return out


def _both(prefix: str, args: list[str], script: list[Any], images: dict[str, str]) -> None:
    transcripts = []
    for real in (True, False):
        with shared_dir(prefix) as workdir:
            for name, spec in images.items():
                fmt, size = spec.split(":")
                subprocess.run(["qemu-img", "create", "-f", fmt, str(workdir / name), size],
                               check=True, capture_output=True)  # fmt: skip
            (workdir / "mnt").touch()
            transcripts.append(_hold(real, workdir, args, script))
    assert transcripts[1] == transcripts[0]


STATS_ARGS = [
    "--blockdev", "driver=file,node-name=f0,filename=a.qcow2,discard=unmap",
    "--blockdev", "driver=qcow2,node-name=d0,file=f0,discard=unmap",
    "--blockdev", "driver=null-co,node-name=n0",
    "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
    "--export", "type=nbd,id=e0,node-name=d0,writable=on",
]  # fmt: skip

STATS_SCRIPT: list[Any] = [
    ["query-block", None],
    ["query-blockstats", None],
    ["query-blockstats", {"query-nodes": True}],
    ["block-set-write-threshold", {"node-name": "zz", "write-threshold": 100}],
    ["block-set-write-threshold", {"node-name": "d0", "write-threshold": 65536}],
    ["block-set-write-threshold", {"node-name": "f0", "write-threshold": 100}],
    ["query-named-block-nodes", {"flat": True}],
    [
        "io",
        [
            "write 0 4k",
            "write 60k 8k",
            "write 128k 4k",
            "discard 0 4k",
            "write 1M 64k",
            "read 0 4k",
            "discard 1M 64k",
            "flush",
        ],
    ],  # fmt: skip
    ["query-blockstats", {"query-nodes": True}],
    ["query-named-block-nodes", {"flat": True}],
    ["block-set-write-threshold", {"node-name": "d0", "write-threshold": 2097152}],
    ["io", ["write -z 2M 4k", "write 3M 4k"]],
    ["block-set-write-threshold", {"node-name": "n0", "write-threshold": -1}],
    ["block-set-write-threshold", {"node-name": "n0", "write-threshold": 18446744073709551616}],
    ["query-named-block-nodes", {"flat": True}],
    ["query-blockstats", {"query-nodes": True}],
]


def test_blockstats_and_threshold_are_qemus() -> None:
    _both("query-stats", STATS_ARGS, STATS_SCRIPT, {"a.qcow2": "qcow2:4M"})


GRAPH_ARGS = [
    "--object", "iothread,id=io0", "--object", "iothread,id=io1",
    "--blockdev", "driver=file,node-name=f0,filename=a.qcow2",
    "--blockdev", "driver=qcow2,node-name=d0,file=f0",
    "--blockdev", "driver=file,node-name=r0,filename=r.img",
    "--blockdev", "driver=raw,node-name=w0,file=r0,offset=4096,size=1048576",
    "--blockdev", "driver=null-co,node-name=n0",
    "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
    "--export", "type=fuse,id=e0,node-name=d0,writable=on,mountpoint=mnt",
    "--export", "type=nbd,id=e1,node-name=w0,writable=on,iothread=io1,fixed-iothread=on",
]  # fmt: skip

GRAPH_SCRIPT: list[Any] = [
    ["x-debug-query-block-graph", None],
    ["query-block", {"flat": True}],  # FUSE and NBD exports: no named BlockBackend
    ["query-blockstats", None],
    ["x-blockdev-change", {"parent": "zz"}],
    ["x-blockdev-change", {"parent": "d0"}],
    ["x-blockdev-change", {"parent": "d0", "child": "file"}],
    ["x-blockdev-change", {"parent": "d0", "node": "n0"}],
    ["x-blockdev-change", {"parent": "d0", "child": "file", "node": "n0"}],
    ["x-blockdev-change", {"parent": "d0", "child": "zz"}],
    ["x-blockdev-change", {"parent": "d0", "node": "zz"}],
    ["x-blockdev-set-iothread", {"node-name": "zz", "iothread": "io0"}],
    ["x-blockdev-set-iothread", {"node-name": "d0", "iothread": "io0"}],
    ["x-blockdev-set-iothread", {"node-name": "f0", "iothread": "io0"}],
    ["x-blockdev-set-iothread", {"node-name": "d0", "iothread": None, "force": True}],
    ["x-blockdev-set-iothread", {"node-name": "n0", "iothread": "zz"}],
    ["x-blockdev-set-iothread", {"node-name": "n0", "iothread": "io0"}],
    ["x-blockdev-set-iothread", {"node-name": "n0", "iothread": None}],
    ["x-blockdev-set-iothread", {"node-name": "r0", "iothread": "io0"}],
    ["x-blockdev-set-iothread", {"node-name": "w0", "iothread": "io0", "force": True}],
    ["x-blockdev-set-iothread", {"node-name": "r0", "iothread": "io1"}],
    ["block-export-del", {"id": "e1"}],
    ["x-blockdev-set-iothread", {"node-name": "w0", "iothread": "io0"}],
    ["x-debug-query-block-graph", None],
]


def test_graph_change_and_iothread_are_qemus() -> None:
    _both("query-graph", GRAPH_ARGS, GRAPH_SCRIPT, {"a.qcow2": "qcow2:4M", "r.img": "raw:4M"})


ABORT = {"type": "abort", "data": {}}
TRANSACTION_SCRIPT: list[Any] = [
    ["transaction", {"actions": []}],
    ["transaction", {"actions": [ABORT]}],
    ["transaction", {"actions": [{"type": "abort"}]}],
    ["transaction", {"actions": [{"type": "foo", "data": {}}]}],
    ["transaction", {"actions": [{"data": {}}]}],
    ["transaction", {"actions": [ABORT], "properties": {"completion-mode": "grouped"}}],
    ["transaction", {"actions": [ABORT], "properties": {"completion-mode": "individual"}}],
    ["transaction", {"actions": [ABORT], "properties": {}}],
    ["transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]}],
    ["transaction", {"actions": {}}],
    ["transaction", {}],
]


def test_transaction_is_qemus() -> None:
    _both("query-txn", ["--blockdev", "driver=null-co,node-name=n0"], TRANSACTION_SCRIPT, {})


def _shape(info: dict[str, dict[str, Any]], name: str, seen: frozenset[str] = frozenset()) -> Any:
    """A type of a query-qmp-schema answer with its masked names resolved into structure
    (a type met again inside itself becomes a marker: BlockStats nests itself)."""
    if name in seen:
        return "<recursive>"
    seen = seen | {name}
    entry = info[name]
    meta = entry["meta-type"]
    if meta == "builtin":
        return entry["name"]
    if meta == "enum":
        return {"enum": entry["values"]}
    if meta == "array":
        return [_shape(info, entry["element-type"], seen)]
    if meta == "alternate":
        return {"alternate": [_shape(info, m["type"], seen) for m in entry["members"]]}
    shape: dict[str, Any] = {
        "members": [
            (m["name"], "default" in m, _shape(info, m["type"], seen)) for m in entry["members"]
        ]
    }
    if "tag" in entry:
        shape["tag"] = entry["tag"]
        shape["variants"] = {
            v["case"]: _shape(info, v["type"], seen)
            for v in entry["variants"]
            if info[v["type"]].get("members")  # QEMU lists empty branches of every driver
        }
    return shape


OURS_EXACTLY = [
    "query-block", "query-blockstats", "block-set-write-threshold", "BLOCK_WRITE_THRESHOLD",
    "x-debug-query-block-graph", "x-blockdev-change", "x-blockdev-set-iothread",
]  # fmt: skip


def test_schemas_are_qemus() -> None:
    """Arguments, return types and the event exactly QEMU's (query-block's BlockInfo down to
    BlockDeviceInfo, whose own members other tests compare); transaction's actions are
    QEMU's kinds, of which the branches qsd-py implements have QEMU's shape."""
    from qsd_py.qapi.schema import load_schema

    with shared_dir("query-schema") as workdir:
        d = _start(workdir, True, [])
        try:
            theirs = {e["name"]: e for e in d.cmd("query-qmp-schema")["return"]}
        finally:
            d.close()
    ours = {e["name"]: e for e in load_schema().introspect()}
    for name in OURS_EXACTLY:
        for key in ("arg-type", "ret-type"):
            if key not in theirs[name]:
                continue
            mine = _drivers(_shape(ours, ours[name][key]))
            qemu = _drivers(_shape(theirs, theirs[name][key]))
            if name == "query-block" and key == "ret-type":  # BlockDeviceInfo: see test_qapi
                mine, qemu = _names(mine), _names(qemu)
            assert mine == qemu, (name, key)
    mine = _shape(ours, ours["transaction"]["arg-type"])
    qemu = _shape(theirs, theirs["transaction"]["arg-type"])
    action = {"mine": mine["members"][0][2][0], "qemu": qemu["members"][0][2][0]}
    assert action["mine"]["members"] == action["qemu"]["members"]  # the kinds
    for case, branch in action["mine"]["variants"].items():
        assert branch == action["qemu"]["variants"][case]
    assert mine["members"][1] == qemu["members"][1]  # properties


def _drivers(shape: Any) -> Any:
    """BlockStatsSpecific by its ``file`` branch alone: qsd-py's BlockdevDriver lists only
    the drivers it has (as everywhere in its schema), and only file has counters of them."""
    if isinstance(shape, list):
        return [_drivers(x) for x in shape]
    if not isinstance(shape, dict) or "members" not in shape:
        return shape
    if shape.get("tag") == "driver":
        return {"file": _drivers(shape["variants"]["file"])}
    return {**shape, "members": [(n, o, _drivers(t)) for n, o, t in shape["members"]]}


def _names(shape: Any) -> Any:
    """The member names of BlockInfo only."""
    return [m[0] for m in shape[0]["members"]]
