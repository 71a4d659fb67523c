"""The snapshot actions of ``transaction`` both daemons are held to (test_txn_snapshot.py):
external snapshots (blockdev-snapshot, -sync) and internal ones taken and undone by a
later failure, an export that follows and comes back, a bitmap added on an overlay made
in the same transaction. ``python txn_snapshot_script.py`` records QEMU 11.1's transcript
into data/txn_snapshot_events.json (needs real-qsd)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import snapshot_script as ss

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "txn_snapshot_events.json"
ABORT = {"type": "abort", "data": {}}


def _tx(*actions: dict[str, Any]) -> list[Any]:
    return ["transaction", {"actions": list(actions)}]


def _snap(node: str, overlay: str) -> dict[str, Any]:
    return {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}


def _sync(node: str, file: str, new: str) -> dict[str, Any]:
    data = {"node-name": node, "snapshot-file": file, "snapshot-node-name": new}
    return {"type": "blockdev-snapshot-sync", "data": data}


def _internal(device: str, name: str) -> dict[str, Any]:
    return {"type": "blockdev-snapshot-internal-sync", "data": {"device": device, "name": name}}


def _bm(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": name}}


GRAPH = ["query-named-block-nodes", {"flat": True}]
EXPORTS = ["query-block-exports", None]
SCRIPT: list[list[Any]] = [
    ss._qcow2("base", "base"),
    ss._qcow2("ovl", "ovl", backing=None),
    ss._qcow2("other", "other"),
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}],
    ["block-export-add", {"type": "nbd", "id": "e0", "node-name": "base", "writable": True}],
    _tx(_snap("base", "ovl"), ABORT), EXPORTS, GRAPH,
    _tx(_sync("base", "s1.qcow2", "s1"), ABORT), EXPORTS, GRAPH,
    _tx(_internal("other", "sn1"), ABORT), GRAPH,
    _tx(_internal("other", "sn1"), _internal("other", "sn1")), GRAPH,
    _tx(_internal("other", "sn1"), _internal("other", "sn2"), _snap("base", "ovl")),
    EXPORTS, GRAPH,
    _tx(_sync("ovl", "s2.qcow2", "s2"), _bm("s2", "b"), _internal("s2", "x"), ABORT),
    EXPORTS, GRAPH,
    _tx(_sync("ovl", "s2.qcow2", "s2"), _bm("s2", "b"), _internal("s2", "x")),
    EXPORTS, GRAPH,
]  # fmt: skip


def _graph(reply: dict[str, Any]) -> Any:
    """Each named node: its backing node, read-only flag, bitmaps and snapshots' names."""
    out = {}
    for node in reply["return"]:
        image = node["image"]
        out[node["node-name"]] = {
            "ro": node["ro"],
            "backing": node.get("backing_file"),
            "bitmaps": [b["name"] for b in node.get("dirty-bitmaps", [])],
            "snapshots": [s["name"] for s in image.get("snapshots", [])],
        }
    return out


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import Daemon

    ss.make_images(workdir)
    for name in ("s1", "s2"):
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
    daemon = Daemon(workdir, real)
    out: list[Any] = []
    try:
        for name, args in SCRIPT:
            reply = daemon.cmd(name, args)
            if name == "query-named-block-nodes":
                reply = _graph(reply)
            out.append([name, reply, daemon.events()])
    finally:
        daemon.close()
    facts = ss.image_facts(workdir)
    for fact in facts.values():
        fact.pop("header")  # internal snapshots' dates are in it
    return ss.normalise([*out, {"images": facts}])


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "txn-snapshot")
