"""A table of blockdev-create option sets, run as one QMP conversation per daemon.

Each case creates its image(s) under relative names in one directory: the ``file`` driver's
cases directly, the qcow2 cases in a file made by blockdev-create first (and a data file
where the case has one). What is kept of a case: the job's state changes, its error, and
the length and SHA-256 of every file it made. ``data/create.json`` holds what QEMU 11.1's
daemon gave (``python tests/jobs/create_cases.py --record``, needs real-qsd);
test_create.py holds qsd-py to it, and the opt-in realqsd test compares both live.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from conversation import Daemon  # noqa: E402

RECORD = HERE / "data" / "create.json"
M = 1 << 20

# name -> options of the file driver (the filename is the case's name).
FILE_CASES: dict[str, dict[str, Any]] = {
    "file-1m": {"size": M},
    "file-empty": {"size": 0},
    "file-odd-falloc": {"size": 3 * M + 1, "preallocation": "falloc"},
    "file-full": {"size": 2 * M, "preallocation": "full"},
    "file-nocow-hint0": {"size": M, "nocow": True, "extent-size-hint": 0},
    "file-metadata": {"size": M, "preallocation": "metadata"},
    "file-hint-too-large": {"size": M, "extent-size-hint": 1 << 32},
    "file-negative": {"size": -1},
}

# name -> qcow2 options without "file" ("data-file": True asks for a data file node).
QCOW2_CASES: dict[str, dict[str, Any]] = {
    "default": {"size": 64 * M},
    "empty": {"size": 0},
    "v2": {"size": 64 * M, "version": "v2"},
    "v3-explicit": {"size": 64 * M, "version": "v3"},
    "c512": {"size": 64 * M, "cluster-size": 512},
    "c4k": {"size": 64 * M, "cluster-size": 4096},
    "c2m": {"size": 1 << 30, "cluster-size": 2 * M},
    "r1": {"size": 64 * M, "refcount-bits": 1},
    "r8": {"size": 64 * M, "refcount-bits": 8},
    "r64-c512": {"size": 16 * M, "refcount-bits": 64, "cluster-size": 512},
    "extl2": {"size": 64 * M, "extended-l2": True},
    "extl2-c16k": {"size": 64 * M, "extended-l2": True, "cluster-size": 16384},
    "lazy": {"size": 64 * M, "lazy-refcounts": True},
    "zstd": {"size": 64 * M, "compression-type": "zstd"},
    "zlib-explicit": {"size": 64 * M, "compression-type": "zlib"},
    "backing": {"size": 64 * M, "backing-file": "base.qcow2", "backing-fmt": "qcow2"},
    "backing-nofmt": {"size": 64 * M, "backing-file": "base.raw"},
    "backing-v2": {"size": 64 * M, "backing-file": "b.img", "backing-fmt": "raw", "version": "v2"},
    "backing-extl2-prealloc": {
        "size": 4 * M,
        "backing-file": "b",
        "extended-l2": True,
        "preallocation": "metadata",
    },
    "prealloc-metadata": {"size": 8 * M, "preallocation": "metadata"},
    "prealloc-falloc": {"size": 4 * M, "preallocation": "falloc"},
    "prealloc-full": {"size": 4 * M, "preallocation": "full"},
    "prealloc-full-c4k": {"size": 2 * M, "preallocation": "full", "cluster-size": 4096},
    "data-file": {"size": 64 * M, "data-file": True},
    "data-file-raw": {"size": 8 * M, "data-file": True, "data-file-raw": True},
    "data-file-full": {"size": 4 * M, "data-file": True, "preallocation": "full"},
    "big-1t": {"size": 1 << 40},
    "big-1t-c512": {"size": 1 << 40, "cluster-size": 512},
    "inline-file": {"size": 64 * M, "file": {"driver": "file", "filename": "inline-file.qcow2"}},
    "all-v3": {
        "size": 32 * M,
        "cluster-size": 32768,
        "refcount-bits": 32,
        "lazy-refcounts": True,
        "compression-type": "zstd",
        "extended-l2": True,
    },
    # refused
    "err-size": {"size": 1000},
    "err-negative": {"size": -512},
    "err-cluster-odd": {"size": M, "cluster-size": 1000},
    "err-cluster-small": {"size": M, "cluster-size": 256},
    "err-cluster-big": {"size": M, "cluster-size": 4 * M},
    "err-backing-fmt": {"size": M, "backing-fmt": "raw"},
    "err-v2-lazy": {"size": M, "version": "v2", "lazy-refcounts": True},
    "err-v2-refcount": {"size": M, "version": "v2", "refcount-bits": 8},
    "err-refcount-3": {"size": M, "refcount-bits": 3},
    "err-refcount-128": {"size": M, "refcount-bits": 128},
    "err-v2-zstd": {"size": M, "version": "v2", "compression-type": "zstd"},
    "err-v2-extl2": {"size": M, "version": "v2", "extended-l2": True},
    "err-extl2-c4k": {"size": M, "extended-l2": True, "cluster-size": 4096},
    "err-raw-no-data": {"size": M, "data-file-raw": True},
    "err-raw-backing": {"size": M, "data-file": True, "data-file-raw": True, "backing-file": "b"},
    "err-v2-data": {"size": M, "version": "v2", "data-file": True},
    "err-backing-prealloc": {"size": M, "backing-file": "b", "preallocation": "metadata"},
    "err-backing-too-long": {"size": M, "backing-file": "x" * 1100},
    "err-no-file-node": {"size": M, "file": "nonode"},
}


def _job(d: Daemon, job: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one blockdev-create job to its end; its states, error, then dismiss it."""
    reply = d.cmd("blockdev-create", {"job-id": job, "options": args})
    if "error" in reply:
        return {"reply-error": reply["error"]["desc"]}
    events = d.events() + d.settle(job)
    info = [j for j in d.cmd("query-jobs")["return"] if j["id"] == job][0]
    d.cmd("job-dismiss", {"id": job})
    states = [
        e["data"]["status"]
        for e in events + d.events()
        if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job
    ]
    return {
        "states": states,
        "error": info.get("error"),
        "progress": [info["current-progress"], info["total-progress"]],
    }


