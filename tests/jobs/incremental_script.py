"""Incremental backup as users run it, held against QEMU 11.1 (test_incremental.py): a
bitmap and a full backup in one transaction, writes (some while the backup runs), then
incremental backups into qcow2 overlays of the previous backup; each backup read through
its chain equals the source as it was at its transaction (``qemu-img compare`` with a copy
of the source taken then). Then sync=bitmap with each bitmap-mode, succeeding and failing
(a blkdebug target that fails writes at 1 MiB, one copy worker so what was copied before
is the same for both daemons): the bitmap's bits (sha256) and count after each.
``python incremental_script.py`` records QEMU 11.1's transcript into
data/incremental_events.json (needs real-qsd)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "incremental_events.json"
SIZE = 2 << 20
NBD = "nbd.sock"
ONE_WORKER = {"x-perf": {"max-workers": 1}}


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def make_images(workdir: Path) -> None:
    for old in workdir.glob("*.img"):
        old.unlink()
    for old in workdir.glob("*.qcow2"):
        old.unlink()
    src = workdir / "s.img"
    _img("create", "-f", "raw", str(src), str(SIZE))
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", str(src)],
                   check=True, capture_output=True)  # fmt: skip
    _img("create", "-f", "qcow2", str(workdir / "full.qcow2"), str(SIZE))
    for n, back in ((1, "full"), (2, "inc1"), (3, "inc2")):
        _img("create", "-f", "qcow2", "-b", f"{back}.qcow2", "-F", "qcow2",
             str(workdir / f"inc{n}.qcow2"))  # fmt: skip
    _img("create", "-f", "raw", str(workdir / "ok.img"), str(SIZE))
    for n in (1, 2, 3, 5):
        _img("create", "-f", "qcow2", str(workdir / f"bad{n}.qcow2"), str(SIZE))


def _target(name: str) -> list[Any]:
    opts = {"driver": "qcow2", "node-name": name, "backing": None,
            "file": {"driver": "file", "filename": f"{name}.qcow2"}}  # fmt: skip
    return ["blockdev-add", opts]


def _raw(name: str) -> list[Any]:
    file = {"driver": "file", "filename": f"{name}.img"}
    return ["blockdev-add", {"driver": "raw", "node-name": name, "file": file}]


def _bad(name: str, host_offset: int) -> list[Any]:
    """A fresh qcow2 target whose data write at ``host_offset`` of its file fails (its
    second data cluster for a bitmap of three dirty runs, its 17th for a full copy)."""
    rule = {"event": "write_aio", "iotype": "write", "sector": host_offset // 512}
    file = {"driver": "blkdebug", "inject-error": [rule],
            "image": {"driver": "file", "filename": f"{name}.qcow2"}}  # fmt: skip
    return ["blockdev-add", {"driver": "qcow2", "node-name": name, "file": file}]


def _bk(job: str, target: str, sync: str, **more: Any) -> dict[str, Any]:
    data = {"job-id": job, "device": "s", "target": target, "sync": sync, **more}
    return {"type": "blockdev-backup", "data": data}


def _tx(*actions: dict[str, Any]) -> list[Any]:
    return ["transaction", {"actions": list(actions)}]


ADD_B0 = {"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "b0"}}
SHA = ["x-debug-block-dirty-bitmap-sha256", {"node": "s", "name": "b0"}]
COUNT = ["!count"]
W1 = ["!write", ["write -P 0x22 0 64k", "write -P 0x23 1M 64k", "write -P 0x24 1536k 4k"]]
W2 = ["!write", ["write -P 0x33 192k 8k", "write -P 0x34 2000k 48k"]]
SCRIPT: list[list[Any]] = [
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}],
    ["blockdev-add", {"driver": "file", "node-name": "s", "filename": "s.img"}],
    ["block-export-add", {"type": "nbd", "id": "e", "node-name": "s", "name": "e",
                          "writable": True}],
    _target("full"), _target("inc1"), _target("inc2"),
    # the full backup with its bitmap; writes while it copies (the last MiB is slow)
    ["!point", "p0"],
    _tx(ADD_B0, _bk("f", "full", "full", speed=SIZE)),
    W1,
    ["settle-gone", "f"], SHA, COUNT,
    ["!point", "p1"],
    _tx(_bk("i1", "inc1", "incremental", bitmap="b0", speed=SIZE)),
    W2,
    ["settle-gone", "i1"], SHA, COUNT,
    ["blockdev-del", {"node-name": "full"}], ["blockdev-del", {"node-name": "inc1"}],
    ["!compare", "p0", "full.qcow2"], ["!compare", "p1", "inc1.qcow2"],
    ["!point", "p2"],
    _tx(_bk("i2", "inc2", "incremental", bitmap="b0")),
    ["settle-gone", "i2"], SHA, COUNT,
    ["blockdev-del", {"node-name": "inc2"}], ["!compare", "p2", "inc2.qcow2"],
]  # fmt: skip
# The bitmap modes, failing (a target error) and succeeding.
MODES: list[list[Any]] = [
    W1, SHA, COUNT,
    _bad("bad1", 0x60000), _bad("bad2", 0x60000), _bad("bad3", 0x60000),
    _bad("bad5", 0x150000), _raw("ok"),
    _tx(_bk("x1", "bad1", "incremental", bitmap="b0", **ONE_WORKER)),
    ["settle-gone", "x1"], SHA, COUNT,
    _tx(_bk("x2", "bad2", "bitmap", bitmap="b0", **{"bitmap-mode": "never"}, **ONE_WORKER)),
    ["settle-gone", "x2"], SHA, COUNT,
    _tx(_bk("x3", "bad3", "bitmap", bitmap="b0", **{"bitmap-mode": "always"}, **ONE_WORKER)),
    ["settle-gone", "x3"], SHA, COUNT,
    _tx(_bk("x4", "ok", "bitmap", bitmap="b0", **{"bitmap-mode": "never"})),
    ["settle-gone", "x4"], SHA, COUNT,
    _tx(_bk("x5", "bad5", "full", bitmap="b0", **{"bitmap-mode": "always"}, **ONE_WORKER)),
    ["settle-gone", "x5"], SHA, COUNT,
    _tx(_bk("x6", "ok", "full", bitmap="b0", **{"bitmap-mode": "always"})),
    ["settle-gone", "x6"], SHA, COUNT,
]  # fmt: skip


def _tool(daemon: Any, workdir: Path, step: list[Any]) -> Any:
    kind = step[0]
    if kind == "!write":
        cmds = [arg for c in step[1] for arg in ("-c", c)]
        url = f"nbd+unix:///e?socket={workdir / NBD}"
        return subprocess.run(["qemu-io", "-f", "raw", *cmds, url], capture_output=True).returncode
    if kind == "!point":  # the source as it is now (every write acknowledged)
        shutil.copyfile(workdir / "s.img", workdir / f"{step[1]}.img")
        return None
    if kind == "!compare":
        done = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2",
                               str(workdir / f"{step[1]}.img"), str(workdir / step[2])],
                              capture_output=True, text=True)  # fmt: skip
        return [done.returncode, done.stdout.strip()]
    if kind == "!count":
        nodes = daemon.cmd("query-named-block-nodes", {"flat": True})["return"]
        (node,) = [n for n in nodes if n["node-name"] == "s"]
        return [(b["name"], b["count"], b["busy"], b["recording"]) for b in node["dirty-bitmaps"]]
    raise AssertionError(kind)


def run_script(real: bool, workdir: Path, modes: bool = True) -> list[Any]:
    from backup_script import normalise
    from conversation import Daemon, run

    make_images(workdir)
    daemon = Daemon(workdir, real)
    out: list[Any] = []
    try:
        for step in SCRIPT + (MODES if modes else []):
            if step[0].startswith("!"):
                out.append({"tool": step, "result": _tool(daemon, workdir, step)})
            else:
                out.extend(normalise(run(daemon, [step])))
    finally:
        daemon.close()
    return json.loads(json.dumps(out))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "incremental")
