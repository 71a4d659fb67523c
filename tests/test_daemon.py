"""The whole daemon as users and harnesses run it: ``python -m qsd_py`` in a subprocess.

Signals and ``quit`` under I/O, start-up failures that must leave no mount behind, the
pidfile as a readiness signal, ``--daemonize``, a client-mode QMP chardev (QEMU's iotests'
way), a crashed daemon's dead mount, data reaching the image, and the CLI's error lines.
Every FUSE mount under tmp_path is lazily unmounted by the ``qsd`` fixture, even on failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from support import Qsd, fuse_mounts_under, umount_all_under

MiB = 1 << 20
LOAD_IMAGE_SIZE = 1 << 30  # sparse: big enough that the load is still running at the signal


def make_image(tmp_path: Path, name: str = "img", size: int = 64 * MiB) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def mountpoint(tmp_path: Path, name: str = "mnt") -> Path:
    path = tmp_path / name
    path.touch()
    return path


def file_export_args(img: Path, mnt: Path, node: str = "f0", export: str = "e0") -> list[str]:
    return [
        "--blockdev",
        f"file,node-name={node},filename={img}",
        "--export",
        f"type=fuse,id={export},node-name={node},mountpoint={mnt},writable=on",
    ]


def start_load(kind: str, mnt: Path) -> subprocess.Popen[str]:
    """I/O against the export that runs far longer than the test waits."""
    if kind == "fio":
        argv = [
            "fio",
            "--name=load",
            f"--filename={mnt}",
            "--rw=randrw",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--numjobs=2",
            "--time_based",
            "--runtime=120",
            f"--size={LOAD_IMAGE_SIZE}",
        ]
    else:
        argv = ["dd", f"if={mnt}", "of=/dev/null", "bs=4k", "iflag=direct"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_open(proc: subprocess.Popen[str], mnt: Path, timeout: float = 30) -> None:
    """Wait until ``proc`` or a process it forked holds the mounted file open: fio's jobs
    open it a while after fio starts (long under load), and a job that opened it only after
    the daemon unmounted would write to the plain file below and never fail."""
    dev = os.stat(mnt).st_dev
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(_holds(pid, dev) for pid in _tree(proc.pid)):
            return
        assert proc.poll() is None, (
            f"the load ended early: {proc.stderr.read() if proc.stderr else ''}"
        )
        time.sleep(0.02)
    pytest.fail(f"the load did not open {mnt} in {timeout:g} s")


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (fio's job processes call setsid: not its group)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:
        tree += [child for child, parent in parents.items() if parent == pid]
    return tree


def _holds(pid: int, dev: int) -> bool:
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/fd/{fd}").st_dev == dev:
                    return True
    return False


@contextlib.contextmanager
def killed_at_end(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        for pid in _tree(proc.pid):  # fio's jobs too: they outlive a killed parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- signals and quit ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stop", "load"),
    [
        (signal.SIGTERM, "fio"),
        (signal.SIGINT, "dd"),
        (signal.SIGHUP, "fio"),
        ("quit", "dd"),
    ],
    ids=["SIGTERM-fio", "SIGINT-dd", "SIGHUP-fio", "quit-dd"],
)
def test_stop_under_io_unmounts_and_exits_0(
    qsd: Callable[..., Qsd], tmp_path: Path, stop: signal.Signals | str, load: str
) -> None:
    img = make_image(tmp_path, size=LOAD_IMAGE_SIZE)
    mnt, mnt2 = mountpoint(tmp_path), mountpoint(tmp_path, "mnt2")
    daemon = qsd(
        *file_export_args(img, mnt),
        "--export",
        f"type=fuse,id=e1,node-name=f0,mountpoint={mnt2}",
    )
    assert sorted(fuse_mounts_under(tmp_path)) == sorted([str(mnt), str(mnt2)])
    with killed_at_end(start_load(load, mnt)) as io:
        wait_until_open(io, mnt)
        time.sleep(0.2)
        if stop == "quit":
            client = daemon.qmp()
            try:
                assert client.cmd_raw("quit") == {"return": {}}
            finally:
                with contextlib.suppress(EOFError, OSError):
                    client.close()
            status = daemon.wait(20)
        else:
            status = daemon.stop(stop)
        assert status == 0, daemon.stderr()
        assert fuse_mounts_under(tmp_path) == []
        try:
            io_status = io.wait(20)  # an error, not a hang
        except subprocess.TimeoutExpired:
            pytest.fail(f"{load} hangs after the daemon exited")
        assert io_status != 0
    assert not daemon.pidfile.exists()  # removed on the way out


# --- start-up ------------------------------------------------------------------------------
def test_failed_later_export_unmounts_the_earlier_one(
    qsd: Callable[..., Qsd], tmp_path: Path
) -> None:
    """QEMU leaves the first export mounted and dead here; qsd-py unmounts it."""
    img, mnt = make_image(tmp_path), mountpoint(tmp_path)
    missing = tmp_path / "missing"
    bad = f"type=fuse,id=e1,node-name=f0,mountpoint={missing}"
    daemon = qsd(*file_export_args(img, mnt), "--export", bad, wait=False)
    assert daemon.wait() == 1
    assert daemon.stderr() == (
        f"qsd-py: --export {bad}: Failed to stat '{missing}': No such file or directory\n"
    )
    assert fuse_mounts_under(tmp_path) == []  # from /proc/self/mountinfo
    assert os.stat(mnt).st_size == 0  # the plain file again, not ENOTCONN
    assert not daemon.pidfile.exists()


def test_pidfile_appears_only_after_the_mount(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    img, mnt = make_image(tmp_path), mountpoint(tmp_path)
    daemon = qsd(*file_export_args(img, mnt), wait=False)
    deadline = time.monotonic() + 15
    while not daemon.pidfile.exists():
        assert daemon.proc.poll() is None, daemon.stderr()
        assert time.monotonic() < deadline, "no pidfile"
        time.sleep(0.0005)
    assert fuse_mounts_under(tmp_path) == [str(mnt)]  # already mounted when the pidfile shows
    assert os.stat(mnt).st_size == 64 * MiB
    assert daemon.pidfile.read_text() == f"{daemon.proc.pid}\n"
    assert daemon.stop() == 0


def test_daemonize(tmp_path: Path) -> None:
    """The parent exits 0 once the child serves; the child goes on until it is signalled."""
    img, mnt = make_image(tmp_path), mountpoint(tmp_path)
    pidfile, sock = tmp_path / "qsd.pid", tmp_path / "qmp.sock"
    argv = [
        sys.executable,
        "-m",
        "qsd_py",
        "--daemonize",
        *file_export_args(img, mnt),
        "--chardev",
        f"socket,id=qmp0,path={sock},server=on,wait=off",
        "--monitor",
        "chardev=qmp0",
        "--pidfile",
        str(pidfile),
    ]
    pid = None
    try:
        parent = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert parent.returncode == 0, parent.stderr
        assert parent.stderr == ""
        # Ready before the parent returned: pidfile written, export mounted.
        pid = int(pidfile.read_text())
        assert pid_alive(pid)
        assert fuse_mounts_under(tmp_path) == [str(mnt)]
        with open(mnt, "r+b", buffering=0) as f:
            f.write(b"daemonized")
        assert img.read_bytes()[:10] == b"daemonized"
        client = QEMUMonitorProtocol(str(sock))
        client.connect()
        try:
            exports = client.cmd_raw("query-block-exports")["return"]
            assert [e["id"] for e in exports] == ["e0"]
        finally:
            client.close()
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), "the daemonized child to exit")
        assert fuse_mounts_under(tmp_path) == []
        assert not pidfile.exists()
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        umount_all_under(tmp_path)


def test_client_mode_chardev_serves_qmp(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    """QEMU's iotests listen on a socket and let the daemon connect to them."""
    img, mnt = make_image(tmp_path), mountpoint(tmp_path)
    sock = tmp_path / "harness.sock"
    harness = QEMUMonitorProtocol(str(sock), server=True)
    try:
        daemon = qsd(
            *file_export_args(img, mnt),
            "--chardev",
            f"socket,id=harness,path={sock}",
            "--monitor",
            "chardev=harness",
            qmp=False,
            wait=False,
        )
        harness.accept(timeout=15)
        exports = harness.cmd_raw("query-block-exports")["return"]
        assert exports == [{"type": "fuse", "id": "e0", "node-name": "f0", "shutting-down": False}]
        assert harness.cmd_raw("quit") == {"return": {}}
    finally:
        with contextlib.suppress(EOFError, OSError):
            harness.close()
    assert daemon.wait(20) == 0
    assert fuse_mounts_under(tmp_path) == []


