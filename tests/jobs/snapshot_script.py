"""The external snapshot conversation both daemons are held to (tests/jobs/
test_external_snapshot.py): blockdev-snapshot and blockdev-snapshot-sync with QEMU's errors,
exports that follow, the graph afterwards (query-named-block-nodes) and what the overlay
files' headers say. ``python snapshot_script.py`` records QEMU 11.1's transcript into
data/snapshot_events.json (needs real-qsd)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "snapshot_events.json"


def _qcow2(name: str, node: str, backing: Any = "header", ro: bool = False) -> list[Any]:
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": node,
                            "file": {"driver": "file", "filename": f"{name}.qcow2"}}  # fmt: skip
    if backing != "header":
        opts["backing"] = backing
    if ro:
        opts["read-only"] = True
    return ["blockdev-add", opts]


def _sync(node: str, file: str, new: str | None = None, **more: Any) -> list[Any]:
    args: dict[str, Any] = {"node-name": node, "snapshot-file": file, **more}
    if new is not None:
        args["snapshot-node-name"] = new
    return ["blockdev-snapshot-sync", args]


def _snap(node: str, overlay: str) -> list[Any]:
    return ["blockdev-snapshot", {"node": node, "overlay": overlay}]


SCRIPT: list[list[Any]] = [
    _qcow2("base", "base"),
    _qcow2("ovl", "ovl", backing=None),
    _qcow2("ovl2", "ovl2", backing=None, ro=True),
    _qcow2("ovlb", "ovlb", backing="ovl2"),
    _qcow2("other", "other", backing=None),
    _qcow2("lone", "lone", backing=None),
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}],
    ["block-export-add", {"type": "nbd", "id": "e0", "node-name": "base", "writable": True}],
    ["block-export-add", {"type": "nbd", "id": "e1", "node-name": "other"}],
    _snap("nope", "ovl"),
    _snap("base", "nope"),
    _snap("base", "base"),
    _snap("base", "other"),  # exported: in use
    _snap("base", "ovlb"),  # has a backing node
    _snap("base", "ovl2"),  # read-only under a writable export
    _snap("ovl2", "ovl"),  # the backing node of ovlb
    _snap("base", "ovl"),
    ["query-block-exports", None],
    _snap("base", "ovl"),  # base is ovl's backing node now
    ["blockdev-del", {"node-name": "ovl"}],
    ["blockdev-del", {"node-name": "base"}],
    # blockdev-snapshot-sync: lookups, names, creation errors, then two overlays
    _sync("ovl", "s1.qcow2"),
    ["blockdev-snapshot-sync", {"device": "ovl", "snapshot-file": "s1.qcow2"}],
    ["blockdev-snapshot-sync", {"snapshot-file": "s1.qcow2"}],
    _sync("ovl", "s1.qcow2", "ovl"),
    _sync("ovl", "s1.qcow2", "s1"),
    ["query-block-exports", None],
    _sync("s1", "s2.raw", "s2", format="raw"),
    _sync("s1", "s3.qcow2", "s3", format="file"),
    _sync("s1", "s3.qcow2", "s3", format="nope"),
    _sync("s1", "nonexist.qcow2", "s3", mode="existing"),
    _sync("s1", "s1.qcow2", "s3"),
    _sync("s1", "/nonexist/x.qcow2", "s3"),
    _sync("s1", "s3.qcow2", "bad name"),  # the image is made before the name is refused
    _sync("s1", "fresh.qcow2", "s4", mode="existing"),  # its header names no backing file
    _sync("s4", "s5.qcow2", "s5"),
    _sync("other", "o1.qcow2", "o1"),  # a read-only export follows too
    _sync("lone", "lost.qcow2", "lost"),  # nobody uses lone: the overlay is closed again
    ["query-block-exports", None],
    ["query-named-block-nodes", {"flat": True}],
]
QCOW2_IMAGES = ("base", "ovl", "ovl2", "other", "fresh", "lone")


def make_images(workdir: Path) -> None:
    for name in [*QCOW2_IMAGES, "ovlb", "s1", "s3", "s4", "s5", "o1", "lost"]:
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
    for name in QCOW2_IMAGES:
        _img("create", "-f", "qcow2", str(workdir / f"{name}.qcow2"), "1M")
    _img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         str(workdir / "ovlb.qcow2"))  # fmt: skip


def _img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def image_facts(workdir: Path) -> dict[str, Any]:
    """What the images' headers say once the daemon is gone: backing file and format, and
    a digest of the whole first cluster (the header as written, byte for byte)."""
    facts = {}
    for path in sorted(workdir.glob("*.qcow2")):
        info = json.loads(_img("info", "-U", "--output=json", str(path)))
        head = path.read_bytes()[:65536]
        facts[path.name] = {
            "backing": info.get("backing-filename"),
            "backing-format": info.get("backing-filename-format"),
            "size": path.stat().st_size,
            "header": hashlib.sha256(head).hexdigest(),
        }
    return facts


def normalise(entries: list[Any]) -> list[Any]:
    """Generated node names differ in number only."""
    text = json.dumps(entries, sort_keys=True)
    return json.loads(re.sub(r"#block\d+", "#blockN", text))


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import Daemon, run

    make_images(workdir)
    daemon = Daemon(workdir, real)
    try:
        out = run(daemon, SCRIPT)
    finally:
        daemon.close()
    return normalise([*out, {"images": image_facts(workdir)}])


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "snapshot")
