"""Launching the two daemons with the same command line, and knowing when their export is up.

An export is a FUSE mount (up once the mountpoint's device changes) or an NBD server's
socket (up once it accepts a connection): fio reads the mounted file, or connects with its
``nbd`` engine to the URI :func:`nbd_uri` gives.

qsd-py and QEMU's qemu-storage-daemon take identical options, so one function builds the
arguments and only the program in front differs: ``python -m qsd_py`` on the host, or QEMU's
binary inside the real-qsd chroot (entered with chroot(8) directly, as ``real-qsd run`` does, so
start-up timing is not charged for the wrapper script). The chroot shares our mount namespace:
its FUSE mount at ``/tmp/qsd-cmp/X`` is visible on the host under the chroot root.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.cleanup import lazy_umount
from benchlib.matrix import IMAGE_SIZE, Backend, Target

REPO = Path(__file__).resolve().parents[2]
REAL_QSD = Path(os.environ.get("QSD_REAL_QSD", REPO.parent / "shared" / "tools" / "real-qsd"))
CHROOT_ENV = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]
POLL_S = 0.0005
NBD_EXPORT = "d0"  # the export's name: its node's name, QEMU's default
NBD_HOST = "127.0.0.1"
# Loopback ports of the TCP targets, one each (both daemons may be up at once).
TCP_PORTS = {"qsd-py-nbd-tcp": 10861, "qemu-nbd-tcp": 10862}


class DaemonFailed(RuntimeError):
    """The daemon exited or did not mount its export in time; carries its log's tail."""


def daemon_args(
    target: Target,
    backend: Backend,
    image: str,
    endpoint: str,
    pidfile: str,
    file_opts: str = "",
    qmp: str = "",
) -> list[str]:
    """qemu-storage-daemon options exporting ``backend`` at ``endpoint`` as ``target`` wants.

    ``endpoint`` is the FUSE mountpoint, the NBD server's socket path (``nbd-unix``) or
    ``host:port`` (``nbd-tcp``).

    ``file_opts`` (e.g. ``,aio=io_uring``) is appended to the file node's options; ``qmp``
    is a socket path for a QMP monitor (idle unless asked, between runs). Both daemons
    carry out their options in order: the monitor comes first, so that its socket is there by
    the time the export is mounted.
    """
    args: list[str] = []
    if qmp:
        args += ["--chardev", f"socket,id=bench-qmp,path={qmp},server=on,wait=off"]
        args += ["--monitor", "chardev=bench-qmp"]
    for i in range(target.iothreads):
        args += ["--object", f"iothread,id=bench-t{i}"]
    if backend.kind == "null":
        # null-co's size is an integer in the schema: keyval does not take "1G" here.
        args += ["--blockdev", f"driver=null-co,node-name=d0,size={IMAGE_SIZE}"]
    elif backend.kind == "rbd":
        conf = f"{backend.root}/ceph.conf"
        rbd_node = f"driver=rbd,node-name=f0,pool=rbd,image={image},conf={conf}"
        args += ["--blockdev", rbd_node, "--blockdev", "driver=raw,node-name=d0,file=f0"]
    else:
        file_node = f"driver=file,node-name=f0,filename={image},cache.direct=on{file_opts}"
        # The format node on top is the one exported: raw, or qcow2 with its own defaults.
        format_node = f"driver={backend.fmt},node-name=d0,file=f0"
        args += ["--blockdev", file_node, "--blockdev", format_node]
    if target.nbd:
        args += ["--nbd-server", nbd_server_option(target, endpoint)]
        export = "type=nbd,id=e0,node-name=d0,writable=on"
    else:
        export = f"type=fuse,id=e0,node-name=d0,mountpoint={endpoint},writable=on"
    if target.uring:
        export += ",io_uring=on"
    export += "".join(f",iothread.{i}=bench-t{i}" for i in range(target.iothreads))
    return args + ["--export", export, "--pidfile", pidfile]


def nbd_server_option(target: Target, endpoint: str) -> str:
    """``--nbd-server`` listening on a socket path or on ``host:port``."""
    if target.export == "nbd-tcp":
        host, port = endpoint.rsplit(":", 1)
        return f"addr.type=inet,addr.host={host},addr.port={port}"
    return f"addr.type=unix,addr.path={endpoint}"


def nbd_uri(target: Target, endpoint: str) -> str:
    """The NBD URI of the export (``endpoint`` as the host sees it)."""
    if target.export == "nbd-tcp":
        return f"nbd://{endpoint}/{NBD_EXPORT}"
    return f"nbd+unix:///{NBD_EXPORT}?socket={endpoint}"


def nbd_accepts(endpoint: str) -> bool:
    """Whether an NBD server listens at ``endpoint`` (a socket path or ``host:port``)."""
    if ":" in endpoint and not endpoint.startswith("/"):
        host, port = endpoint.rsplit(":", 1)
        family, addr = socket.AF_INET, (host, int(port))
    else:
        family, addr = socket.AF_UNIX, endpoint
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(addr)
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class StartTimes:
    """Seconds from just before fork to: the export serving ``stat``; the pidfile existing."""

    mounted_s: float
    pidfile_s: float


