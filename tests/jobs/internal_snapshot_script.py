"""The internal snapshot conversation both daemons are held to (tests/jobs/
test_internal_snapshot.py): QEMU's errors and replies, guest writes through an NBD export
between snapshots (copy-on-write of shared clusters and L2 tables, a compressed cluster, a
zero cluster), deletions, and then what QEMU's tools see in the image: ``qemu-img check``,
``qemu-img snapshot -l``, the data of every snapshot (``qemu-img convert -l``) and the file's
bytes with the snapshots' dates masked. ``python internal_snapshot_script.py`` records QEMU
11.1's transcript into data/internal_snapshot_events.json (needs real-qsd)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "internal_snapshot_events.json"
# Image geometries besides the default one, each with its own recorded transcript.
VARIANTS = {"extended-l2": "extended_l2=on", "v2": "compat=0.10"}


def data_file(variant: str | None) -> Path:
    return DATA if variant is None else DATA.with_name(f"internal_snapshot_events_{variant}.json")


SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-libnbd
KIB, MIB = 1 << 10, 1 << 20

IO = r"""
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for off, n, byte in json.loads(sys.argv[2]):
    if byte == "zero":  # may leave a hole (deallocate)
        h.zero(n, off)
    elif byte == "zero-no-hole":
        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
    elif byte == "trim":
        h.trim(n, off)
    else:
        h.pwrite(bytes([byte]) * n, off)
h.flush()
h.shutdown()
"""


def _isn(device: str, name: str) -> list[Any]:
    return ["blockdev-snapshot-internal-sync", {"device": device, "name": name}]


def _del(device: str, **which: str) -> list[Any]:
    return ["blockdev-snapshot-delete-internal-sync", {"device": device, **which}]


# Guest writes: (offset, length, byte).
WRITES_1 = [(0, 64 * KIB, 2), (3 * MIB, 64 * KIB, 3), (1 * MIB + 4 * KIB, 4 * KIB, 9)]
WRITES_2 = [(32 * KIB, 64 * KIB, 4), (2 * MIB, 8 * KIB, 5)]
WRITES_3 = [(0, 4 * KIB, 6), (3 * MIB + 60 * KIB, 8 * KIB, 8)]
# Zeroes and discards of clusters the snapshots share: only the active image changes.
ZEROES_4 = [(0, 64 * KIB, "zero"), (128 * KIB, 128 * KIB, "zero-no-hole"),
            (3 * MIB, 64 * KIB, "trim"), (MIB, 64 * KIB, "zero")]  # fmt: skip

SCRIPT: list[list[Any]] = [
    ["blockdev-add", {"driver": "qcow2", "node-name": "d", "discard": "unmap",
                      "file": {"driver": "file", "filename": "d.qcow2"}}],
    ["blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                      "file": {"driver": "file", "filename": "ro.qcow2"}}],
    ["blockdev-add", {"driver": "raw", "node-name": "r",
                      "file": {"driver": "file", "filename": "r.raw"}}],
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}],
    ["block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "writable": True}],
    _isn("nope", "a"),
    _isn("r", "a"),
    _isn("ro", "a"),
    _isn("d", ""),
    _isn("d", "s1"),
    _isn("d", "s1"),
    ["io", WRITES_1],
    _isn("d", "2"),
    ["io", WRITES_2],
    _isn("d", "s3"),
    ["io", WRITES_3],
    _del("d"),
    _del("nope", id="1"),
    _del("r", id="1"),
    _del("d", id="9"),
    _del("d", name="x"),
    _del("d", id="1", name="s3"),
    _del("d", name="2"),
    _isn("d", "s4"),  # id 4: one more than the largest left
    ["io", ZEROES_4],
    _del("ro", id="1"),  # read-only: fails, and QEMU's list forgets it
    ["query-named-block-nodes", {"flat": True}],
]  # fmt: skip


def make_images(workdir: Path, variant: str | None = None) -> None:
    for name in ("d.qcow2", "ro.qcow2", "r.raw"):
        (workdir / name).unlink(missing_ok=True)
    d = str(workdir / "d.qcow2")
    opts = ["-o", VARIANTS[variant]] if variant is not None else []
    _run("qemu-img", "create", "-f", "qcow2", *opts, d, "4M")
    _run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 7 1M 64k",
         "-c", "write -z 2M 64k", "-c", "write -P 11 3M 4k", d)  # fmt: skip
    _run("qemu-img", "create", "-f", "qcow2", str(workdir / "ro.qcow2"), "1M")
    _run("qemu-img", "snapshot", "-c", "x", str(workdir / "ro.qcow2"))
    _run("qemu-img", "create", "-f", "raw", str(workdir / "r.raw"), "1M")


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def masked_image(path: Path) -> bytes:
    """The file with every snapshot's dates and VM clock zeroed (they differ per run)."""
    data = bytearray(path.read_bytes())
    nb, table = struct.unpack_from(">IQ", data, 60)
    pos = table
    for _ in range(nb):
        pos = (pos + 7) & ~7
        id_size, name_size = struct.unpack_from(">HH", data, pos + 12)
        extra = struct.unpack_from(">I", data, pos + 36)[0]
        data[pos + 16 : pos + 32] = bytes(16)  # date sec, nsec; VM clock
        pos += 40 + extra + id_size + name_size
    return bytes(data)


