"""The ``mirror_top`` filter node a mirror puts above its source, as a client sees it while
the job runs and after it ended (tests/jobs/test_mirror_filter.py): query-named-block-nodes
(flat and not), x-debug-query-block-graph, query-block-exports (the exports move onto the
filter, and back or on to the target), blockdev-del of the filter and of the source, the
filter's name reused, mirrors of a node under a filter; then the same filter under an active
commit (block-commit of the active layer, a mirror into its base), an intermediate commit's
``commit_top`` and block-stream's ``copy-on-read`` filter.
``python mirror_filter_script.py`` records QEMU 11.1's transcript into
data/mirror_filter_events.json (needs real-qsd).

The job is paused by the user while the graph is looked at, so that the drains of the
commands in between say nothing and the progress numbers stay put (they are left out all
the same, with the filter's generated names, which QEMU draws at random)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "mirror_filter_events.json"
MIB = 1 << 20


def make_images(workdir: Path) -> None:
    """s: 4 MiB of data; t, t2: empty 4 MiB files; a qcow2 chain base <- mid <- top with
    data in each layer."""
    (workdir / "s.img").write_bytes(b"\x03" * (4 * MIB))
    for name in ("t", "t2"):
        path = workdir / f"{name}.img"
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(4 * MIB)

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=workdir)

    for name in ("base", "mid", "top"):
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    sh("qemu-io", "-c", "write -P 1 0 4M", "base.qcow2")
    for name, below, pattern in (("mid", "base", "2 0 2M"), ("top", "mid", "3 0 1M")):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{below}.qcow2", "-F", "qcow2",
           f"{name}.qcow2")  # fmt: skip
        sh("qemu-io", "-c", f"write -P {pattern}", f"{name}.qcow2")


def _file(name: str) -> list[Any]:
    return ["blockdev-add", {"driver": "file", "filename": f"{name}.img", "node-name": name}]


def _mirror(job: str, device: str, target: str, **more: Any) -> list[Any]:
    return ["blockdev-mirror", {"job-id": job, "device": device, "target": target,
                                "sync": "full", **more}]  # fmt: skip


def _qcow2(name: str, backing: str | None = None) -> list[Any]:
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": name,
                            "file": {"driver": "file", "filename": f"{name}.qcow2"}}  # fmt: skip
    if backing is not None:
        opts["backing"] = backing
    return ["blockdev-add", opts]


LOOK = [
    ["query-named-block-nodes", {"flat": True}],
    ["query-named-block-nodes", {}],
    ["query-block-exports", {}],
    ["x-debug-query-block-graph", {}],
]
NBD = {"type": "unix", "data": {"path": "nbd.sock"}}

SCRIPT: list[list[Any]] = [
    _file("s"),
    _file("t"),
    _file("t2"),
    ["nbd-server-start", {"addr": NBD}],
    ["block-export-add", {"type": "nbd", "id": "e", "node-name": "s", "writable": True}],
    # the filter's name is checked first, then the job's arguments
    _mirror("x", "s", "t", **{"filter-node-name": "s"}),
    _mirror("x", "s", "t", **{"filter-node-name": "1bad"}),
    _mirror("x", "s", "t", granularity=100, **{"filter-node-name": "t"}),
    _mirror("x", "s", "t", speed=-1, **{"filter-node-name": "f"}),
    ["query-named-block-nodes", {"flat": True}],
    # a named filter
    _mirror("j", "s", "t", speed=1, **{"filter-node-name": "mf"}),
    ["block-job-pause", {"device": "j"}],
    ["settle", "j"],
    *LOOK,
    ["query-block", {}],
    ["blockdev-del", {"node-name": "mf"}],
    ["blockdev-del", {"node-name": "s"}],
    ["blockdev-add", {"driver": "null-co", "node-name": "mf"}],
    _mirror("k", "mf", "t2"),
    _mirror("k", "s", "t2"),
    _mirror("k", "t2", "t", **{"filter-node-name": "mf"}),
    ["block-export-add", {"type": "nbd", "id": "e2", "node-name": "mf"}],
    ["query-block-exports", {}],
    ["block-export-del", {"id": "e2"}],
    ["block-job-cancel", {"device": "j", "force": True}],
    ["settle-gone", "j"],
    *LOOK,
    # the name is free again; an unnamed filter, then a pivot: the export ends on the target
    _mirror("j2", "s", "t2", speed=1, **{"filter-node-name": "mf"}),
    ["block-job-cancel", {"device": "j2", "force": True}],
    ["settle-gone", "j2"],
    _mirror("j3", "s", "t"),
    ["settle", "j3"],
    *LOOK,
    ["job-complete", {"id": "j3"}],
    ["settle-past-ready", "j3"],
    *LOOK,
    _qcow2("base"),
    _qcow2("mid", "base"),
    _qcow2("top", "mid"),
    ["block-export-add", {"type": "nbd", "id": "c", "node-name": "top", "writable": True}],
    # an intermediate commit: commit_top between the top's overlay and the top
    [
        "block-commit",
        {
            "job-id": "i",
            "device": "top",
            "top-node": "mid",
            "base-node": "base",
            "speed": 1,
            "filter-node-name": "cf",
        },
    ],  # fmt: skip
    ["block-job-pause", {"device": "i"}],
    ["settle", "i"],
    *LOOK,
    ["blockdev-del", {"node-name": "cf"}],
    ["block-commit", {"job-id": "x", "device": "cf", "base-node": "base"}],
    ["block-job-cancel", {"device": "i", "force": True}],
    ["settle-gone", "i"],
    ["query-named-block-nodes", {"flat": True}],
    # an active commit: the filter above the active layer, its exports moved onto it
    [
        "block-commit",
        {"job-id": "a", "device": "top", "base-node": "mid", "speed": 1, "filter-node-name": "af"},
    ],  # fmt: skip
    ["block-job-pause", {"device": "a"}],
    ["settle", "a"],
    *LOOK,
    ["blockdev-del", {"node-name": "af"}],
    ["block-commit", {"job-id": "b", "device": "af", "base-node": "mid"}],
    ["block-job-cancel", {"device": "a", "force": True}],
    ["settle-gone", "a"],
    *LOOK,
    ["block-commit", {"job-id": "a2", "device": "top", "base-node": "mid"}],
    ["settle", "a2"],
    ["query-block-exports", {}],
    ["job-complete", {"id": "a2"}],
    ["settle-past-ready", "a2"],
    *LOOK,
    # block-stream: a copy-on-read node above the top (now mid, whose chain is base)
    ["block-stream", {"job-id": "st", "device": "mid", "speed": 1, "filter-node-name": "mid"}],
    ["block-stream", {"job-id": "st", "device": "mid", "speed": 1, "filter-node-name": "sf"}],
    ["block-job-pause", {"device": "st"}],
    ["settle", "st"],
    *LOOK,
    ["blockdev-del", {"node-name": "sf"}],
    ["blockdev-del", {"node-name": "mid"}],
    ["block-stream", {"job-id": "x", "device": "sf"}],
    ["block-job-cancel", {"device": "st", "force": True}],
    ["settle-gone", "st"],
    *LOOK,
    ["block-stream", {"job-id": "st2", "device": "mid", "speed": 1}],
    ["block-job-pause", {"device": "st2"}],
    ["settle", "st2"],
    *LOOK,
    ["block-job-set-speed", {"device": "st2", "speed": 0}],
    ["block-job-resume", {"device": "st2"}],
    ["settle-gone", "st2"],
    *LOOK,
]

_GENERATED = re.compile(r"#block\d+")
_PROGRESS = ("len", "offset", "count", "actual-size")


def _clean(item: Any) -> Any:
    """Progress numbers and sizes on disk (a protocol node's length too: how far a stream
    copied into it) dropped, generated names made one."""
    if isinstance(item, dict):
        skip = _PROGRESS + (("virtual-size",) if item.get("format") == "file" else ())
        return {k: _clean(v) for k, v in item.items() if k not in skip}
    if isinstance(item, list):
        return [_clean(v) for v in item]
    if isinstance(item, str):
        return _GENERATED.sub("#block", item)
    return item


def normalise(transcript: list[Any]) -> list[Any]:
    """Events flattened in order (when one arrives relative to a reply depends on speed),
    replies kept, both cleaned (:func:`_clean`)."""
    out: list[Any] = []
    for entry in transcript:
        if "events" in entry:
            out.extend({"event": ev["event"], "data": _clean(ev.get("data", {}))}
                       for ev in entry["events"])  # fmt: skip
            continue
        out.append({"cmd": entry["cmd"], "reply": _clean(entry["reply"])})
    return out


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import run_once

    make_images(workdir)
    (workdir / "nbd.sock").unlink(missing_ok=True)
    return normalise(run_once(workdir, real, SCRIPT))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "mirror-filter")
