"""The block-stream conversation both daemons are held to (tests/jobs/test_stream.py), on a
chain base <- mid <- top made with qemu-img/qemu-io; normalised as mirror_script does.
``python stream_script.py`` records QEMU 11.1's transcript into data/stream_events.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "stream_events.json"


def make_chain(workdir: Path) -> None:
    """base (0-512K: 1s) <- mid (256K-512K: 2s) <- top (768K-832K: 3s), 1 MiB each."""

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=workdir)

    for name in ("base", "mid", "top"):
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    sh("qemu-io", "-c", "write -P 1 0 512k", "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    sh("qemu-io", "-c", "write -P 2 256k 256k", "mid.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    sh("qemu-io", "-c", "write -P 3 768k 64k", "top.qcow2")


def _q(name: str, backing: str | None = None) -> list[Any]:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "filename": f"{name}.qcow2"},
    }
    if backing is not None:
        opts["backing"] = backing
    return ["blockdev-add", opts]


SCRIPT: list[list[Any]] = [
    _q("base"),
    _q("mid", "base"),
    _q("top", "mid"),
    ["block-stream", {"job-id": "s", "device": "nope"}],
    ["block-stream", {"job-id": "s", "device": "top", "base-node": "nope"}],
    ["block-stream", {"job-id": "s", "device": "top", "base": "nope.qcow2"}],
    ["block-stream", {"job-id": "s", "device": "top", "base": "base.qcow2", "base-node": "base"}],
    ["block-stream", {"job-id": "s", "device": "top", "bottom": "mid", "base-node": "base"}],
    ["block-stream", {"job-id": "s", "device": "top", "base-node": "top"}],
    ["block-stream", {"job-id": "s", "device": "mid", "base-node": "top"}],
    ["block-stream", {"job-id": "s", "device": "top", "speed": -1}],
    ["block-stream", {"job-id": "s", "device": "top", "backing-file": "x"}],
    ["block-stream", {"device": "top"}],
    # a node without backing: done at once
    ["block-stream", {"job-id": "n", "device": "base"}],
    ["settle-gone", "n"],
    # mid into top, finalized by hand
    ["block-stream", {"job-id": "s", "device": "top", "base-node": "base", "auto-finalize": False}],
    ["settle", "s"],
    ["blockdev-del", {"node-name": "mid"}],
    ["block-stream", {"job-id": "s2", "device": "top"}],
    ["job-finalize", {"id": "s"}],
    ["settle-gone", "s"],
    # cancel (a speed limit holds it back), then the whole chain
    ["block-stream", {"job-id": "s3", "device": "top", "speed": 1}],
    ["block-job-cancel", {"device": "s3"}],
    ["settle-gone", "s3"],
    ["block-stream", {"job-id": "s4", "device": "top"}],
    ["settle-gone", "s4"],
    ["blockdev-del", {"node-name": "top"}],
    ["blockdev-del", {"node-name": "mid"}],
]


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import run_once
    from mirror_script import normalise

    make_chain(workdir)
    return normalise(run_once(workdir, real, SCRIPT))


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "stream")
