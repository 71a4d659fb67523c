"""Running jobs at other commands' drains: the conversation both daemons are held to
(tests/jobs/test_drain.py). QEMU 11.1 drains every node at each graph change and in some
commands outright; a running block job pauses and goes on at each such section
(``paused``/``running``, ``standby``/``ready`` when ready), a job the user paused says
nothing. ``python drain_script.py`` records QEMU 11.1's transcript into
data/drain_events.json (needs real-qsd).

One job runs at a time here (drain_jobs_script.py: the drains of another job's creation and
end); failed blockdev-adds, which QEMU drains a varying number of times, are left out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "drain_events.json"


def make_images(workdir: Path) -> None:
    """stream_script's chain, empty 1 MiB images x y z w, and m (1 MiB of data) for the
    mirror."""
    from stream_script import make_chain

    make_chain(workdir)

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=workdir)

    for name in ("x", "y", "z", "w", "m", "mt"):
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
        sh("qemu-img", "create", "-q", "-f", "qcow2", f"{name}.qcow2", "1M")
    sh("qemu-io", "-c", "write -P 5 0 1M", "m.qcow2")


def _file(name: str) -> dict[str, Any]:
    return {"driver": "file", "filename": f"{name}.qcow2"}


def _q(node: str, file: Any, **more: Any) -> list[Any]:
    return ["blockdev-add", {"driver": "qcow2", "node-name": node, "file": file, **more}]


def _reopen(node: str, file: str, ro: bool) -> list[Any]:
    entry = {"driver": "qcow2", "node-name": node, "file": file, "read-only": ro}
    return ["blockdev-reopen", {"options": [entry]}]


NBD = {"type": "unix", "data": {"path": "nbd.sock"}}
SYNC = "blockdev-snapshot-sync"
WS = {"node-name": "w", "snapshot-file": "ws.qcow2", "snapshot-node-name": "ws"}

SCRIPT: list[list[Any]] = [
    _q("base", _file("base")),
    _q("mid", _file("mid"), backing="base"),
    _q("top", _file("top"), backing="mid"),
    # a stream held back by its speed: it sleeps, and each drain wakes it into a pause
    ["block-stream", {"job-id": "s", "device": "top", "speed": 1}],
    ["blockdev-add", {"driver": "file", "node-name": "fx", "filename": "x.qcow2"}],
    _q("x", "fx"),
    _q("y", _file("y")),
    _q("z", _file("z"), backing="y"),
    _q("t2", _file("top"), **{"read-only": True, "force-share": True}),  # a chain from the header
    ["blockdev-add", {"driver": "null-co", "node-name": "n"}],
    ["blockdev-add", {"driver": "raw", "node-name": "r", "file": "n"}],
    ["blockdev-del", {"node-name": "r"}],
    ["blockdev-del", {"node-name": "n"}],
    ["blockdev-del", {"node-name": "nope"}],
    ["blockdev-del", {"node-name": "t2"}],
    _reopen("x", "fx", True),
    _reopen("x", "fx", False),
    _reopen("nope", "fx", False),
    ["transaction", {"actions": []}],
    ["query-jobs", {}],
    # paused by the user: the drains change nothing it shows
    ["block-job-pause", {"device": "s"}],
    ["transaction", {"actions": []}],
    _q("w", _file("w")),
    ["block-job-resume", {"device": "s"}],
    [SYNC, {"node-name": "z", "snapshot-file": "zs.qcow2", "snapshot-node-name": "zs"}],
    [SYNC, {"node-name": "nope", "snapshot-file": "n.qcow2", "snapshot-node-name": "ns"}],
    ["blockdev-snapshot", {"node": "x", "overlay": "w"}],
    ["nbd-server-start", {"addr": NBD}],
    ["block-export-add", {"type": "nbd", "id": "e", "node-name": "w"}],
    ["block-export-add", {"type": "nbd", "id": "e2", "node-name": "w"}],
    ["block-export-add", {"type": "nbd", "id": "e3", "node-name": "nope"}],
    ["transaction", {"actions": [{"type": SYNC, "data": WS}]}],
    ["block_resize", {"node-name": "z", "size": 2 << 20}],
    ["block-export-del", {"id": "e"}],
    # nbd-server-stop: one drained section, the exports go newest first, the oldest last
    ["block-export-add", {"type": "nbd", "id": "e5", "node-name": "x"}],
    ["block-export-add", {"type": "nbd", "id": "e6", "node-name": "y"}],
    ["block-export-add", {"type": "nbd", "id": "e7", "node-name": "z"}],
    ["nbd-server-stop", {}],
    ["nbd-server-start", {"addr": NBD}],
    ["block-export-add", {"type": "nbd", "id": "e8", "node-name": "x"}],
    ["nbd-server-stop", {}],
    ["nbd-server-start", {"addr": NBD}],
    ["query-jobs", {}],
    ["block-job-cancel", {"device": "s"}],
    ["settle-gone", "s"],
    # a mirror in ready: standby and ready at each drain
    _q("m", _file("m")),
    _q("mt", _file("mt")),
    ["blockdev-mirror", {"job-id": "j", "device": "m", "target": "mt", "sync": "full"}],
    ["settle", "j"],
    ["transaction", {"actions": []}],
    ["blockdev-del", {"node-name": "zs"}],
    ["block-export-add", {"type": "nbd", "id": "e4", "node-name": "y"}],
    # quit: the export goes, then the job is cancelled under a drain that never ends
    ["quit-until-exit", {}],
]


def normalise(transcript: list[Any]) -> list[Any]:
    """Events flattened in order, replies kept; the mirror's progress numbers left out
    (what it finds dirty is not this conversation's matter)."""
    out: list[Any] = []
    for entry in transcript:
        if "events" not in entry:
            out.append(entry)
            continue
        for ev in entry["events"]:
            data = dict(ev.get("data", {}))
            if data.get("type") == "mirror":
                data.pop("len", None)
                data.pop("offset", None)
            out.append({"event": ev["event"], "data": data})
    return out


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import run_once

    make_images(workdir)
    (workdir / "nbd.sock").unlink(missing_ok=True)
    return normalise(run_once(workdir, real, SCRIPT))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "drain")
