"""A backup's ``on-cbw-error`` held against QEMU 11.1 (test_backup_cbw_error.py): the target
is a blkdebug node whose writes at 2 MiB fail (EIO); the job holds back (a speed limit) so a
guest write at 2 MiB, through an NBD export of the source, comes first and its copy before
write fails. ``break-guest-write`` (the default) fails that write; ``break-snapshot`` lets
it through, and the job fails when its own copy of 2 MiB does (BLOCK_JOB_ERROR, then
BLOCK_JOB_COMPLETED with the error). When only the filter's copy fails (blkdebug ``once``),
QEMU's job completes, and its target holds the source as it is after the write, not as it
was: recorded here as QEMU does it. One copy worker, so that both daemons have copied the
same when the job fails. ``python cbw_error_script.py`` records QEMU 11.1's transcript into
data/cbw_error_events.json (needs real-qsd)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "cbw_error_events.json"
MIB = 1 << 20
SIZE = 4 * MIB
WRITE_AT = 2 * MIB

#: (name, on-cbw-error or None for the default, blkdebug rule's once, through a transaction)
CASES = [
    ("guest-write", None, False, False),
    ("snapshot", "break-snapshot", False, False),
    ("snapshot-once", "break-snapshot", True, False),
    ("guest-write-explicit-txn", "break-guest-write", False, True),
    ("snapshot-txn", "break-snapshot", False, True),
]


def initial() -> bytes:
    return random.Random(5).randbytes(SIZE)


def _nodes(once: bool) -> list[dict[str, Any]]:
    rule = {"event": "pwritev", "iotype": "write", "errno": 5, "sector": WRITE_AT // 512}
    if once:
        rule["once"] = True
    target = {"driver": "blkdebug", "node-name": "tgt", "inject-error": [rule],
              "image": {"driver": "file", "filename": "t.img"}}  # fmt: skip
    return [{"driver": "file", "filename": "src.img", "node-name": "src"}, target]


def _backup(mode: str | None, txn: bool) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full",
                            "speed": 65536, "x-perf": {"max-workers": 1}}  # fmt: skip
    if mode is not None:
        args["on-cbw-error"] = mode
    if txn:
        return "transaction", {"actions": [{"type": "blockdev-backup", "data": args}]}
    return "blockdev-backup", args


def guest_write(sock: Path) -> str:
    """qemu-io's first line (or its error) for a 64 KiB write at WRITE_AT."""
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P 0x55 {WRITE_AT} 64k",
         f"nbd+unix:///src?socket={sock}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return f"{done.returncode} {done.stdout.splitlines()[0] if done.stdout else done.stderr}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_case(workdir: Path, real: bool, case: tuple[str, str | None, bool, bool]) -> list[Any]:
    from conversation import Daemon

    name, mode, once, txn = case
    (workdir / "src.img").write_bytes(initial())
    (workdir / "t.img").write_bytes(bytes(SIZE))
    sock = workdir / "nbd.sock"
    d = Daemon(workdir, real)
    out: list[Any] = [{"case": name}]
    try:
        for node in _nodes(once):
            out.append({"cmd": "blockdev-add", "reply": d.cmd("blockdev-add", node)})
        addr = {"type": "unix", "data": {"path": str(sock)}}
        d.cmd("nbd-server-start", {"addr": addr})
        export = {"type": "nbd", "id": "e", "node-name": "src", "name": "src", "writable": True}
        out.append({"cmd": "block-export-add", "reply": d.cmd("block-export-add", export)})
        cmd, args = _backup(mode, txn)
        out.append({"cmd": cmd, "reply": d.cmd(cmd, args)})
        time.sleep(0.1)
        out.append({"events": d.events()})
        out.append({"io": guest_write(sock)})
        out.append({"query-jobs": d.cmd("query-jobs")})
        out.append({"cmd": "set-speed", "reply": d.cmd("block-job-set-speed",
                                                         {"device": "b", "speed": 0})})  # fmt: skip
        out.append({"events": d.settle("b")})
        out.append({"query-jobs": d.cmd("query-jobs")})
    finally:
        d.close()
    target, source = (workdir / "t.img").read_bytes(), (workdir / "src.img").read_bytes()
    out.append({
        "target-is-point-in-time": target == initial(),
        "target-is-source-now": target == source,
        "target": _digest(target),
        "source": _digest(source),
    })  # fmt: skip
    return out


def run_script(real: bool, workdir: Path) -> list[Any]:
    return [entry for case in CASES for entry in run_case(workdir, real, case)]


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "cbw-error")
