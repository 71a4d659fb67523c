"""What gets measured: the fio jobs, the backends and the targets, by name.

Everything is data so the command line can pick subsets by name and the report can print the
definitions it ran with.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIZE = 1 << 30  # 1 GiB, as the issue asks; null-co gets the same length and qcow2 too
QCOW2_CLUSTER = 64 << 10  # QEMU's default cluster size, named in the issue


@dataclass(frozen=True)
class Job:
    """One workload. ``rw`` is fio's ``--rw``; ``mix`` its ``--rwmixread`` for randrw.

    ``tool`` is ``fio``, or ``nbdcopy`` (libnbd's copier, NBD targets only): the whole export
    copied to ``null:`` (``rw`` read) or a file of the export's size copied onto it (write),
    with its default requests of ``bs`` and ``iodepth`` of them in flight per connection.
    """

    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    mix: int | None = None
    tool: str = "fio"

    @property
    def label(self) -> str:
        """Short human label for tables and plots."""
        jobs = f"x{self.numjobs}" if self.numjobs > 1 else ""
        mix = f" {self.mix}/{100 - self.mix}" if self.mix is not None else ""
        return f"{self.bs} {self.rw}{mix} QD{self.iodepth}{jobs}"


@dataclass(frozen=True)
class Backend:
    """Where the exported data lives. ``kind``: ``file`` (an image in ``root``), ``null``, or
    ``rbd`` (an image in the bench's mini-ceph cluster, whose directory is ``root``).

    A file backend's image is raw, or qcow2 (``fmt``) in one of two states (``state``):
    ``allocated`` (every cluster allocated and referenced once, so writes go in place) or
    ``fresh`` (empty: every first write of a cluster allocates it; re-made before every fio
    run, so that every target and round starts from the same empty image). ``raw`` names the
    raw backend on the same storage, whose IOPS the qcow2 ones are compared with.
    """

    name: str
    kind: str
    root: str = ""
    fmt: str = "raw"
    state: str = ""
    raw: str = ""

    @property
    def fresh(self) -> bool:
        """A fresh image is used once: every fio run gets a new one and a new daemon."""
        return self.state == "fresh"


@dataclass(frozen=True)
class Target:
    """Something fio reads: the image itself, or an export of one of the two daemons.

    ``daemon`` is ``None`` (the bare file), ``"qsd-py"``, ``"qemu"`` or ``"libfuse"`` (libfuse's
    C ``passthrough_hp`` serving the image's directory, the reference FUSE server); ``export`` is
    ``fuse`` (fio reads the mounted file), ``nbd-unix`` or ``nbd-tcp`` (fio's ``nbd`` engine
    and nbdcopy connect to the daemon's NBD server, over a UNIX socket or loopback TCP), or
    ``librbd`` (no daemon: fio's ``rbd`` engine reads the rbd backend's image itself, the
    ceiling a daemon over librbd can reach on this machine);
    ``uring`` selects the FUSE-over-io_uring transport; ``iothreads`` > 0 adds that many
    iothread objects and spreads the export over them with ``iothread.N=``. ``versus`` names
    the target its ``x qemu`` ratio divides by when that is not the run's reference (an NBD
    export is compared with QEMU's NBD export over the same socket kind). ``queue_depth``
    (libfuse over io_uring only) sets libfuse's entries per queue; 0 keeps what it ships (8).
    ``baseline``: qsd-py run from the tree ``--baseline DIR`` names (an older commit), so a
    change is measured before and after in the same run.
    """

    name: str
    daemon: str | None
    uring: bool = False
    iothreads: int = 0
    export: str = "fuse"
    versus: str = ""
    queue_depth: int = 0
    baseline: bool = False

    @property
    def nbd(self) -> bool:
        return self.export.startswith("nbd")


JOBS: dict[str, Job] = {
    j.name: j
    for j in (
        Job("randread-qd1", "randread", "4k", 1),
        Job("randread-qd16x2", "randread", "4k", 16, 2),
        Job("randwrite-qd16x2", "randwrite", "4k", 16, 2),
        Job("randrw70-qd64", "randrw", "4k", 64, 1, mix=70),
        Job("read1m-qd4", "read", "1M", 4),
        Job("write1m-qd4", "write", "1M", 4),
        Job("nbdcopy-read", "read", "256k", 64, tool="nbdcopy"),
        Job("nbdcopy-write", "write", "256k", 64, tool="nbdcopy"),
    )
}

# The disk backend must not be tmpfs: /tmp here is ext4 on the root disk, and it is what the
# real-qsd chroot shares (bind mount), so one image path works on both sides.
# The tmpfs backend uses /dev/shm, which real-qsd also bind-mounts into its chroot.
DISK_ROOT = "/tmp/qsd-cmp/qsd-bench/disk"
TMPFS_ROOT = "/dev/shm/qsd-bench"
# The rbd backend's cluster (ceph.py): its conf file must be visible in the chroot too.
CEPH_DIR = "/tmp/qsd-cmp/qsd-bench-ceph"
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("disk", "file", DISK_ROOT),
        Backend("tmpfs", "file", TMPFS_ROOT),
        Backend("null", "null"),
        Backend("qcow2-disk-allocated", "file", DISK_ROOT, "qcow2", "allocated", "disk"),
        Backend("qcow2-disk-fresh", "file", DISK_ROOT, "qcow2", "fresh", "disk"),
        Backend("qcow2-tmpfs-allocated", "file", TMPFS_ROOT, "qcow2", "allocated", "tmpfs"),
        Backend("qcow2-tmpfs-fresh", "file", TMPFS_ROOT, "qcow2", "fresh", "tmpfs"),
        # Not in the default set: it needs Ceph's Debian packages (mini-ceph install).
        Backend("rbd", "rbd", CEPH_DIR),
    )
}

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("file", None),
        # fio's rbd engine on the rbd backend's image (not in the default set): librbd alone.
        Target("librbd", None, export="librbd"),
        Target("qsd-py", "qsd-py"),
        Target("qsd-py-uring", "qsd-py", uring=True),
        Target("qemu", "qemu"),
        Target("qemu-iot2", "qemu", iothreads=2),
        # Not in the default set; useful once qsd-py spreads queues over iothreads.
        Target("qsd-py-uring-iot2", "qsd-py", uring=True, iothreads=2),
        # NBD exports (not in the default set): each daemon's over a UNIX socket and TCP.
        Target("qsd-py-nbd-unix", "qsd-py", export="nbd-unix", versus="qemu-nbd-unix"),
        Target("qsd-py-nbd-tcp", "qsd-py", export="nbd-tcp", versus="qemu-nbd-tcp"),
        Target("qemu-nbd-unix", "qemu", export="nbd-unix", versus="qemu-nbd-unix"),
        Target("qemu-nbd-tcp", "qemu", export="nbd-tcp", versus="qemu-nbd-tcp"),
        # libfuse's passthrough_hp (not in the default set; built by
        # ../shared/tools/libfuse-anchor/build.sh): over io_uring with its own queue depth
        # and with qsd-py's (64), and over /dev/fuse.
        Target("libfuse-uring", "libfuse", uring=True),
        Target("libfuse-uring-qd64", "libfuse", uring=True, queue_depth=64),
        Target("libfuse", "libfuse"),
        # qsd-py of another tree (--baseline DIR): before/after a change in one run.
        Target("qsd-py-base", "qsd-py", baseline=True),
        Target("qsd-py-uring-base", "qsd-py", uring=True, baseline=True),
        Target(
            "qsd-py-nbd-unix-base",
            "qsd-py",
            export="nbd-unix",
            versus="qemu-nbd-unix",
            baseline=True,
        ),
    )
}

DEFAULT_TARGETS = ("file", "qsd-py", "qsd-py-uring", "qemu", "qemu-iot2")
DEFAULT_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.kind != "rbd")
DEFAULT_JOBS = tuple(j.name for j in JOBS.values() if j.tool == "fio")
NBD_TARGETS = ("qsd-py-nbd-unix", "qemu-nbd-unix", "qsd-py-nbd-tcp", "qemu-nbd-tcp")
LIBFUSE_TARGETS = ("libfuse-uring", "libfuse-uring-qd64", "libfuse")

# --quick: a ~2-minute development subset (one small-block and one large-block job).
QUICK_BACKENDS = ("tmpfs", "null")
QUICK_JOBS = ("randread-qd16x2", "read1m-qd4")

# The target every ratio is taken against, and the qsd-py targets the plot is about.
REFERENCE_TARGET = "qemu"


def pick(names: str | None, table: dict, default: tuple[str, ...]) -> list:
    """Resolve a comma-separated list of names (``None``: the default) against ``table``."""
    chosen = default if names is None else tuple(n for n in names.split(",") if n)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise ValueError(f"unknown name(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return [table[n] for n in chosen]


def applies(target: Target, backend: Backend) -> bool:
    """qsd-py and QEMU serve every backend; the bare file and libfuse's passthrough (which
    serves files as they are) only a raw image: on null-co there is nothing to read, and a
    qcow2 file read as it is would be its metadata and clusters. The bare ``librbd``
    target only reads an RBD image."""
    if target.daemon in ("qsd-py", "qemu"):
        return True
    if target.export == "librbd" or backend.kind == "rbd":
        return target.export == "librbd" and backend.kind == "rbd"
    return backend.kind == "file" and backend.fmt == "raw"


def job_applies(job: Job, target: Target) -> bool:
    """fio runs on every target; nbdcopy only on NBD exports."""
    return job.tool == "fio" or target.nbd


def versus(targets: dict[str, Target] = TARGETS) -> dict[str, str]:
    """The targets whose ratio divides by another than the run's reference, by name."""
    return {t.name: t.versus for t in targets.values() if t.versus}


def raw_peers(backends: dict[str, Backend] = BACKENDS) -> dict[str, str]:
    """Each qcow2 backend's raw backend on the same storage, by name."""
    return {b.name: b.raw for b in backends.values() if b.raw}
