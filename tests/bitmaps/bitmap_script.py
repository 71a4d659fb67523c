"""The dirty bitmap conversation both daemons are held to (tests/bitmaps/test_transcript.py):
every command with its bad cases, writes through an NBD export, ``nbdinfo --map`` of the
bitmaps, query-named-block-nodes, and the images as ``qemu-img info``/``check`` find them
after the daemon stored its persistent bitmaps. ``python bitmap_script.py`` records QEMU
11.1's transcript into data/bitmaps.json (needs real-qsd).

The images are made fresh before each run with the host's qemu-img and qemu-io (Debian's
7.2 in CI), so both daemons start from the same bytes; an image whose bitmap was left in
use is made by setting the flag in the file, as a crash would leave it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "bitmaps.json"
NBD = "nbd.sock"


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _set_in_use(path: Path) -> None:
    """Flag every bitmap of a qcow2 image in use (bit 0 of each directory entry's flags)."""
    with open(path, "r+b") as f:
        head = f.read(1 << 16)
        pos = struct.unpack_from(">I", head, 100)[0]  # v3 header length
        while True:
            ext, length = struct.unpack_from(">II", head, pos)
            if ext == 0x23852875:
                count, _, _, offset = struct.unpack_from(">IIQQ", head, pos + 8)
                break
            assert ext, "no bitmaps extension"
            pos += 8 + (length + 7) // 8 * 8
        for _ in range(count):
            f.seek(offset)
            entry = f.read(24)
            flags = struct.unpack_from(">I", entry, 12)[0] | 1
            f.seek(offset + 12)
            f.write(struct.pack(">I", flags))
            name_size = struct.unpack_from(">H", entry, 18)[0]
            offset += (24 + name_size + 7) // 8 * 8


def make_images(workdir: Path) -> None:
    for name in ("a", "i", "ro", "j", "v2"):
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
    _img("create", "-f", "qcow2", str(workdir / "a.qcow2"), "1M")
    _img("create", "-f", "qcow2", "-o", "compat=0.10", str(workdir / "v2.qcow2"), "1M")
    i = workdir / "i.qcow2"
    _img("create", "-f", "qcow2", str(i), "4M")
    _img("bitmap", "--add", str(i), "pb")
    _img("bitmap", "--add", "-g", "512", "--disable", str(i), "pd")
    writes = ["-c", "write 0 64k", "-c", "write 1M 100k", "-c", "write 3999k 1k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(i)], check=True, capture_output=True)
    shutil.copyfile(i, workdir / "ro.qcow2")
    j = workdir / "j.qcow2"
    _img("create", "-f", "qcow2", str(j), "4M")
    _img("bitmap", "--add", str(j), "bad")
    _img("bitmap", "--add", str(j), "bad2")
    _set_in_use(j)


def _q(name: str, **opts: Any) -> list[Any]:
    return ["blockdev-add", {"driver": "qcow2", "node-name": name, **opts,
                             "file": {"driver": "file", "filename": f"{name}.qcow2"}}]  # fmt: skip


def _bm(cmd: str, node: str, name: str) -> list[Any]:
    return [f"block-dirty-bitmap-{cmd}", {"node": node, "name": name}]


def _add(node: str, name: str, **opts: Any) -> list[Any]:
    return ["block-dirty-bitmap-add", {"node": node, "name": name, **opts}]


def _merge(node: str, target: str, *bitmaps: Any) -> list[Any]:
    return ["block-dirty-bitmap-merge", {"node": node, "target": target, "bitmaps": list(bitmaps)}]


def _ext(node: str, name: str) -> dict[str, str]:
    return {"node": node, "name": name}


def _sha(node: str, name: str) -> list[Any]:
    return ["x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name}]


def _nbd(id_: str, node: str, *bitmaps: Any, writable: bool = True) -> list[Any]:
    return ["block-export-add", {"type": "nbd", "id": id_, "node-name": node, "name": id_,
                                 "writable": writable, "bitmaps": list(bitmaps)}]  # fmt: skip


QUERY = ["query-named-block-nodes", {"flat": True}]
SCRIPT: list[list[Any]] = [
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD}}}],
    _q("a"), _q("i"), _q("j"), _q("ro", **{"read-only": True}), _q("v2"),
    ["blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1000000}],
    QUERY,
    # add
    _add("n", "b0"), _add("n", "b0"), _add("n", "b1", granularity=1000),
    _add("n", "b1", granularity=256), _add("n", "b1", granularity=0),
    _add("n", "b1", granularity=1 << 32), _add("n", "b1", granularity=1 << 31),
    _add("n", "bp", persistent=True), _add("n", ""), _add("nope", "x"),
    _add("n", "bd", disabled=True, granularity=512),
    _add("a", "pp", persistent=True), _add("a", "pp2", persistent=True, granularity=512),
    _add("a", "%s"), _add("a", "x" * 1024), _add("a", "y" * 1024, persistent=True),
    _add("ro", "new", persistent=True), _add("ro", "new2"), _add("v2", "p", persistent=True),
    _add("j", "bad"),
    QUERY,
    # lookups
    *[_bm(cmd, "n", "zz") for cmd in ("remove", "clear", "enable", "disable")],
    *[_bm(cmd, "zz", "b0") for cmd in ("remove", "clear", "enable", "disable")],
    _sha("n", "zz"), _sha("zz", "b0"), _sha("n", "b0"), _sha("j", "bad"), _sha("ro", "pb"),
    _sha("i", "pb"), _sha("i", "pd"),
    # merge
    _merge("n", "zz", "b0"), _merge("n", "b0", "zz"), _merge("n", "b0", _ext("a", "zz")),
    _merge("n", "b0", _ext("qq", "zz")), _merge("n", "b0", "bd"),
    _merge("n", "b0", _ext("a", "pp")), _merge("j", "bad", "zz"),
    _merge("j", "bad", _ext("i", "pb")), _merge("i", "pb", _ext("j", "bad")),
    _merge("ro", "pb", _ext("i", "pb")), _merge("i", "pd", _ext("ro", "pb")),
    _sha("i", "pd"),
    # states
    _bm("enable", "n", "bd"), _bm("enable", "n", "bd"), _bm("disable", "n", "bd"),
    _bm("disable", "n", "bd"), _bm("clear", "n", "bd"),
    *[_bm(cmd, "j", "bad") for cmd in ("clear", "enable", "disable")],
    *[_bm(cmd, "ro", "pb") for cmd in ("clear", "disable", "enable", "remove")],
    _bm("remove", "j", "bad2"),
    # exports: busy bitmaps, the readonly check, writes and maps
    _nbd("e", "i", "pb", "tmp"), _add("i", "tmp"), _nbd("e", "i", "pb", "tmp"),
    _nbd("e2", "i", "pb", writable=False), _nbd("e3", "j", "bad", writable=False),
    _nbd("e4", "i", "pd", writable=False), _nbd("e5", "i", "pb"),
    _nbd("e6", "ro", "pb", writable=False), _nbd("e7", "ro", _ext("i", "pd")),
    *[_bm(cmd, "i", "pb") for cmd in ("clear", "enable", "disable", "remove")],
    _merge("i", "pb", "pd"), _merge("i", "pd", "pb"), _merge("i", "tmp", "pd"),
    _merge("i", "pb", "zz"), _merge("ro", "pb", _ext("j", "bad")),
    _merge("i", "pb", _ext("n", "b0")), _merge("a", "%s", _ext("n", "b0"), "zz"),
    _merge("a", "%s", _ext("j", "bad"), "zz"),
    _merge("a", "%s", "pp", _ext("n", "b0")),
    QUERY,
    ["!write", "e", ["write 2M 4k", "write 4000k 100k", "write 65535 2"]],
    ["!map", "e", "pb"], ["!map", "e", "tmp"], ["!map", "e4", "pd"],
    _sha("i", "pb"), _sha("i", "tmp"), _sha("i", "pd"),
    _nbd("en", "n", "b0", "bd"),
    ["!write", "en", ["write 999424 1024", "write 0 1"]],
    ["!map", "en", "b0"], ["!map", "en", "bd"],
    ["block_resize", {"node-name": "n", "size": 2000000}],
    ["block-export-del", {"id": "en"}],
    ["block_resize", {"node-name": "n", "size": 2000000}],
    ["block_resize", {"node-name": "n", "size": 500000}],
    _sha("n", "b0"),
    QUERY,
    ["block-export-del", {"id": "e"}], ["block-export-del", {"id": "e4"}],
    ["block-export-del", {"id": "e6"}], ["!settle"],
    # persistence
    _add("i", "pd", persistent=True), _add("i", "p3", persistent=True, disabled=True,
                                           granularity=1 << 20),
    _add("i", "p4", persistent=True), _bm("remove", "i", "pd"), _bm("clear", "i", "tmp"),
    _merge("i", "p4", "pb"),
    ["block_resize", {"node-name": "a", "size": 2097152}],
    ["block_resize", {"node-name": "i", "size": 8388608}],
    ["blockdev-del", {"node-name": "i"}], ["blockdev-del", {"node-name": "j"}],
    ["blockdev-del", {"node-name": "a"}],
    ["!info", "i"], ["!info", "j"], ["!info", "a"],
    _q("i"), _q("j"), _q("a"), QUERY,
    _sha("i", "pb"), _sha("i", "p3"), _sha("i", "p4"), _sha("a", "pp"),
    _bm("remove", "j", "bad"), ["blockdev-del", {"node-name": "j"}], ["!info", "j"],
]  # fmt: skip


