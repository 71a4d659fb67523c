"""The backup conversation both daemons are held to (tests/jobs/test_backup.py): argument
errors, manual finalize, cancels, sync none/top, drive-backup creating and opening targets,
and the copy-before-write/snapshot-access options; normalised as mirror_script does, with
generated node names (``#blockNNN``) left out. ``python backup_script.py`` records QEMU
11.1's transcript into data/backup_events.json (needs real-qsd)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "backup_events.json"
MIB = 1 << 20

IMAGES = {
    "s1": MIB,
    "t1": MIB,
    "s3": 4 * MIB,
    "t3": 4 * MIB,
    "big": 2 * MIB,
    "ro": MIB,
    "sro": MIB,
    "t4": MIB,
}
READ_ONLY = ("ro", "sro")
DATA_IMAGES = ("s3",)
MADE = ("new.qcow2", "new2.img")  # drive-backup creates them


def make_images(workdir: Path) -> None:
    for name in MADE:
        (workdir / name).unlink(missing_ok=True)
    for name, size in IMAGES.items():
        path = workdir / f"{name}.img"
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            if name in DATA_IMAGES:
                f.write(bytes(range(1, 256)) * (size // 255) + b"\x01" * (size % 255))
            else:
                f.truncate(size)


def _add(name: str) -> list[Any]:
    args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
    return ["blockdev-add", {**args, "read-only": True} if name in READ_ONLY else args]


def _bk(job: str | None, device: str, target: str, sync: str, **more: Any) -> list[Any]:
    args: dict[str, Any] = {"device": device, "target": target, "sync": sync, **more}
    if job is not None:
        args["job-id"] = job
    return ["blockdev-backup", args]


def _cbw(**more: Any) -> list[Any]:
    opts = {"driver": "copy-before-write", "node-name": "c0", "file": "s1", "target": "t1"}
    return ["blockdev-add", {**opts, **more}]


def _drive(job: str, target: str, sync: str, **more: Any) -> list[Any]:
    return ["drive-backup", {"job-id": job, "device": "s1", "target": target, "sync": sync, **more}]


SCRIPT: list[list[Any]] = [
    *[_add(name) for name in IMAGES],
    ["blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 4096}],
    # argument errors, in QEMU's order of checks
    _bk("x", "s1", "s1", "full"),
    _bk("x", "s1", "t1", "bitmap"),
    _bk("x", "s1", "t1", "bitmap", bitmap="b0"),
    _bk("x", "s1", "t1", "incremental"),
    _bk("x", "s1", "t1", "full", bitmap="b0"),
    _bk("x", "s1", "t1", "full", **{"bitmap-mode": "always"}),
    _bk("x", "s1", "t1", "full", compress=True),
    _bk("x", "nope", "t1", "full"),
    _bk("x", "s1", "nope", "full"),
    _bk("x", "s1", "t1", "full", speed=-1),
    _bk("x", "s1", "big", "full"),
    _bk("x", "s1", "nul", "full"),
    _bk(None, "s1", "t1", "full"),
    _bk("x", "s1", "t1", "full", **{"x-perf": {"max-workers": 0}}),
    _bk("x", "s1", "t1", "full", **{"x-perf": {"max-chunk": -1}}),
    _bk("x", "s1", "t1", "full", **{"x-perf": {"max-chunk": 4096}}),
    _bk("x", "s1", "t1", "full", **{"x-perf": {"min-cluster-size": 1000}}),
    # manual finalize and dismiss; what the job holds meanwhile
    _bk(
        "a",
        "s1",
        "t1",
        "full",
        **{"auto-finalize": False, "auto-dismiss": False, "filter-node-name": "flt"},
    ),
    ["settle", "a"],
    ["query-block-jobs", {}],
    ["blockdev-del", {"node-name": "s1"}],
    ["blockdev-del", {"node-name": "t1"}],
    ["blockdev-del", {"node-name": "flt"}],
    _bk("a2", "s1", "t1", "full"),
    ["job-finalize", {"id": "a"}],
    ["settle", "a"],
    ["job-dismiss", {"id": "a"}],
    # cancel while a speed limit holds the copy back
    _bk("c", "s3", "t3", "full", speed=65536),
    ["block-job-cancel", {"device": "c"}],
    ["settle-gone", "c"],
    # sync none runs until cancelled, and cannot be completed
    _bk("n", "s1", "t1", "none"),
    ["query-jobs", {}],
    ["block-job-complete", {"device": "n"}],
    ["block-job-cancel", {"device": "n"}],
    ["settle-gone", "n"],
    _bk("t", "s1", "t1", "top"),
    ["settle-gone", "t"],
    # copy-before-write and snapshot-access nodes
    [
        "blockdev-add",
        {"driver": "copy-before-write", "node-name": "c0", "file": "s1", "target": "nope"},
    ],  # fmt: skip
    _cbw(**{"min-cluster-size": 1000}),
    _cbw(bitmap={"node": "s1", "name": "b0"}),
    _cbw(bitmap={"node": "zz", "name": "b0"}),
    ["blockdev-add", {"driver": "snapshot-access", "node-name": "sa0", "file": "nope"}],
    _cbw(**{"cbw-timeout": 5, "on-cbw-error": "break-snapshot"}),
    ["blockdev-add", {"driver": "snapshot-access", "node-name": "sa0", "file": "c0"}],
    ["blockdev-add", {"driver": "snapshot-access", "node-name": "sa1", "file": "s1"}],
    ["blockdev-del", {"node-name": "t1"}],
    ["blockdev-del", {"node-name": "s1"}],
    ["blockdev-del", {"node-name": "c0"}],
    ["blockdev-del", {"node-name": "sa1"}],
    ["blockdev-del", {"node-name": "sa0"}],
    ["blockdev-del", {"node-name": "c0"}],
    # drive-backup: an existing image, new ones, and refusals
    _drive("d", "t1.img", "full", mode="existing", format="raw"),
    ["settle-gone", "d"],
    _drive("d2", "new.qcow2", "full", format="qcow2"),
    ["settle-gone", "d2"],
    _drive("d3", "nope.img", "full", mode="existing"),
    _drive("d4", "new2.img", "top", format="raw"),
    ["settle-gone", "d4"],
    ["drive-backup", {"job-id": "d6", "device": "nope", "target": "x.img", "sync": "full"}],
    _drive("d7", "t1.img", "none", mode="existing", format="qcow2"),
    _drive("d8", "t1.img", "none", mode="existing"),
    ["query-jobs", {}],
    # read-only nodes, filter names
    _bk("r", "s1", "ro", "full"),
    _bk("r2", "sro", "t4", "full"),
    ["settle-gone", "r2"],
    _bk("z", "s1", "t4", "full", **{"filter-node-name": "sro"}),
    # a job waiting to be finalized (a running one would pause and resume at every drain of
    # QEMU's, which qsd-py does not count alike): what it blocks
    _bk("z", "s1", "t4", "full", **{"filter-node-name": "f", "auto-finalize": False}),
    ["settle", "z"],
    _bk("z2", "t4", "s1", "none"),
    _bk("z3", "s1", "sro", "none"),
    _bk("z4", "f", "t3", "none"),
    ["job-finalize", {"id": "z"}],
    ["settle-gone", "z"],
]

_GENERATED = re.compile(r"#block\d+")


def normalise(transcript: list[Any]) -> list[Any]:
    from mirror_script import normalise as by_mirror

    text = json.dumps(by_mirror(transcript))
    return json.loads(_GENERATED.sub("#block", text))


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import run_once

    make_images(workdir)
    return normalise(run_once(workdir, real, SCRIPT))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "backup")