def image_facts(workdir: Path) -> dict[str, Any]:
    d = workdir / "d.qcow2"
    check = subprocess.run(["qemu-img", "check", str(d)], capture_output=True, text=True)
    listing = json.loads(_run("qemu-img", "info", "-U", "--output=json", str(d)))
    facts: dict[str, Any] = {
        "check": (check.returncode, check.stdout),
        "snapshots": [
            (s["id"], s["name"], s["vm-state-size"]) for s in listing.get("snapshots", [])
        ],  # fmt: skip
        "bytes": hashlib.sha256(masked_image(d)).hexdigest(),
    }
    out = workdir / "out.raw"
    for sn in listing.get("snapshots", []):
        _run("qemu-img", "convert", "-U", "-l", f"snapshot.id={sn['id']}", "-O", "raw",
             str(d), str(out))  # fmt: skip
        facts[f"data {sn['name']}"] = hashlib.sha256(out.read_bytes()).hexdigest()
    _run("qemu-img", "convert", "-U", "-O", "raw", str(d), str(out))
    facts["data active"] = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return facts


def normalise(entries: list[Any]) -> list[Any]:
    """Dates and generated names differ per run; so does the length of an image's file
    while it is open: qsd-py grows a qcow2 file ahead of its end (cut back on close)."""
    for entry in entries:
        if entry.get("cmd") == "query-named-block-nodes" and "return" in entry["reply"]:
            for node in entry["reply"]["return"]:
                if node["drv"] == "file" and node["file"].endswith(".qcow2"):
                    node["image"]["virtual-size"] = 0
    text = json.dumps(entries, sort_keys=True)
    text = re.sub(r"#block\d+", "#blockN", text)
    text = re.sub(r'"(date-sec|date-nsec|vm-clock-sec|vm-clock-nsec|actual-size)": \d+',
                  r'"\1": 0', text)  # fmt: skip
    return json.loads(text)


def run_script(real: bool, workdir: Path, variant: str | None = None) -> list[Any]:
    from conversation import Daemon

    make_images(workdir, variant)
    daemon = Daemon(workdir, real)
    out: list[Any] = []
    try:
        uri = f"nbd+unix:///d?socket={workdir / 'nbd.sock'}"
        for name, args in SCRIPT:
            if name == "io":
                done = subprocess.run([SYSTEM_PYTHON, "-c", IO, uri, json.dumps(args)],
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
                assert done.returncode == 0, done.stderr
                continue
            out.append({"cmd": name, "reply": daemon.cmd(name, args)})
    finally:
        daemon.close()
    return normalise([*out, {"images": image_facts(workdir)}])


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    work = Path("/tmp/qsd-cmp/isnap-record")
    os.makedirs(work, exist_ok=True)
    for variant in (None, *VARIANTS):
        path = data_file(variant)
        path.write_text(json.dumps(run_script(True, work, variant), indent=1) + "\n")
        print(f"wrote {path}")