def _query(reply: dict[str, Any]) -> Any:
    """The bitmaps of each named node, and those its image lists."""
    if "return" not in reply:
        return reply
    out = {}
    for node in reply["return"]:
        if node["node-name"].startswith("#"):
            continue
        specific = node["image"].get("format-specific", {}).get("data", {})
        out[node["node-name"]] = [node.get("dirty-bitmaps"), specific.get("bitmaps")]
    return out


def _tool(workdir: Path, step: list[Any]) -> Any:
    """The pseudo-steps: writes and maps through the NBD server, images on disk."""
    kind = step[0]
    sock = workdir / NBD
    if kind == "!write":
        cmds = [arg for c in step[2] for arg in ("-c", c)]
        url = f"nbd+unix:///{step[1]}?socket={sock}"
        done = subprocess.run(["qemu-io", "-f", "raw", *cmds, url], capture_output=True, text=True)
        return done.returncode
    if kind == "!map":
        done = subprocess.run(
            ["nbdinfo", f"--map=qemu:dirty-bitmap:{step[2]}",
             f"nbd+unix:///{step[1]}?socket={sock}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return [line.split() for line in done.stdout.splitlines()] or done.returncode
    if kind == "!info":
        path = str(workdir / f"{step[1]}.qcow2")
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                              capture_output=True, text=True)  # fmt: skip
        check = subprocess.run(["qemu-img", "check", "-U", path], capture_output=True, text=True)
        data = json.loads(info.stdout)["format-specific"]["data"] if info.stdout else None
        return [data and data.get("bitmaps"), check.returncode, check.stdout.splitlines()[:1]]
    raise AssertionError(kind)


def run_script(real: bool, workdir: Path) -> list[Any]:
    sys.path[:0] = [str(HERE.parent / "jobs"), str(HERE.parent)]
    from conversation import Daemon

    make_images(workdir)
    daemon = Daemon(workdir, real)
    out: list[Any] = []
    try:
        for step in SCRIPT:
            name = step[0]
            if name == "!settle":  # export deletions finish after their reply
                daemon.events(0.3)
                continue
            if name.startswith("!"):
                out.append([step, _tool(workdir, step)])
                continue
            reply = daemon.cmd(name, step[1])
            if name == "query-named-block-nodes":
                reply = _query(reply)
            out.append([step, reply])
            daemon.events()
    finally:
        daemon.close()
    return out


def hashes(real: bool, workdir: Path, image: str) -> dict[str, Any]:
    """The sha256 of each bitmap of ``image`` (a qcow2 in ``workdir``) as a daemon sees it."""
    sys.path[:0] = [str(HERE.parent / "jobs"), str(HERE.parent)]
    from conversation import Daemon

    daemon = Daemon(workdir, real)
    try:
        daemon.cmd(*_q(image, **{"read-only": True}))
        (node,) = [n for n in daemon.cmd("query-named-block-nodes")["return"]
                   if n["node-name"] == image]  # fmt: skip
        return {b["name"]: daemon.cmd(*_sha(image, b["name"]))
                for b in node.get("dirty-bitmaps", [])}  # fmt: skip
    finally:
        daemon.close()


if __name__ == "__main__":
    os.makedirs("/tmp/qsd-cmp/bitmaps-record", exist_ok=True)
    transcript = run_script(True, Path("/tmp/qsd-cmp/bitmaps-record"))
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(transcript, indent=1) + "\n")
