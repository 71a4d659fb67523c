"""The ``transaction`` conversation of the dirty bitmap actions both daemons are held to
(test_txn_transcript.py): each action committed, undone by a later failure (``abort``, a
bad action after it) and refused, with the bitmaps' bits (sha256), states and the image's
list after close. ``python txn_script.py`` records QEMU 11.1's transcript into
data/txn_bitmaps.json (needs real-qsd)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import bitmap_script as bs

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "txn_bitmaps.json"
ABORT = {"type": "abort", "data": {}}


def _bm(kind: str, node: str, name: str, **opts: Any) -> dict[str, Any]:
    return {"type": f"block-dirty-bitmap-{kind}", "data": {"node": node, "name": name, **opts}}


def _merge(node: str, target: str, *bitmaps: Any) -> dict[str, Any]:
    data = {"node": node, "target": target, "bitmaps": list(bitmaps)}
    return {"type": "block-dirty-bitmap-merge", "data": data}


def _tx(*actions: dict[str, Any], **props: Any) -> list[Any]:
    args: dict[str, Any] = {"actions": list(actions)}
    if props:
        args["properties"] = props
    return ["transaction", args]


def make_images(workdir: Path) -> None:
    path = workdir / "t.qcow2"
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), "4M"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "old"], check=True,
                   capture_output=True)  # fmt: skip


QUERY = bs.QUERY
SHAS = [bs._sha("t", name) for name in ("b1", "b2", "old")]
SCRIPT: list[list[Any]] = [
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": bs.NBD}}}],
    bs._q("t"),
    # add: committed, undone by abort, by a duplicate, by a bad action after it
    _tx(_bm("add", "t", "b1"), _bm("add", "t", "b2", granularity=512, disabled=True)),
    _tx(_bm("add", "t", "b3"), ABORT),
    _tx(_bm("add", "t", "b4"), _bm("add", "t", "b4")),
    _tx(_bm("add", "t", "b5", persistent=True), _bm("clear", "t", "zz")),
    _tx(_bm("add", "t", "b6"), **{"completion-mode": "grouped"}),
    QUERY,
    ["block-export-add", {"type": "nbd", "id": "e", "node-name": "t", "name": "e",
                          "writable": True}],
    ["!write", "e", ["write 0 64k", "write 1M 4k", "write 3M 512"]],
    *SHAS,
    # enable/disable and undoing them
    _tx(_bm("enable", "t", "b2"), ABORT), QUERY,
    _tx(_bm("disable", "t", "b1"), _bm("enable", "t", "b2")), QUERY,
    ["!write", "e", ["write 2M 4k"]],
    *SHAS,
    _tx(_bm("disable", "t", "b2"), _bm("enable", "t", "b1"), _bm("disable", "t", "zz")), QUERY,
    # (a failing enable is left out: QEMU 11.1's daemon dies undoing it, its abort
    # dereferences the bitmap its prepare did not find)
    _tx(_bm("enable", "t", "b1"), _bm("disable", "t", "b1")), QUERY,
    # clear and merge, undone and committed
    _tx(_bm("clear", "t", "b1"), ABORT), *SHAS,
    _tx(_merge("t", "b2", "b1", "old"), ABORT), *SHAS,
    _tx(_merge("t", "b2", "b1"), _bm("clear", "t", "b1")), *SHAS,
    _tx(_bm("clear", "t", "b2"), _merge("t", "b2", "old"), _merge("t", "old", "zz")), *SHAS,
    _tx(_bm("add", "t", "b7"), _merge("t", "b7", "b2"), _bm("clear", "t", "b2")),
    *SHAS, bs._sha("t", "b7"),
    # remove: undone (the bitmap usable again), committed, and a name freed only at commit
    _tx(_bm("remove", "t", "old"), ABORT), QUERY,
    _tx(_bm("remove", "t", "b7"), _bm("add", "t", "b7")), QUERY,
    _tx(_bm("remove", "t", "b7"), _bm("clear", "t", "b7")), QUERY,
    _tx(_bm("remove", "t", "b7"), _bm("remove", "t", "b7")), QUERY,
    _tx(_bm("remove", "t", "b7")), QUERY,
    # busy bitmaps (an export uses them)
    ["block-export-add", {"type": "nbd", "id": "e2", "node-name": "t", "name": "e2",
                          "bitmaps": ["b1"]}],
    _tx(_bm("clear", "t", "b1")), _tx(_bm("remove", "t", "b1")), _tx(_bm("disable", "t", "b1")),
    _tx(_merge("t", "b1", "b2")), _tx(_merge("t", "b2", "b1")), *SHAS,
    ["block-export-del", {"id": "e2"}], ["block-export-del", {"id": "e"}], ["!settle"],
    # persistent: added in a transaction and stored; removed, undone, stored again
    _tx(_bm("add", "t", "p1", persistent=True), _bm("add", "t", "p2", persistent=True)),
    _tx(_bm("remove", "t", "p2"), ABORT),
    _tx(_bm("remove", "t", "p1")),
    ["blockdev-del", {"node-name": "t"}], ["!info", "t"],
]  # fmt: skip


def run_script(real: bool, workdir: Path) -> list[Any]:
    import sys

    sys.path[:0] = [str(HERE.parent / "jobs"), str(HERE.parent)]
    from conversation import Daemon

    make_images(workdir)
    daemon = Daemon(workdir, real)
    out: list[Any] = []
    try:
        for step in SCRIPT:
            name = step[0]
            if name == "!settle":
                daemon.events(0.3)
                continue
            if name.startswith("!"):
                out.append([step, bs._tool(workdir, step)])
                continue
            if os.environ.get("TXN_TRACE"):
                print(json.dumps(step)[:200], flush=True)
            reply = daemon.cmd(name, step[1])
            if name == "query-named-block-nodes":
                reply = bs._query(reply)
            out.append([step, reply, daemon.events()])
    finally:
        daemon.close()
    return out


if __name__ == "__main__":
    os.makedirs("/tmp/qsd-cmp/txn-bitmaps", exist_ok=True)
    transcript = run_script(True, Path("/tmp/qsd-cmp/txn-bitmaps"))
    DATA.write_text(json.dumps(transcript, indent=1) + "\n")
