"""The backup actions of ``transaction`` (blockdev-backup, drive-backup) both daemons are
held to (test_txn_backup.py): jobs made in prepare and started in commit, cancelled when a
later action fails (the filter and a drive-backup target gone again, a bitmap usable
again), refusals in prepare, bitmap and backup in one transaction. ``python
txn_backup_script.py`` records QEMU 11.1's transcript into data/txn_backup_events.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import backup_script as bs

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "txn_backup_events.json"
ABORT = {"type": "abort", "data": {}}


def _bk(job: str, device: str, target: str, sync: str, **more: Any) -> dict[str, Any]:
    data = {"job-id": job, "device": device, "target": target, "sync": sync, **more}
    return {"type": "blockdev-backup", "data": data}


def _drive(job: str, target: str, sync: str, **more: Any) -> dict[str, Any]:
    data = {"job-id": job, "device": "s1", "target": target, "sync": sync, **more}
    return {"type": "drive-backup", "data": data}


def _bm(kind: str, node: str, name: str) -> dict[str, Any]:
    return {"type": f"block-dirty-bitmap-{kind}", "data": {"node": node, "name": name}}


def _tx(*actions: dict[str, Any], **props: Any) -> list[Any]:
    args: dict[str, Any] = {"actions": list(actions)}
    if props:
        args["properties"] = props
    return ["transaction", args]


MANUAL = {"auto-finalize": False, "auto-dismiss": False}
NODES = ["query-named-block-nodes", {"flat": True}]
SCRIPT: list[list[Any]] = [
    *[bs._add(name) for name in bs.IMAGES],
    # made, then cancelled by a later failure
    _tx(_bk("a", "s1", "t1", "full", **MANUAL), ABORT),
    ["query-jobs", {}],
    _tx(_bk("a", "s1", "t1", "full", **{"filter-node-name": "flt"}), _bk("a", "s3", "t3", "full")),
    ["query-jobs", {}],
    _tx(_bk("a", "s1", "t1", "full"), _bk("b", "s1", "nope", "full")),
    _tx(_bk("a", "s1", "t1", "bitmap")),
    _tx(_drive("d", "new.qcow2", "full", format="qcow2"), ABORT),
    ["query-jobs", {}],
    # a bitmap and a full backup in one transaction; the incremental after it
    _tx(_bm("add", "s3", "b0"), _bk("f", "s3", "t3", "full", **MANUAL)),
    ["settle", "f"],
    ["query-jobs", {}],
    ["job-finalize", {"id": "f"}],
    ["settle", "f"],
    ["job-dismiss", {"id": "f"}],
    _tx(_bk("i", "s3", "t3", "incremental", bitmap="b0"), ABORT),
    ["x-debug-block-dirty-bitmap-sha256", {"node": "s3", "name": "b0"}],
    _tx(_bm("clear", "s3", "b0"), _bk("i", "s3", "t3", "incremental", bitmap="b0")),
    ["settle-gone", "i"],
    _tx(_bk("i2", "s3", "t3", "bitmap", bitmap="b0", **{"bitmap-mode": "always"}),
        _bm("remove", "s3", "b0")),  # fmt: skip
]  # fmt: skip
# Three jobs of one transaction: when each pauses for another's drain is timing (QEMU's
# drains differ from qsd-py's), so these events are compared job by job, without the
# pauses and resumes (``by_job``).
MULTI: list[list[Any]] = [
    _tx(_bk("p", "s1", "t1", "full"), _drive("q", "new.qcow2", "full", format="qcow2"),
        _bk("r", "sro", "t4", "top")),  # fmt: skip
    ["settle-gone", "p"],
    ["settle-gone", "q"],
    ["settle-gone", "r"],
    ["query-jobs", {}],
]  # fmt: skip


GROUPED = {"completion-mode": "grouped"}


def _grouped(daemon: Any) -> list[Any]:
    """completion-mode grouped: a job that finished waits for the other; one cancelled
    cancels the other; two waiting to be finalized are finalized together."""
    from conversation import run

    out = run(daemon, [
        _tx(_bk("g1", "s3", "t3", "full", speed=65536), _bk("g2", "s1", "t1", "full"),
            **GROUPED),
    ])  # fmt: skip
    _until(daemon, "g2", "waiting")
    out += run(daemon, [["query-jobs", {}], ["block-job-cancel", {"device": "g1"}],
                        ["settle-gone", "g1"], ["settle-gone", "g2"]])  # fmt: skip
    out += run(daemon, [
        _tx(_bk("h1", "s3", "t3", "full", **MANUAL), _bk("h2", "s1", "t1", "full", **MANUAL),
            **GROUPED),
        ["settle", "h1"], ["settle", "h2"], ["query-jobs", {}],
        ["job-finalize", {"id": "h2"}], ["settle", "h1"], ["settle", "h2"],
        ["query-jobs", {}], ["job-dismiss", {"id": "h1"}], ["job-dismiss", {"id": "h2"}],
        _tx(_bm("add", "s1", "gb"), **GROUPED),
        # (with two jobs made before the failing action QEMU 11.1's daemon hangs: see
        # test_txn_backup.py's test_grouped_abort_of_two_jobs for qsd-py's answer)
        _tx(_bk("k2", "s1", "t1", "full"), _bk("k3", "s1", "nope", "full"), **GROUPED),
        ["query-jobs", {}],
    ])  # fmt: skip
    return by_job(bs.normalise(out))


def _until(daemon: Any, job: str, status: str) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(j["id"] == job and j["status"] == status
               for j in daemon.cmd("query-jobs")["return"]):  # fmt: skip
            return
        time.sleep(0.005)
    raise TimeoutError(f"job {job} not {status}")


def _nodes(reply: dict[str, Any]) -> Any:
    return sorted(n["node-name"] for n in reply.get("return", []))


def by_job(transcript: list[Any]) -> list[Any]:
    """Replies in order; the jobs' events as one list per job, pauses left out."""
    out: list[Any] = []
    jobs: dict[str, list[Any]] = {}
    for entry in transcript:
        if "event" not in entry:
            out.append(entry)
            continue
        data = entry["data"]
        if data.get("status") in ("paused", "running"):
            continue
        jobs.setdefault(data.get("id", data.get("device")), []).append(entry)
    return [*out, dict(sorted(jobs.items()))]


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import Daemon, run

    bs.make_images(workdir)
    daemon = Daemon(workdir, real)
    try:
        out = bs.normalise(run(daemon, SCRIPT))
        out.append(by_job(bs.normalise(run(daemon, MULTI))))
        out.append(_grouped(daemon))
        return [*out, {"nodes": _nodes(daemon.cmd(*NODES))}]
    finally:
        daemon.close()


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "txn-backup")