class Daemon:
    """One running daemon with one export that the host's fio reads at ``fio_path`` (the
    mounted file, or the NBD URI when ``nbd_endpoint`` is where its NBD server listens).
    ``mount`` is the mountpoint when it is not ``fio_path`` itself (libfuse mounts a
    directory, and the image is a file in it)."""

    def __init__(
        self,
        argv: list[str],
        fio_path: str,
        pidfile: str,
        log: Path,
        cwd: str,
        qmp: str = "",
        nbd_endpoint: str = "",
        mount: str = "",
    ) -> None:
        self.argv, self.fio_path, self.pidfile, self.log, self.cwd = (
            argv,
            fio_path,
            pidfile,
            log,
            cwd,
        )
        self.qmp = qmp  # its QMP socket as the host sees it ("" without one)
        self.nbd_endpoint = nbd_endpoint
        self.mount = mount or fio_path
        self.proc: subprocess.Popen | None = None

    def _serving(self, dev0: int) -> bool:
        if self.nbd_endpoint:
            return nbd_accepts(self.nbd_endpoint)
        return os.stat(self.mount).st_dev != dev0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float) -> StartTimes:
        """Fork the daemon and wait until its export answers; raise DaemonFailed otherwise."""
        dev0 = -1 if self.nbd_endpoint else os.stat(self.mount).st_dev
        Path(self.pidfile).unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            t0 = time.perf_counter()
            # Own session: a Ctrl-C at the terminal reaches only us; we stop daemons in order.
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=log, cwd=self.cwd, start_new_session=True
            )
        pidfile_s = float("nan")
        while True:
            now = time.perf_counter() - t0
            if pidfile_s != pidfile_s and os.path.exists(self.pidfile):
                pidfile_s = now
            if self.proc.poll() is not None:
                raise DaemonFailed(f"exited with {self.proc.returncode}: {self.log_tail()}")
            if self._serving(dev0):
                return StartTimes(now, pidfile_s)
            if now > timeout:
                self.stop()
                raise DaemonFailed(f"no export after {timeout:g} s: {self.log_tail()}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """SIGTERM (the daemon unmounts and exits 0), SIGKILL if it hangs, then lazy umount."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.nbd_endpoint:
            lazy_umount(self.mount)
        elif self.nbd_endpoint.startswith("/"):
            Path(self.nbd_endpoint).unlink(missing_ok=True)
        Path(self.pidfile).unlink(missing_ok=True)
        if self.qmp:
            Path(self.qmp).unlink(missing_ok=True)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


class RealQsd:
    """QEMU's daemon in the real-qsd chroot; ``note`` says why it is unavailable, if it is."""

    def __init__(self, tool: Path = REAL_QSD) -> None:
        self.tool = tool
        self.root = ""
        self.version = ""
        self.note = ""

    def probe(self) -> bool:
        if not self.tool.exists():
            self.note = f"{self.tool} not found"
            return False
        out = subprocess.run([str(self.tool), "host-path", "/"], capture_output=True, text=True)
        self.root = out.stdout.strip().rstrip("/")
        if not os.access(f"{self.root}/usr/bin/qemu-storage-daemon", os.X_OK):
            self.note = f"real-qsd is not set up (no daemon under {self.root}); run: real-qsd setup"
            return False
        # `run` bind-mounts /dev, /dev/shm, /proc, /tmp/qsd-cmp... into the chroot if needed.
        ver = subprocess.run(
            [str(self.tool), "run", "qemu-storage-daemon", "--version"],
            capture_output=True,
            text=True,
        )
        if ver.returncode != 0:
            self.note = f"real-qsd run failed: {ver.stderr.strip()}"
            return False
        self.version = ver.stdout.splitlines()[0].strip()
        return True

    def argv(self, args: list[str]) -> list[str]:
        return ["chroot", self.root, *CHROOT_ENV, "qemu-storage-daemon", *args]

    def host_path(self, path: str) -> str:
        return self.root + path


class QsdPy:
    """qsd-py run from the repository with the benchmark's own interpreter (the venv's)."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.note = ""

    def probe(self) -> bool:
        try:
            out = subprocess.run(
                [self.python, "-m", "qsd_py", "--help"],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            self.note = "python -m qsd_py --help did not finish in 60 s"
            return False
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.note = f"python -m qsd_py --help failed ({out.returncode}): {last}"
            return False
        return True

    def argv(self, args: list[str]) -> list[str]:
        return [self.python, "-m", "qsd_py", *args]


LIBFUSE_ANCHOR = Path(os.environ.get("QSD_LIBFUSE_ANCHOR", "/var/tmp/libfuse-anchor"))


class Libfuse:
    """libfuse's C ``passthrough_hp`` as ../shared/tools/libfuse-anchor/build.sh builds it.

    It serves a directory: the image's own directory is its source, and fio reads the image
    under the mountpoint. ``--nopassthrough`` keeps every read and write going through the
    server (with kernel passthrough the kernel would read the file itself and no server would
    be measured); O_DIRECT opens get direct I/O and parallel direct writes, as qsd-py's export.
    """

    def __init__(self, anchor: Path = LIBFUSE_ANCHOR) -> None:
        self.binary = anchor / "libfuse" / "build" / "example" / "passthrough_hp"
        self.version = ""
        self.note = ""

    def probe(self) -> bool:
        if not os.access(self.binary, os.X_OK):
            self.note = f"{self.binary} is not built; run ../shared/tools/libfuse-anchor/build.sh"
            return False
        meson = self.binary.parents[2] / "meson.build"  # the source tree's project version
        lines = meson.read_text().splitlines() if meson.exists() else []
        found = [ln.split("'")[1] for ln in lines if ln.strip().startswith("version:")]
        self.version = f"libfuse {found[0]}" if found else "libfuse (version unknown)"
        return True

    def argv(self, target: Target, source: str, mountpoint: str) -> list[str]:
        opts = ["--foreground", "--nopassthrough"]
        if target.uring:
            opts += ["-o", "io_uring"]
            if target.queue_depth:
                opts += ["-o", f"io_uring_q_depth={target.queue_depth}"]
        return [str(self.binary), *opts, source, mountpoint]