def _digest(path: Path) -> list[Any] | None:
    if not path.exists():
        return None
    data = path.read_bytes()
    return [len(data), hashlib.sha256(data).hexdigest()]


def run_all(workdir: Path, real: bool) -> dict[str, Any]:
    """Every case against one daemon started in ``workdir`` (emptied first)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.iterdir():
        old.unlink()
    out: dict[str, Any] = {}
    d = Daemon(workdir, real)
    try:
        for name, opts in FILE_CASES.items():
            res = _job(d, f"j-{name}", {"driver": "file", "filename": name, **opts})
            out[name] = {**res, "files": {name: _digest(workdir / name)}}
        for name, opts in QCOW2_CASES.items():
            out[name] = _qcow2_case(d, workdir, name, opts)
    finally:
        d.close()
    for name in QCOW2_CASES:  # the daemon has closed the images: now hash them
        out[name]["files"] = {f: _digest(workdir / f) for f in out[name]["files"]}
    return out


def _qcow2_case(d: Daemon, workdir: Path, name: str, opts: dict[str, Any]) -> dict[str, Any]:
    img, data = f"{name}.qcow2", f"{name}.data"
    files = [img]
    _job(d, f"f-{name}", {"driver": "file", "filename": img, "size": 0})
    d.cmd("blockdev-add", {"driver": "file", "node-name": "img", "filename": img})
    args = {"driver": "qcow2", "file": "img", **opts}
    if opts.get("data-file"):
        files.append(data)
        _job(d, f"d-{name}", {"driver": "file", "filename": data, "size": 0})
        d.cmd("blockdev-add", {"driver": "file", "node-name": "data", "filename": data})
        args["data-file"] = "data"
    res = _job(d, f"q-{name}", args)
    for node in ("img", "data"):
        d.cmd("blockdev-del", {"node-name": node})
    # Nodes the job opened (an inline file, the new image) are gone with it.
    left = [n["node-name"] for n in d.cmd("query-named-block-nodes")["return"]]
    return {**res, "files": files, "nodes-left": left}


if __name__ == "__main__":
    if "--record" not in sys.argv:
        sys.exit("usage: create_cases.py --record   (runs QEMU's daemon through real-qsd)")
    result = run_all(Path("/tmp/qsd-cmp/jobs-create"), real=True)
    RECORD.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(result)} cases in {RECORD}")
