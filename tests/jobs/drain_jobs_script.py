"""A job's creation and end seen by another running job: QEMU 11.1 goes through drained
sections of every node as a block job is created (the job appears in one of them) and as it
ends (before its COMPLETED/CANCELLED, and once more after it is gone), and a running job
pauses and goes on at each (tests/jobs/test_drain.py). ``python drain_jobs_script.py``
records QEMU 11.1's transcript into data/drain_jobs_events.json (needs real-qsd).

The jobs are held back by a speed of 1 byte/s over images with data, so that each is still
running when it is cancelled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "drain_jobs_events.json"


def make_images(workdir: Path) -> None:
    """stream_script's chain (for the job that runs throughout), a second chain cb <- cm
    <- ct with data in each layer, m (1 MiB of data) and an empty mt."""
    from stream_script import make_chain

    make_chain(workdir)

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=workdir)

    for name in ("cb", "cm", "ct", "m", "mt"):
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "cb.qcow2", "1M")
    sh("qemu-io", "-c", "write -P 1 0 1M", "cb.qcow2")
    for name, below, pattern in (("cm", "cb", "2 0 512k"), ("ct", "cm", "3 0 256k")):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{below}.qcow2", "-F", "qcow2",
           f"{name}.qcow2")  # fmt: skip
        sh("qemu-io", "-c", f"write -P {pattern}", f"{name}.qcow2")
    for name in ("m", "mt"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", f"{name}.qcow2", "1M")
    sh("qemu-io", "-c", "write -P 5 0 1M", "m.qcow2")


def _q(node: str, backing: str | None = None) -> list[Any]:
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": node,
                            "file": {"driver": "file", "filename": f"{node}.qcow2"}}  # fmt: skip
    if backing is not None:
        opts["backing"] = backing
    return ["blockdev-add", opts]


def _cancel(job: str) -> list[list[Any]]:
    return [["block-job-cancel", {"device": job, "force": True}], ["settle-gone", job]]


SCRIPT: list[list[Any]] = [
    _q("base"),
    _q("mid", "base"),
    _q("top", "mid"),
    _q("cb"),
    _q("cm", "cb"),
    _q("ct", "cm"),
    _q("m"),
    _q("mt"),
    ["block-stream", {"job-id": "s", "device": "top", "speed": 1}],
    [
        "blockdev-mirror",
        {"job-id": "e", "device": "m", "target": "mt", "sync": "full", "speed": 1},
    ],  # fmt: skip
    *_cancel("e"),
    [
        "blockdev-backup",
        {"job-id": "d", "device": "m", "target": "mt", "sync": "none", "speed": 1},
    ],  # fmt: skip
    *_cancel("d"),
    ["block-stream", {"job-id": "a", "device": "ct", "speed": 1}],
    *_cancel("a"),
    [
        "block-commit",
        {"job-id": "b", "device": "ct", "top-node": "cm", "base-node": "cb", "speed": 1},
    ],  # fmt: skip
    *_cancel("b"),
    ["block-job-cancel", {"device": "s"}],
    ["settle-gone", "s"],
]


def normalise(transcript: list[Any]) -> list[Any]:
    """Events flattened in order, replies kept, progress numbers left out."""
    out: list[Any] = []
    for entry in transcript:
        if "events" not in entry:
            out.append(entry)
            continue
        for ev in entry["events"]:
            data = {k: v for k, v in ev.get("data", {}).items() if k not in ("len", "offset")}
            out.append({"event": ev["event"], "data": data})
    return out


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import run_once

    make_images(workdir)
    return normalise(run_once(workdir, real, SCRIPT))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "drain-jobs")