def test_dead_mount_of_a_crashed_daemon_is_cleaned(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    img, mnt = make_image(tmp_path), mountpoint(tmp_path)
    img.write_bytes(b"before the crash" + bytes(64 * MiB - 16))
    first = qsd(*file_export_args(img, mnt))
    first.stop(signal.SIGKILL)
    assert fuse_mounts_under(tmp_path) == [str(mnt)]  # left behind, dead
    with pytest.raises(OSError) as info:
        os.stat(mnt)
    assert info.value.errno == errno.ENOTCONN
    second = qsd(*file_export_args(img, mnt))
    assert fuse_mounts_under(tmp_path) == [str(mnt)]  # the new mount only
    with open(mnt, "rb") as f:
        assert f.read(16) == b"before the crash"
    assert second.stop() == 0
    assert f"'{mnt}' holds a dead FUSE mount" in second.stderr()
    assert fuse_mounts_under(tmp_path) == []


# --- data and the block graph ---------------------------------------------------------------
def test_data_written_through_the_export_is_in_the_image(
    qsd: Callable[..., Qsd], tmp_path: Path
) -> None:
    img, mnt = make_image(tmp_path), mountpoint(tmp_path)
    daemon = qsd(*file_export_args(img, mnt))
    data = os.urandom(MiB)
    fd = os.open(mnt, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, 3 * MiB + 512) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    client = daemon.qmp()
    try:
        client.cmd_raw("quit")
    finally:
        with contextlib.suppress(EOFError, OSError):
            client.close()
    assert daemon.wait(20) == 0
    with open(img, "rb") as f:
        f.seek(3 * MiB + 512)
        assert f.read(MiB) == data
    assert img.stat().st_size == 64 * MiB


def test_blockdev_del_of_an_exported_node_is_refused(
    qsd: Callable[..., Qsd], tmp_path: Path
) -> None:
    img, mnt = make_image(tmp_path), mountpoint(tmp_path)
    daemon = qsd(*file_export_args(img, mnt, node="qc0"))
    client = daemon.qmp()
    try:
        reply = client.cmd_raw("blockdev-del", {"node-name": "qc0"})
        assert reply["error"] == {"class": "GenericError", "desc": "Node qc0 is in use"}
        assert client.cmd_raw("block-export-del", {"id": "e0"}) == {"return": {}}
        assert fuse_mounts_under(tmp_path) == []
        assert client.cmd_raw("blockdev-del", {"node-name": "qc0"}) == {"return": {}}
    finally:
        client.close()
    assert daemon.stop() == 0


# --- the CLI's error lines (texts checked against QEMU 11.1's daemon) ----------------------
CLI_ERRORS: list[tuple[list[str], str]] = [
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--blockdev", "file,node-name=f,filename={d}/nonexist"],
     "--blockdev file,node-name=f,filename={d}/nonexist: "
     "Could not open '{d}/nonexist': No such file or directory"),
    (["--blockdev", "file,node-name=f,filename={d}/img,aio=native"],
     "--blockdev file,node-name=f,filename={d}/img,aio=native: "
     "aio=native was specified, but it requires cache.direct=on, which was not specified."),
    (["--blockdev", "file,node-name=f,filename={d}/img",
      "--blockdev", "file,node-name=f,filename={d}/img"],
     "--blockdev file,node-name=f,filename={d}/img: Duplicate nodes with node-name='f'"),
    (["--blockdev", "raw,node-name=r,file.driver=file,file.filename={d}/img,size=1000"],
     "--blockdev raw,node-name=r,file.driver=file,file.filename={d}/img,size=1000: "
     "Specified size is not multiple of 512"),
    (["--blockdev", "file,node-name=f,filename={d}/img",
      "--export", "type=fuse,id=e,node-name=nope,mountpoint={d}/mnt"],
     "--export type=fuse,id=e,node-name=nope,mountpoint={d}/mnt: "
     "Cannot find device='' nor node-name='nope'"),
    (["--blockdev", "file,node-name=f,filename={d}/img",
      "--export", "type=fuse,id=e,node-name=f,mountpoint={d}"],
     "--export type=fuse,id=e,node-name=f,mountpoint={d}: '{d}' is not a regular file"),
    (["--blockdev", "file,node-name=f,filename={d}/img", "--export", "type=fuse,id=e,node-name=f"],
     "--export type=fuse,id=e,node-name=f: Parameter 'mountpoint' is missing"),
    (["--blockdev", "file,node-name=f,filename={d}/img",
      "--export", "type=fuse,id=e,node-name=f,mountpoint={d}/mnt,writable=maybe"],
     "--export type=fuse,id=e,node-name=f,mountpoint={d}/mnt,writable=maybe: "
     "Parameter 'writable' expects 'on' or 'off'"),
    (["--blockdev", "file,node-name=f,filename={d}/img",
      "--export", "fuse,id=e,node-name=f,mountpoint={d}/mnt,allow-other=maybe"],
     "--export fuse,id=e,node-name=f,mountpoint={d}/mnt,allow-other=maybe: "
     "Parameter 'allow-other' does not accept value 'maybe'"),
    (["--blockdev", "file,node-name=f,filename={d}/img,read-only=on",
      "--export", "fuse,id=e,node-name=f,mountpoint={d}/missing,writable=on"],
     "--export fuse,id=e,node-name=f,mountpoint={d}/missing,writable=on: "
     "Cannot export read-only node as writable"),
    (["--blockdev", "file,node-name=f,filename={d}/img,read-only=on",
      "--blockdev", "raw,node-name=r,file=f",
      "--export", "fuse,id=e,node-name=r,mountpoint={d}/mnt,writable=on"],
     "--export fuse,id=e,node-name=r,mountpoint={d}/mnt,writable=on: Block node is read-only"),
    (["--blockdev", "file,node-name=f,filename={d}/img",
      "--export", "fuse,id=e,node-name=f,mountpoint={d}/mnt,iothread=nope"],
     "--export fuse,id=e,node-name=f,mountpoint={d}/mnt,iothread=nope: "
     'iothread "nope" not found'),
    (["--export", "fuse,id=e"], "--export fuse,id=e: Parameter 'node-name' is missing"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), CLI_ERRORS)
def test_cli_error_lines(
    qsd: Callable[..., Qsd], tmp_path: Path, args: list[str], message: str
) -> None:
    make_image(tmp_path)
    mountpoint(tmp_path)
    fill = {"d": str(tmp_path)}
    daemon = qsd(*(a.format(**fill) for a in args), qmp=False, wait=False)
    assert daemon.wait() == 1
    assert daemon.stderr() == f"qsd-py: {message.format(**fill)}\n"
    assert fuse_mounts_under(tmp_path) == []
