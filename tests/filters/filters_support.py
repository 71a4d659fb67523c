"""Scenarios of the filter drivers, run the same way on qsd-py and (opt-in) QEMU's daemon:
images made with qemu-img/qemu-io, a node added over QMP, exported over NBD, and qemu-io's
reads and writes through the export, its output kept without the timing lines."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from nbd_server.qmp_talk import Talk

MIB = 1 << 20
TIMING = re.compile(r"^\d+(\.\d+)? \w+, \d+ ops; ")


def make_images(workdir: Path) -> None:
    """``base.qcow2`` (4 MiB, 0xab in its first MiB) and ``top.qcow2`` over it (empty)."""
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    for path in (base, top):
        path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    io = ["qemu-io", "-c", "write -P 0xab 0 1M", str(base)]
    subprocess.run(io, check=True, stdout=subprocess.DEVNULL)
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)]
    subprocess.run(create, check=True)


def host_sector(image: Path, guest: int) -> int:
    """Where guest byte ``guest`` of a qcow2 image lies in its file, in sectors."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for ext in json.loads(out):
        if ext["start"] <= guest < ext["start"] + ext["length"] and "offset" in ext:
            return (ext["offset"] + guest - ext["start"]) // 512
    raise AssertionError(f"guest offset {guest} not mapped in {image}")


def qemu_io(sock: Path, export: str, cmds: list[str], writable: bool = False) -> list[str]:
    """qemu-io's output for ``cmds`` through an NBD export, timing lines dropped."""
    argv = ["qemu-io", "-f", "raw"]
    if not writable:
        argv.append("-r")
    for cmd in cmds:
        argv += ["-c", cmd]
    argv.append(f"nbd+unix:///{export}?socket={sock}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if not TIMING.match(line)]


def blkdebug_qcow2(workdir: Path, name: str, image: str, writable: bool, **rules: Any) -> dict:
    """A qcow2 node over a blkdebug node over ``image``'s file."""
    node: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": name,
        "file": {
            "driver": "blkdebug",
            "node-name": f"{name}-dbg",
            "image": {
                "driver": "file",
                "node-name": f"{name}-file",
                "filename": str(workdir / image),
            },
            **rules,
        },
    }
    if not writable:
        node["read-only"] = True
    return node


def scenarios(workdir: Path) -> dict[str, tuple[dict, list[str], bool]]:
    """name -> (blockdev-add arguments, qemu-io commands, writable)."""
    sector = host_sector(workdir / "base.qcow2", 512 * 1024)
    (workdir / "rules.cfg").write_text(
        "# a comment\n"
        "[set-state]\n"
        'event = "read_aio"\n'
        'state = "1"\n'
        'new_state = "2"\n'
        "\n"
        "[inject-error]\n"
        'event = "read_aio"\n'
        'state = "2"\n'
        'errno = "28"\n'
        'once = "on"\n'
    )
    reads = ["read -P 0xab 0 64k", "read -P 0xab 512k 4k", "read -P 0xab 64k 64k"]
    return {
        "eio": (blkdebug_qcow2(workdir, "eio", "base.qcow2", False,
                               **{"inject-error": [{"event": "read_aio"}]}), reads, False),
        "once": (blkdebug_qcow2(workdir, "once", "base.qcow2", False,
                                **{"inject-error": [{"event": "read_aio", "errno": 28,
                                                     "once": True}]}), reads, False),
        "sector": (blkdebug_qcow2(workdir, "sector", "base.qcow2", False,
                                  **{"inject-error": [{"event": "read_aio",
                                                       "sector": sector}]}), reads, False),
        "state": (blkdebug_qcow2(workdir, "state", "base.qcow2", False, **{
            "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}],
            "inject-error": [{"event": "read_aio", "state": 2}]}), reads, False),
        "l2load": (blkdebug_qcow2(workdir, "l2load", "base.qcow2", False,
                                   **{"inject-error": [{"event": "l2_load", "once": True,
                                                        "immediately": True}]}), reads, False),
        "config": (blkdebug_qcow2(workdir, "config", "base.qcow2", False,
                                  config=str(workdir / "rules.cfg")), reads, False),
        "write": (blkdebug_qcow2(workdir, "write", "top.qcow2", True,
                                 **{"inject-error": [{"event": "write_aio",
                                                      "iotype": "write"}]}),
                  ["write -P 0xcd 2M 64k", "read -P 0 2M 64k", "read -P 0xab 0 4k"], True),
        "l2update": (blkdebug_qcow2(workdir, "l2update", "top.qcow2", True,
                                    **{"inject-error": [{"event": "l2_update", "once": True,
                                                         "iotype": "write"}]}),
                     ["write -P 0xcd 2M 64k", "write -P 0xcd 2M 64k", "read -P 0xcd 2M 64k"],
                     True),
        "refblock": (blkdebug_qcow2(workdir, "refblock", "top.qcow2", True,
                                    **{"inject-error": [{"event": "refblock_update_part",
                                                         "iotype": "write"}]}),
                     ["write -P 0xcd 2M 64k", "read -P 0xab 0 4k"], True),
        "alloc": (blkdebug_qcow2(workdir, "alloc", "top.qcow2", True,
                                 **{"inject-error": [{"event": "cluster_alloc",
                                                      "iotype": "write", "once": True}]}),
                  ["write -P 0xcd 2M 64k", "write -P 0xcd 3M 64k"], True),
        # qemu-io writes through (FUA): the flush after the write fails it.
        "flush": (blkdebug_qcow2(workdir, "flush", "top.qcow2", True,
                                 **{"inject-error": [{"event": "flush_to_os",
                                                      "iotype": "flush"}]}),
                  ["write -P 0xcd 2M 64k", "read -P 0xcd 2M 64k"], True),
        # raised by the generic write path on the blkdebug node itself, around its write
        "pwritev": (blkdebug_qcow2(workdir, "pwritev", "top.qcow2", True,
                                   **{"inject-error": [{"event": "pwritev", "iotype": "write",
                                                        "once": True}]}),
                    ["write -P 0xcd 2M 64k", "write -P 0xcd 3M 64k", "read -P 0xcd 3M 64k"],
                    True),
        "pwritevdone": (blkdebug_qcow2(workdir, "pwritevdone", "top.qcow2", True,
                                       **{"inject-error": [{"event": "pwritev_done",
                                                            "iotype": "write"}]}),
                        ["write -P 0xcd 2M 64k", "write -P 0xcd 3M 64k"], True),
    }  # fmt: skip


