"""The ``rbd`` backend's cluster: one throw-away mini-ceph for the whole bench run.

Both daemons reach it through the same conf file, under /tmp/qsd-cmp so that QEMU's daemon
in the real-qsd chroot sees it at the same path (the cluster listens on loopback only, which
the chroot shares). Each target gets its own RBD image (a daemon that writes must not share
one), filled with the same non-zero data so that reads reach the OSD's store, not holes.
The OSD's process is known (:meth:`BenchCluster.osd_pid`) so a run can charge its CPU too:
on this one machine, what the OSD spends per request bounds what any client can reach.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from benchlib.images import fill_raw
from benchlib.matrix import CEPH_DIR, IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]
MINI_CEPH = Path(os.environ.get("QSD_MINI_CEPH", REPO.parent / "shared" / "tools" / "mini-ceph"))
POOL = "rbd"
# What the first image is imported from (then copied inside the cluster for the others).
FILL_SOURCE = "/dev/shm/qsd-bench-rbd-source.img"


class BenchCluster:
    """A running mini-ceph cluster in :data:`CEPH_DIR` and the images made in it."""

    def __init__(self) -> None:
        self.dir = Path(CEPH_DIR)
        self.conf = self.dir / "ceph.conf"
        self.images: list[str] = []
        self.note = ""

    def start(self) -> bool:
        """Start the cluster; False (and :attr:`note` says why) if it cannot run here."""
        if not MINI_CEPH.exists():
            self.note = f"no mini-ceph at {MINI_CEPH}"
            return False
        if shutil.which("ceph-osd") is None:
            self.note = "Ceph is not installed: run mini-ceph install"
            return False
        if self.dir.exists():  # left over from a run that was killed
            subprocess.run([str(MINI_CEPH), "stop", str(self.dir)], capture_output=True)
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([str(MINI_CEPH), "start", str(self.dir)], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        if done.returncode:
            self.note = f"mini-ceph start failed: {done.stderr.strip()[-300:]}"
            return False
        return True

    def stop(self) -> None:
        subprocess.run([str(MINI_CEPH), "stop", str(self.dir)], capture_output=True, timeout=120)
        Path(FILL_SOURCE).unlink(missing_ok=True)

    def make_image(self, name: str, shared: bool = False) -> None:
        """``name`` full of data: the first one imported, the others copied from it.

        ``shared``: without RBD's exclusive lock (and the object map and fast diff that need
        it), for fio's rbd engine, whose jobs each open their own handle: with the lock, two
        jobs writing would pass it back and forth on every write."""
        self.remove_image(name)
        if self.images:
            self._rbd("cp", "--no-progress", f"{POOL}/{self.images[0]}", f"{POOL}/{name}")
        else:
            if not Path(FILL_SOURCE).exists():
                fill_raw(FILL_SOURCE, IMAGE_SIZE)
            self._rbd("import", "--no-progress", FILL_SOURCE, f"{POOL}/{name}")
        self.images.append(name)
        if shared:
            self._rbd("feature", "disable", f"{POOL}/{name}", "fast-diff", "object-map",
                      "exclusive-lock")  # fmt: skip

    def osd_pid(self) -> int | None:
        """The OSD's process id, from the ``pids`` file mini-ceph keeps (None if absent)."""
        try:
            lines = (self.dir / "pids").read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            name, _, pid = line.partition(" ")
            if name.startswith("osd") and pid.strip().isdigit():
                return int(pid)
        return None

    def remove_image(self, name: str) -> None:
        subprocess.run(["rbd", "-c", str(self.conf), "rm", "--no-progress", f"{POOL}/{name}"],
                       capture_output=True)  # fmt: skip
        if name in self.images:
            self.images.remove(name)

    def _rbd(self, *args: str) -> None:
        done = subprocess.run(["rbd", "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"rbd {' '.join(args)}: {done.stderr.strip()}")
