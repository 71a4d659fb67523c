"""One real Ceph cluster (../shared/tools/mini-ceph: a monitor and an OSD on loopback) for
every RBD test of the session: started on first use (~8 s), always stopped at the end."""

from __future__ import annotations

import itertools
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CANDIDATES = [Path("/work/shared/tools/mini-ceph"), REPO.parent / "shared/tools/mini-ceph"]


def mini_ceph() -> Path:
    for tool in CANDIDATES:
        if tool.exists():
            return tool
    pytest.fail("the RBD tests need ../shared/tools/mini-ceph (and `mini-ceph install`)")


class Cluster:
    """A running mini-ceph cluster: its conf file, its daemons' pids, and the ``rbd`` CLI
    pointed at it."""

    def __init__(self, tool: Path, workdir: Path) -> None:
        self.tool = tool
        self.dir = workdir
        self.conf = workdir / "ceph.conf"
        self._names = itertools.count()

    def rbd(self, *args: str, data: bytes | None = None) -> bytes:
        done = subprocess.run(
            ["rbd", "-c", str(self.conf), *args],
            input=data,
            capture_output=True,
            timeout=60,
        )
        if done.returncode:
            raise AssertionError(f"rbd {' '.join(args)}: {done.stderr.decode()}")
        return done.stdout

    def new_image(self, size: int, prefix: str = "img") -> str:
        """A fresh image of ``size`` bytes (4 MiB objects) with a name no other test uses."""
        name = f"{prefix}{next(self._names)}"
        self.rbd("create", "--size", f"{size}B", f"rbd/{name}")
        return name

    def import_image(self, data: bytes, prefix: str = "imp") -> str:
        """A fresh image holding ``data`` (``rbd import`` from stdin)."""
        name = f"{prefix}{next(self._names)}"
        self.rbd("import", "--no-progress", "-", f"rbd/{name}", data=data)
        return name

    def export(self, image: str) -> bytes:
        """The image's bytes as ``rbd export`` reads them."""
        return self.rbd("export", f"rbd/{image}", "-")

    def pid(self, daemon: str) -> int:
        """The pid mini-ceph recorded for ``daemon`` (``mon.a``, ``osd.0``)."""
        for line in (self.dir / "pids").read_text().splitlines():
            name, pid = line.split()
            if name == daemon:
                return int(pid)
        raise KeyError(daemon)

    def blockdev(self, node: str, image: str, **extra: str) -> str:
        """A ``--blockdev`` argument for ``image`` of this cluster."""
        opts = f"driver=rbd,node-name={node},pool=rbd,image={image},conf={self.conf}"
        return ",".join([opts, *(f"{k}={v}" for k, v in extra.items())])


@pytest.fixture(scope="session")
def ceph() -> Iterator[Cluster]:
    tool = mini_ceph()
    workdir = Path(tempfile.mkdtemp(prefix="qsd-rbd-")) / "ceph"
    try:
        subprocess.run([str(tool), "start", str(workdir)], check=True, capture_output=True,
                       timeout=180)  # fmt: skip
        yield Cluster(tool, workdir)
    finally:
        subprocess.run([str(tool), "stop", str(workdir)], capture_output=True, timeout=120)
        workdir.parent.rmdir()
