"""End-to-end helpers for qcow2 exports: a qsd-py daemon run as users run it (a subprocess
with ``--blockdev``/``--export`` on its command line), the host's QEMU tools on the image
files, and fio on the mounted export.

The daemon's stderr goes to a log file, not a pipe: a test that never reads a pipe would block
a daemon that logs more than the pipe holds, and a crash test wants the log of a killed one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import fuse_mounts_under

KiB = 1 << 10
MiB = 1 << 20
QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
#: What the node logs when it gives up a cluster rather than reuse it (fast-path reader late).
LEAK_LOG = "qcow2: leaking cluster"


def run(argv: list[str], *, cwd: Path | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a tool; with ``check`` raise with its output if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done


def create(path: Path, size: int | str, *, backing: Path | None = None, **opts: Any) -> Path:
    """``qemu-img create -f qcow2`` (options with QEMU's names, ``-o key=value``)."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing is not None:
        argv += ["-b", backing.name, "-F", "qcow2"]
    run([*argv, str(path), str(size)], cwd=path.parent)
    return path


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> str:
    argv = [QEMU_IO, "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    return run([*argv, str(path)], cwd=path.parent).stdout


def check(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json``; fails on anything but a clean image or leaks
    (exit 0 or 3) and on any corruption or check error. Returns QEMU's report."""
    done = run([QEMU_IMG, "check", "--output=json", str(path)], cwd=path.parent, check=False)
    assert done.returncode in (0, 3), f"qemu-img check exited {done.returncode}:\n" + (
        run([QEMU_IMG, "check", str(path)], cwd=path.parent, check=False).stdout + done.stderr
    )
    report = json.loads(done.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def check_clean(path: Path, log: str = "") -> dict[str, Any]:
    """:func:`check`, and leaks only if the daemon's ``log`` says it leaked clusters."""
    report = check(path)
    if LEAK_LOG not in log:
        assert report.get("leaks", 0) == 0, (report, log)
    return report


def convert_raw(image: Path, out: Path) -> Path:
    """What QEMU reads from ``image`` (backing chain included), as a raw file."""
    run([QEMU_IMG, "convert", "-O", "raw", str(image), str(out)], cwd=image.parent)
    return out


def qemu_map(image: Path, *, force_share: bool = False) -> list[dict[str, Any]]:
    argv = [QEMU_IMG, "map", "--output=json", *(["-U"] if force_share else []), str(image)]
    return json.loads(run(argv, cwd=image.parent).stdout)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes still alive: {pids}"
        time.sleep(0.01)


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io of a whole process (all its threads): bytes it moved by syscalls."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _extra(opts: str) -> str:
    """Options appended to a ``key=value,...`` argument."""
    return f",{opts}" if opts else ""


class ExportDaemon:
    """qsd-py serving one qcow2 image (``file`` node ``f0``, ``qcow2`` node ``q0``) at
    ``mnt`` over ``transport`` ("dev-fuse" or "io_uring"), with a QMP socket."""

    def __init__(
        self,
        workdir: Path,
        image: Path,
        mnt: Path,
        transport: str,
        *,
        qcow2_opts: str = "",
        file_opts: str = "",
        export_opts: str = "",
    ) -> None:
        self.workdir, self.image, self.mnt, self.transport = workdir, image, mnt, transport
        self.qmp_path = workdir / "qmp.sock"
        self.pidfile = workdir / "qsd.pid"
        self.log_path = workdir / "qsd.log"
        uring = "on" if transport == "io_uring" else "off"
        self.argv = [
            sys.executable, "-m", "qsd_py",
            "--blockdev", f"driver=file,node-name=f0,filename={image}{_extra(file_opts)}",
            "--blockdev", f"driver=qcow2,node-name=q0,file=f0{_extra(qcow2_opts)}",
            "--export", f"type=fuse,id=e0,node-name=q0,mountpoint={mnt},writable=on,"
                        f"io_uring={uring}{_extra(export_opts)}",
            "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
            "--pidfile", str(self.pidfile),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: Any = None
        self.logs: list[str] = []  # the logs of earlier runs (restarts)

    # --- life ------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> ExportDaemon:
        """Start and wait for the pidfile (written once the export is mounted)."""
        mnt = self.mnt
        if not mnt.exists():
            mnt.touch()
        for stale in (self.pidfile, self.qmp_path):
            stale.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while not self.pidfile.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qsd-py exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"qsd-py did not write its pidfile:\n{self.log()}")
            time.sleep(0.01)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qmp(self) -> Any:
        """A connected legacy QMP client (one per daemon run)."""
        if self._qmp is None:
            from qemu.qmp.legacy import QEMUMonitorProtocol

            self._qmp = QEMUMonitorProtocol(str(self.qmp_path))
            self._qmp.connect()
        return self._qmp

    def cmd(self, name: str, **args: Any) -> Any:
        return self.qmp().cmd(name, **args)

    def queues(self) -> dict[str, Any]:
        """This export's x-query-fuse-queues answer."""
        (answer,) = self.cmd("x-query-fuse-queues", id="e0")
        return answer

    def worker_pids(self) -> list[int]:
        """The queue worker processes (io_uring without iothreads), else []."""
        return sorted({q["thread-id"] for q in self.queues()["uring-queues"]} - {self.pid})

    def stop(self, timeout: float = 30.0) -> None:
        """``quit`` over QMP: the daemon must exit 0 and leave no mount behind."""
        assert self.proc is not None
        try:
            self.cmd("quit")
        except (EOFError, ConnectionError):
            pass  # it may hang up before answering, as QEMU may
        self._close_qmp()
        rc = self.proc.wait(timeout)
        assert rc == 0, f"qsd-py exited {rc}:\n{self.log()}"
        assert not fuse_mounts_under(self.mnt), "the export's mount outlived the daemon"
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash: wait until the daemon and its queue workers are gone (they
        hold the image's fd, hence its locks), then detach the dead mount."""
        if self.proc is None:
            return
        workers = []
        if self.transport == "io_uring" and self.proc.poll() is None:
            workers = [int(p) for p in _children(self.proc.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close_qmp()
        wait_gone(workers)
        subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)
        self.proc = None

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except (EOFError, OSError):
                pass
            self._qmp = None


def _children(pid: int) -> list[str]:
    """Child pids of ``pid`` (its queue workers, forked by any of its threads), read before
    it dies: afterwards they are reparented and cannot be told apart."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += (task / "children").read_text().split()
        except OSError:
            pass
    return found


def fio(filename: Path, *args: str, direct: bool = True, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """fio on one file (through io_uring with O_DIRECT on an export, psync on a plain file);
    fails the test with fio's output if fio fails. Runs in ``cwd`` (fio leaves verify state
    files in its working directory)."""
    engine = ["--direct=1", "--ioengine=io_uring"] if direct else ["--ioengine=psync"]
    argv = ["fio", "--name=j", f"--filename={filename}", *engine, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or filename.parent)  # fmt: skip
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stdout}\n{done.stderr}"
    return done


def pread_direct(path: Path, offset: int, size: int) -> bytes:
    """An O_DIRECT read (page-aligned buffer) of ``path``: what the export answers, not the
    page cache."""
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))
        n = os.preadv(fd, [memoryview(buf)[:size]], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def dump(path: Path, out: Path, size: int, chunk: int = MiB) -> Path:
    """Copy the first ``size`` bytes of ``path`` with O_DIRECT reads into ``out``."""
    with open(out, "wb") as f:
        for pos in range(0, size, chunk):
            f.write(pread_direct(path, pos, min(chunk, size - pos)))
    return out
