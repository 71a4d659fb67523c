"""How much a ``sync`` full mirror counts (the job's ``len``/``offset``): QEMU 11.1 counts only
what the source's chain holds when the target reads as zeroes, and everything otherwise. The
numbers are the point here, so they are kept (mirror_script.py leaves them out).
``python mirror_len_script.py`` records QEMU 11.1's transcript into
data/mirror_len_events.json (needs real-qsd)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "mirror_len_events.json"
MIB = 1 << 20


def make_images(workdir: Path) -> None:
    """empty.qcow2 (fresh), half.qcow2 (1 MiB of 4 written), v2.qcow2 (a fresh compat 0.10
    target), zero.raw (sparse), data.raw (non-zero bytes): 4 MiB each."""

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=workdir)

    for name in ("empty.qcow2", "half.qcow2", "v2.qcow2", "zero.raw", "data.raw"):
        (workdir / name).unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "empty.qcow2", "4M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "half.qcow2", "4M")
    sh("qemu-io", "-c", "write -P 7 0 1M", "half.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "4M")
    with open(workdir / "zero.raw", "wb") as f:
        f.truncate(4 * MIB)
    (workdir / "data.raw").write_bytes(b"\x05" * (4 * MIB))


def _add(name: str, filename: str, fmt: str = "") -> list[list[Any]]:
    file = ["blockdev-add", {"driver": "file", "filename": filename, "node-name": f"{name}-f"}]
    if not fmt:
        return [["blockdev-add", {**file[1], "node-name": name}]]
    return [file, ["blockdev-add", {"driver": fmt, "file": f"{name}-f", "node-name": name}]]


def _mirror(job: str, device: str, target: str, sync: str = "full") -> list[list[Any]]:
    """A mirror until ready, then a soft cancel (no pivot): the events carry len/offset."""
    start = {"job-id": job, "device": device, "target": target, "sync": sync}
    return [
        ["blockdev-mirror", start],
        ["settle", job],
        ["query-block-jobs", {}],
        ["block-job-cancel", {"device": job}],
        ["settle", job],
    ]


SCRIPT: list[list[Any]] = [
    *_add("empty", "empty.qcow2", "qcow2"),
    *_add("half", "half.qcow2", "qcow2"),
    *_add("v2", "v2.qcow2", "qcow2"),
    *_add("zero", "zero.raw"),
    *_add("data", "data.raw"),
    ["blockdev-add", {"driver": "null-co", "size": 4 * MIB, "node-name": "null"}],
    *_mirror("j1", "empty", "zero"),  # QEMU: len 0
    *_mirror("j2", "half", "v2"),  # a fresh qcow2 target reads as zeroes: 1 MiB
    *_mirror("j3", "half", "null"),  # null-co does not read as zeroes: everything
    *_mirror("j4", "empty", "data"),  # a target holding data: everything
]


def normalise(transcript: list[Any]) -> list[Any]:
    """Events flattened in order (when one arrives relative to a reply depends on speed),
    replies kept; only ``busy`` (whether the job's coroutine runs at that instant) goes."""
    out: list[Any] = []
    for entry in transcript:
        if "events" in entry:
            out.extend({"event": ev["event"], "data": ev.get("data", {})} for ev in entry["events"])
            continue
        reply = entry["reply"]
        if isinstance(reply.get("return"), list):
            jobs = reply["return"]
            reply = {"return": [{k: v for k, v in r.items() if k != "busy"} for r in jobs]}
        out.append({"cmd": entry["cmd"], "reply": reply})
    return out


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import run_once

    make_images(workdir)
    return normalise(run_once(workdir, real, SCRIPT))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "mirror-len")