#: What QEMU 11.1's daemon answers (a failed read hangs up the connection: later reads
#: of the same qemu-io fail with EIO whatever they ask, and the first with EIO too).
EXPECTED = {
    "eio": ["read failed: Input/output error"] * 3,
    "once": ["read failed: Input/output error"] * 3,
    "sector": ["read 65536/65536 bytes at offset 0"] + ["read failed: Input/output error"] * 2,
    "state": ["read 65536/65536 bytes at offset 0"] + ["read failed: Input/output error"] * 2,
    "l2load": ["read failed: Input/output error", "read 4096/4096 bytes at offset 524288",
               "read 65536/65536 bytes at offset 65536"],
    "config": ["read 65536/65536 bytes at offset 0"] + ["read failed: Input/output error"] * 2,
    "write": ["write failed: Input/output error", "read 65536/65536 bytes at offset 2097152",
              "read 4096/4096 bytes at offset 0"],
    "l2update": ["write failed: Input/output error", "wrote 65536/65536 bytes at offset 2097152",
                 "read 65536/65536 bytes at offset 2097152"],
    "refblock": ["write failed: Input/output error", "read 4096/4096 bytes at offset 0"],
    "alloc": ["write failed: Input/output error", "wrote 65536/65536 bytes at offset 3145728"],
    "flush": ["write failed: Input/output error", "read 65536/65536 bytes at offset 2097152"],
    "pwritev": ["write failed: Input/output error", "wrote 65536/65536 bytes at offset 3145728",
                "read 65536/65536 bytes at offset 3145728"],
    "pwritevdone": ["write failed: Input/output error"] * 2,
}  # fmt: skip


def run_scenario(talk: Talk, sock: Path, workdir: Path, name: str) -> list[str]:
    """Add the scenario's node, export it, run its commands, remove both again."""
    make_images(workdir)
    node, cmds, writable = scenarios(workdir)[name]
    for cmd, args in (
        ("blockdev-add", node),
        ("block-export-add", {"type": "nbd", "id": name, "node-name": node["node-name"],
                              "writable": writable}),
    ):  # fmt: skip
        reply = talk.command(cmd, args)
        assert "return" in reply["reply"], reply
    try:
        return qemu_io(sock, name, cmds, writable)
    finally:
        talk.command("block-export-del", {"id": name})
        deadline_events = talk.events_after(0.2)
        del deadline_events
        talk.command("blockdev-del", {"node-name": node["node-name"]})
