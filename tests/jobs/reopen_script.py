"""The blockdev-reopen and blockdev-set-active conversations both daemons are held to
(tests/jobs/test_reopen.py). ``python reopen_script.py`` records QEMU 11.1's transcripts into
data/reopen_events.json (needs real-qsd).

Left out, as qsd-py differs there on purpose: ``detect-zeroes`` other than off (refused by
qsd-py everywhere); an empty ``options`` list (QEMU 11.1's daemon aborts on an assertion;
qsd-py does nothing); a file node's ``pr-manager`` (qsd-py has no persistent reservation
managers).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "reopen_events.json"


def _qcow2(node: str, file: Any, **more: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": node, "file": file, **more}


def _img(name: str) -> dict[str, Any]:
    return {"driver": "file", "filename": name}


def _reopen(*entries: dict[str, Any]) -> list[Any]:
    return ["blockdev-reopen", {"options": list(entries)}]


def _d(**more: Any) -> list[Any]:
    """Reopen node d (a qcow2 node over the file node f) with ``more``."""
    return _reopen(_qcow2("d", "f", **more))


QUERY = ["query-named-block-nodes", {"flat": True}]

REOPEN: list[list[Any]] = [
    ["blockdev-add", {"driver": "file", "node-name": "f", "filename": "d.qcow2"}],
    ["blockdev-add", _qcow2("d", "f")],
    ["blockdev-add", _qcow2("b", _img("b.qcow2"), **{"read-only": True})],
    ["blockdev-add", _qcow2("b2", _img("b2.qcow2"), **{"read-only": True})],
    ["blockdev-add", {"driver": "raw", "node-name": "r", "file": _img("r.raw")}],
    _reopen({"driver": "qcow2", "file": "f"}),
    _reopen(_qcow2("nope", "f")),
    _reopen({"driver": "raw", "node-name": "d", "file": "f"}),
    _reopen({"driver": "qcow2", "node-name": "d"}),
    _d(**{"read-only": True}),
    QUERY,
    _d(),
    _d(backing="b"),
    QUERY,
    _d(),  # backing left out while d has one
    _d(backing="b2"),
    _d(backing="d"),
    _reopen(_qcow2("b2", "#none", backing="d")),
    _d(backing=None),
    _reopen({"driver": "raw", "node-name": "r", "file": "nope", "read-only": True}),
    _d(backing="nope"),
    _d(backing="r"),
    _d(backing="b", discard="unmap"),
    _d(backing="b", cache={"direct": True}),
    _d(backing="b", **{"lazy-refcounts": True}),
    _d(backing="b", **{"force-share": True}),
    _reopen(
        _qcow2("d", "f", backing="b", **{"read-only": True}),
        _qcow2("d", "f", **{"read-only": False}),
    ),  # fmt: skip
    QUERY,
]

ACTIVE: list[list[Any]] = [
    ["blockdev-add", _qcow2("d", _img("d.qcow2"))],
    ["blockdev-add", _qcow2("ro", _img("ro.qcow2"), **{"read-only": True})],
    ["blockdev-set-active", {"node-name": "nope", "active": False}],
    ["blockdev-set-active", {"node-name": "d", "active": False}],
    QUERY,
    ["blockdev-snapshot-internal-sync", {"device": "d", "name": "x"}],
    ["block_resize", {"node-name": "d", "size": 2097152}],
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}],
    ["block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "writable": True}],
    ["blockdev-set-active", {"node-name": "d", "active": True}],
    ["blockdev-set-active", {"node-name": "d", "active": True}],
    ["blockdev-set-active", {"active": False}],
    QUERY,
    ["blockdev-set-active", {"active": True}],
    ["blockdev-set-active", {"node-name": "d", "active": False}],
    ["block-export-del", {"id": "e"}],
    ["blockdev-set-active", {"active": False}],
    QUERY,
    ["blockdev-add", _qcow2("n", _img("n.qcow2"))],
    ["blockdev-set-active", {"active": True}],
    QUERY,
]


# read-only both ways with children given by reference, writers, inline children.
READ_ONLY: list[list[Any]] = [
    ["blockdev-add", {"driver": "file", "node-name": "f", "filename": "d.qcow2",
                      "read-only": True}],
    ["blockdev-add", _qcow2("d", "f", **{"read-only": True})],
    _d(),  # its file child is read-only
    _reopen({"driver": "file", "node-name": "f", "filename": "d.qcow2"}, _qcow2("d", "f")),
    QUERY,
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}],
    ["block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "writable": True}],
    _d(**{"read-only": True}),  # a writer
    ["blockdev-add", _qcow2("x", _img("x.qcow2"), **{"read-only": True})],
    _reopen(_qcow2("x", "#blockNNN")),
    _reopen({"driver": "file", "node-name": "f", "filename": "other.qcow2"}),
    QUERY,
]  # fmt: skip


# A backing node opened from the header is replaced, then dropped: it goes with its link.
HEADER_BACKING: list[list[Any]] = [
    ["blockdev-add", _qcow2("b2", _img("b2.qcow2"), **{"read-only": True})],
    ["blockdev-add", {"driver": "file", "node-name": "of", "filename": "o.qcow2"}],
    ["blockdev-add", _qcow2("o", "of")],
    QUERY,
    _reopen(_qcow2("o", "of")),  # the header names a backing file: it must be given
    _reopen(_qcow2("o", "of", backing="b2")),
    QUERY,
    _reopen(_qcow2("o", "of", backing=None)),
    QUERY,
]


def _amend(job: str, node: str, **options: Any) -> list[Any]:
    return ["x-blockdev-amend", {"job-id": job, "node-name": node, "options": options}]


LUKS = {"format": "luks", "state": "active", "new-secret": "s"}
# x-blockdev-amend: QEMU 11.1 amends only a qcow2 image's encryption (refcount-bits and the
# like are qemu-img amend's, not the command's). Left out: options with driver luks (QEMU
# checks a LUKS branch qsd-py's schema does not have, as it has no luks driver).
AMEND: list[list[Any]] = [
    ["blockdev-add", _qcow2("d", _img("d.qcow2"))],
    ["blockdev-add", {"driver": "raw", "node-name": "r", "file": _img("r.raw")}],
    _amend("j0", "nope", driver="qcow2"),
    _amend("j1", "r", driver="qcow2"),
    _amend("j1", "r", driver="raw"),
    _amend("j3", "d", driver="qcow2"),
    ["settle", "j3"],
    ["query-jobs", None],
    _amend("j4", "d", driver="qcow2", encrypt=LUKS),
    ["settle", "j4"],
    ["query-jobs", None],
    _amend("j5", "d", driver="qcow2", **{"refcount-bits": 8}),
    _amend("j3", "d", driver="qcow2"),
    [
        "x-blockdev-amend",
        {"job-id": "j6", "node-name": "d", "options": {"driver": "qcow2"}, "force": True},
    ],  # fmt: skip
    ["settle", "j6"],
    ["job-dismiss", {"id": "j3"}],
    ["query-jobs", None],
]


def _file(node: str, name: str, **more: Any) -> list[Any]:
    return ["blockdev-add", {"driver": "file", "node-name": node, "filename": name, **more}]


def _rf(node: str, name: str, **more: Any) -> list[Any]:
    """Reopen the file node ``node`` (over ``name``) with ``more``."""
    return _reopen({"driver": "file", "node-name": node, "filename": name, **more})


def _xq(file: Any, **more: Any) -> list[Any]:
    return _reopen({"driver": "qcow2", "node-name": "xq", "file": file, **more})


# The file child of a qcow2 node and a file node's own options.
FILE_CHILD: list[list[Any]] = [
    _file("fx", "x.qcow2"),
    _file("fy", "n.qcow2"),
    _file("fm", "b2.qcow2"),
    ["blockdev-add", {"driver": "qcow2", "node-name": "xq", "file": "fx"}],
    _file("fro", "ro.qcow2", **{"read-only": True}),
    _xq("fy"),  # another file node: QEMU swaps it
    QUERY,
    _xq("fm"),
    _xq("nope"),
    _xq("xq"),
    _xq({"driver": "file", "filename": "d.qcow2"}),
    _xq("fro"),
    _xq("fx"),
    ["blockdev-add", {"driver": "qcow2", "node-name": "w", "file": "fm"}],
    _xq("fm"),  # another format node writes it
    _rf("fy", "n.qcow2", aio="native"),
    _rf("fy", "n.qcow2", cache={"direct": True}),
    _rf("fy", "n.qcow2", locking="off"),
    _rf("fy", "n.qcow2", locking="on"),
    _rf("fy", "x.qcow2"),
    _rf("fy", "n.qcow2", aio="io_uring"),
    _rf("fy", "n.qcow2", **{"read-only": True}),
    _rf("fy", "n.qcow2", **{"drop-cache": False}),
    _rf("fy", "n.qcow2", **{"x-check-cache-dropped": True}),
    _rf("fy", "n.qcow2", discard="unmap"),
    _rf("fx", "x.qcow2", **{"read-only": True}),  # xq writes it
    _rf("fy", "n.qcow2", **{"drop-cache": False}),
    _rf("fx", "x.qcow2", aio="threads", locking="auto", cache={"direct": False}),
    _rf("fx", "x.qcow2", cache={"no-flush": True}),
    _rf("fx", "x.qcow2", **{"aio-max-batch": 4}),
    QUERY,
]

SCRIPTS = {
    "reopen": REOPEN,
    "read-only": READ_ONLY,
    "header-backing": HEADER_BACKING,
    "active": ACTIVE,
    "amend": AMEND,
    "file-child": FILE_CHILD,
}


def make_images(workdir: Path) -> None:
    for name in ("d", "b", "b2", "ro", "n", "x"):
        path = workdir / f"{name}.qcow2"
        path.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), "1M"], check=True,
                       capture_output=True)  # fmt: skip
    (workdir / "o.qcow2").unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2",
                    str(workdir / "o.qcow2")], check=True, capture_output=True)  # fmt: skip
    (workdir / "r.raw").unlink(missing_ok=True)
    with open(workdir / "r.raw", "wb") as f:
        f.truncate(1 << 20)


def normalise(entries: list[Any]) -> list[Any]:
    """Generated names differ in number; a job's events may come before or after the
    reply that started it, so the events up to the next command are taken together."""
    merged: list[Any] = []
    for entry in entries:
        if "events" in entry and merged and "events" in merged[-1]:
            merged[-1] = {"events": merged[-1]["events"] + entry["events"]}
        elif entry != {"events": []}:
            merged.append(entry)
    text = json.dumps(merged, sort_keys=True)
    text = re.sub(r"#block\d+", "#blockN", text)
    return json.loads(re.sub(r'"actual-size": \d+', '"actual-size": 0', text))


def run_script(real: bool, workdir: Path) -> dict[str, Any]:
    from conversation import Daemon, run

    out = {}
    for name, script in SCRIPTS.items():
        make_images(workdir)
        daemon = Daemon(workdir, real)
        try:
            out[name] = normalise(run(daemon, script))
        finally:
            daemon.close()
    return out


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "reopen")
