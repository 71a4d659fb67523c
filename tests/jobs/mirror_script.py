"""The mirror conversation both daemons are held to (tests/jobs/test_mirror.py), and how its
transcript is normalised: event order and replies are compared, progress numbers (which
depend on speed) are left out. ``python mirror_script.py`` records QEMU 11.1's transcript
into data/mirror_events.json (needs real-qsd)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "mirror_events.json"
MIB = 1 << 20

# Images the script uses (made fresh in the work directory before each run): name -> size,
# "data" ones filled with non-zero bytes so that a speed limit holds the copy back.
IMAGES = {
    "s1": MIB,
    "t1": MIB,
    "s2": MIB,
    "t2": MIB,
    "s3": 4 * MIB,
    "t3": 4 * MIB,
    "s4": MIB,
    "t4": MIB,
    "s5": MIB,
    "big": 2 * MIB,
    "s6": MIB,
    "t6": MIB,  # drive-mirror's target, opened by file name
}
DATA_IMAGES = ("s3",)


def make_images(workdir: Path) -> None:
    for name, size in IMAGES.items():
        path = workdir / f"{name}.img"
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            if name in DATA_IMAGES:
                f.write(bytes(range(1, 256)) * (size // 255) + b"\x01" * (size % 255))
            else:
                f.truncate(size)


def _add(name: str) -> list[Any]:
    return ["blockdev-add", {"driver": "file", "filename": f"{name}.img", "node-name": name}]


SCRIPT: list[list[Any]] = [
    *[_add(name) for name in IMAGES if name != "t6"],
    # argument errors
    ["blockdev-mirror", {"job-id": "x", "device": "s1", "target": "s1", "sync": "full"}],
    [
        "blockdev-mirror",
        {"job-id": "x", "device": "s1", "target": "t1", "sync": "full", "granularity": 100},
    ],
    [
        "blockdev-mirror",
        {"job-id": "x", "device": "s1", "target": "t1", "sync": "full", "granularity": 1536},
    ],
    [
        "blockdev-mirror",
        {"job-id": "x", "device": "s1", "target": "t1", "sync": "full", "buf-size": -1},
    ],
    ["blockdev-mirror", {"job-id": "x", "device": "s1", "target": "t1", "sync": "bitmap"}],
    [
        "blockdev-mirror",
        {"job-id": "x", "device": "s1", "target": "t1", "sync": "full", "replaces": "nope"},
    ],
    [
        "blockdev-mirror",
        {"job-id": "x", "device": "s1", "target": "t1", "sync": "full", "replaces": "s2"},
    ],
    ["blockdev-mirror", {"job-id": "x", "device": "nope", "target": "t1", "sync": "full"}],
    ["blockdev-mirror", {"job-id": "x", "device": "s1", "target": "nope", "sync": "full"}],
    # checked once the job exists (created, null), and the default job id ('')
    [
        "blockdev-mirror",
        {"job-id": "x", "device": "s1", "target": "t1", "sync": "full", "speed": -1},
    ],
    ["blockdev-mirror", {"device": "s1", "target": "t1", "sync": "full"}],
    ["drive-mirror", {"device": "s6", "target": "t6.img", "sync": "full", "mode": "existing"}],
    # different sizes: the job fails
    ["blockdev-mirror", {"job-id": "e", "device": "s5", "target": "big", "sync": "full"}],
    ["settle", "e"],
    # manual finalize and dismiss, complete = pivot
    [
        "blockdev-mirror",
        {
            "job-id": "a",
            "device": "s1",
            "target": "t1",
            "sync": "full",
            "auto-finalize": False,
            "auto-dismiss": False,
        },
    ],
    ["settle", "a"],
    ["query-block-jobs", {}],
    ["blockdev-del", {"node-name": "s1"}],
    ["blockdev-del", {"node-name": "t1"}],
    ["blockdev-mirror", {"job-id": "a2", "device": "s1", "target": "t2", "sync": "full"}],
    ["job-complete", {"id": "a"}],
    ["settle-past-ready", "a"],
    ["job-finalize", {"id": "a"}],
    ["settle", "a"],
    ["query-jobs", {}],
    ["job-dismiss", {"id": "a"}],
    # soft cancel in ready: completes without pivot
    ["blockdev-mirror", {"job-id": "b", "device": "s2", "target": "t2", "sync": "top"}],
    ["settle", "b"],
    ["block-job-cancel", {"device": "b"}],
    ["settle-past-ready", "b"],
    # cancel before ready (a speed limit holds the copy back)
    [
        "blockdev-mirror",
        {"job-id": "c", "device": "s3", "target": "t3", "sync": "full", "speed": 65536},
    ],
    ["block-job-complete", {"device": "c"}],
    ["block-job-cancel", {"device": "c"}],
    ["settle", "c"],
    # pause in ready, complete while paused, resume
    [
        "blockdev-mirror",
        {
            "job-id": "d",
            "device": "s4",
            "target": "t4",
            "sync": "none",
            "copy-mode": "write-blocking",
        },
    ],
    ["settle", "d"],
    ["block-job-pause", {"device": "d"}],
    ["settle", "d"],
    ["query-block-jobs", {}],
    ["block-job-complete", {"device": "d"}],
    ["block-job-resume", {"device": "d"}],
    ["settle-past-ready", "d"],
    # drive-mirror to an existing image: complete, then a forced cancel, then a missing file
    [
        "drive-mirror",
        {
            "job-id": "f",
            "device": "s6",
            "target": "t6.img",
            "sync": "full",
            "mode": "existing",
            "format": "raw",
            "node-name": "r6",
        },
    ],
    ["settle", "f"],
    ["block-job-complete", {"device": "f"}],
    ["settle-past-ready", "f"],
    [
        "drive-mirror",
        {"job-id": "g", "device": "s6", "target": "t6.img", "sync": "top", "mode": "existing"},
    ],
    ["settle", "g"],
    ["block-job-cancel", {"device": "g", "force": True}],
    ["settle", "g"],
    [
        "drive-mirror",
        {"job-id": "h", "device": "s6", "target": "nope.img", "sync": "full", "mode": "existing"},
    ],
]

_PROGRESS = ("len", "offset", "current-progress", "total-progress", "busy")


def normalise(transcript: list[Any]) -> list[Any]:
    """Events flattened in order (progress numbers dropped), replies kept: when an event
    arrives relative to a reply depends on speed, their order among themselves does not."""
    out: list[Any] = []
    for entry in transcript:
        if "events" in entry:
            for ev in entry["events"]:
                data = {k: v for k, v in ev.get("data", {}).items() if k not in _PROGRESS}
                out.append({"event": ev["event"], "data": data})
            continue
        reply = entry["reply"]
        if isinstance(reply.get("return"), list):
            reply = {"return": [_strip(r) for r in reply["return"]]}
        out.append({"cmd": entry["cmd"], "reply": reply})
    return out


def _strip(item: Any) -> Any:
    if isinstance(item, dict):
        return {k: v for k, v in item.items() if k not in _PROGRESS}
    return item


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import run_once

    make_images(workdir)
    return normalise(run_once(workdir, real, SCRIPT))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "mirror")
