"""The filters next to QEMU 11.1's (optional, ``--real-qsd``): the same scenarios run on
both daemons through NBD give the same qemu-io output, the same option errors and the
same query-named-block-nodes entries; copy-on-read leaves the same map in the overlay."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from filters_support import EXPECTED, make_images, qemu_io, run_scenario
from nbd_server.qmp_talk import Talk
from realqsd_support import SHARE, require_real_qsd
from test_blkdebug import error_options, errors_for
from test_copy_on_read import add_cor, close, qemu_map

pytestmark = pytest.mark.realqsd


class Side:
    """One daemon (``ours`` or ``real``) with QMP and an NBD server in its own directory."""

    def __init__(self, workdir: Path, side: str) -> None:
        self.dir = workdir / side
        self.dir.mkdir()
        self.sock = self.dir / "nbd.sock"
        qmp = self.dir / "qmp.sock"
        argv = [
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--chardev", f"socket,id=m,path={qmp},server=on,wait=off",
            "--monitor", "chardev=m",
        ]  # fmt: skip
        if side == "ours":
            cmd = [sys.executable, "-m", "qsd_py", *argv]
        else:
            cmd = [str(require_real_qsd()), "run", "qemu-storage-daemon", *argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not qmp.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"{side} daemon did not come up")
            time.sleep(0.02)
        self.talk = Talk(str(qmp))

    def close(self) -> None:
        self.talk.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sides() -> Iterator[dict[str, Side]]:
    SHARE.mkdir(exist_ok=True)
    workdir = SHARE / f"filters-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    started: dict[str, Side] = {}
    try:
        for side in ("ours", "real"):
            started[side] = Side(workdir, side)
        yield started
    finally:
        for side in started.values():
            side.close()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_same_injections(sides: dict[str, Side], name: str) -> None:
    got = {k: run_scenario(s.talk, s.sock, s.dir, name) for k, s in sides.items()}
    assert got["ours"] == got["real"] == EXPECTED[name]


def test_same_option_errors(sides: dict[str, Side]) -> None:
    got = {}
    for key, side in sides.items():
        make_images(side.dir)
        options = error_options(side.dir)
        texts = errors_for(side.talk, side.dir, options)
        got[key] = [t.replace(str(side.dir), "@DIR@") for t in texts]
    assert got["ours"] == got["real"]


def entry(side: Side, name: str) -> dict[str, Any]:
    nodes = side.talk.command("query-named-block-nodes", {"flat": True})["reply"]["return"]
    found = next(n for n in nodes if n["node-name"] == name)
    return json.loads(json.dumps(found).replace(str(side.dir), "@DIR@"))


def test_same_query_and_copies(sides: dict[str, Side]) -> None:
    maps = {}
    entries = {}
    for key, side in sides.items():
        make_images(side.dir)
        add_cor(side.talk, side.dir)
        entries[key] = entry(side, "cor")
        out = qemu_io(side.sock, "cor", ["read -P 0xab 0 64k", "read -P 0xab 200k 10k"])
        assert out[0] == "read 65536/65536 bytes at offset 0"
        close(side.talk)
        maps[key] = qemu_map(side.dir / "top.qcow2")
    for key in entries:  # allocation on the host is its own business
        entries[key]["image"].pop("actual-size", None)
    assert entries["ours"] == entries["real"]
    assert maps["ours"] == maps["real"]


def test_same_blkdebug_entries(sides: dict[str, Side]) -> None:
    entries = {}
    for key, side in sides.items():
        make_images(side.dir)
        image = {"driver": "file", "node-name": "f", "filename": str(side.dir / "base.qcow2")}
        rules = {"inject-error": [{"event": "read_aio", "once": True}], "align": 512}
        for name, extra in (("d1", {}), ("d2", rules)):
            node = {"driver": "blkdebug", "node-name": name,
                    "image": {**image, "node-name": f"f{name}"}, **extra}  # fmt: skip
            assert "return" in side.talk.command("blockdev-add", node)["reply"]
        entries[key] = [entry(side, "d1"), entry(side, "d2")]
    assert entries["ours"] == entries["real"]
