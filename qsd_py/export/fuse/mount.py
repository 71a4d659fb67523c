"""Mounting and unmounting a FUSE file over the export's mountpoint.

As root the daemon calls ``mount(2)`` itself with QEMU 11.1's options (source ``/dev/fuse``,
type ``fuse``, ``nosuid,nodev,noatime`` flags and ``fd=,rootmode=,user_id=,group_id=,
default_permissions[,allow_other],max_read=`` data), which is both the fastest path and
what ``/proc/self/mountinfo`` shows for QEMU. Without privileges it runs ``fusermount3``,
which mounts and passes the /dev/fuse fd back over a socket (``_FUSE_COMMFD``).

Also here: the mountpoint checks with QEMU's texts, the clean-up of a dead FUSE mount
(ENOTCONN) that a crashed daemon left on the mountpoint, and the abort of a live mount's FUSE
connection (the io_uring transport's teardown).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import subprocess
from dataclasses import dataclass

from qsd_py.errors import QMPError

log = logging.getLogger("qsd_py.export.fuse")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOATIME = 1024
MNT_FORCE = 1
MNT_DETACH = 2
ROOTMODE_REGULAR = 0o100000
FUSERMOUNT = "fusermount3"
FUSECTL_DIR = "/sys/fs/fuse/connections"

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    """libc with errno, loaded on first use (keeps start-up lean for non-FUSE runs)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc = lib
    return _libc


def privileged() -> bool:
    return os.geteuid() == 0


@dataclass
class Mounted:
    """A live mount: the session fd and how it was made (for the matching unmount)."""

    path: str
    fd: int
    allow_other: bool
    privileged: bool


# --- mountpoint checks ----------------------------------------------------------------------
def check_mountpoint(path: str) -> None:
    """QEMU's checks: the mountpoint must exist and be a regular file. A dead FUSE mount
    (ENOTCONN: its daemon died) is lazily unmounted first, with a log line."""
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ENOTCONN and is_fuse_mount(path):
            log.warning("'%s' holds a dead FUSE mount (daemon gone); unmounting it", path)
            unmount(path, privileged())
            try:
                st = os.stat(path)
            except OSError as err2:
                raise QMPError(f"Failed to stat '{path}': {err2.strerror}") from err2
        else:
            raise QMPError(f"Failed to stat '{path}': {err.strerror}") from err
    if not stat.S_ISREG(st.st_mode):
        raise QMPError(f"'{path}' is not a regular file")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fuse_mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every FUSE mount in this mount namespace."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            if fstype == "fuse" or fstype.startswith("fuse."):
                found.append((_unescape(fields[4]), fstype, _unescape(fields[sep + 2])))
    return found


def is_fuse_mount(path: str) -> bool:
    path = os.path.abspath(path)
    return any(mnt == path for mnt, _t, _s in fuse_mounts())


# --- mounting ---------------------------------------------------------------------------------
def mount_options(read_only: bool, allow_other: bool, max_read: int) -> str:
    """The option string as QEMU builds it (fusermount3 adds fd/rootmode/ids itself)."""
    opts = ["ro" if read_only else "rw", "nosuid", "nodev", "noatime"]
    opts += [f"user_id={os.getuid()}", f"group_id={os.getgid()}", "default_permissions"]
    if allow_other:
        opts.append("allow_other")
    opts.append(f"max_read={max_read}")
    return ",".join(opts)


def mount(path: str, *, read_only: bool, allow_other: str, max_read: int) -> Mounted:
    """Open /dev/fuse and mount it on ``path``. ``allow_other`` is off/on/auto (auto: try
    with it, fall back without). Raises QMPError; leaves nothing behind on failure."""
    attempts = [True, False] if allow_other == "auto" else [allow_other == "on"]
    last: OSError | None = None
    for other in attempts:
        try:
            if privileged():
                return _mount_syscall(path, read_only, other, max_read)
            return _mount_fusermount(path, read_only, other, max_read)
        except OSError as err:
            last = err
    assert last is not None
    raise QMPError(f"Failed to mount FUSE session to export: {last.strerror or last}")


def _mount_syscall(path: str, read_only: bool, allow_other: bool, max_read: int) -> Mounted:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = (
        f"fd={fd},rootmode={ROOTMODE_REGULAR:o},user_id={os.getuid()},group_id={os.getgid()},"
        "default_permissions" + (",allow_other" if allow_other else "") + f",max_read={max_read}"
    )
    flags = MS_NOSUID | MS_NODEV | MS_NOATIME | (MS_RDONLY if read_only else 0)
    if _c().mount(b"/dev/fuse", os.fsencode(path), b"fuse", flags, data.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err))
    return Mounted(path, fd, allow_other, True)


def _fusermount() -> str | None:
    """The fusermount3 helper's path; shutil is imported only by unprivileged daemons."""
    import shutil

    return shutil.which(FUSERMOUNT)


def _mount_fusermount(path: str, read_only: bool, allow_other: bool, max_read: int) -> Mounted:
    tool = _fusermount()
    if tool is None:
        raise OSError(errno.ENOENT, f"{FUSERMOUNT} not found (needed without root)")
    opts = mount_options(read_only, allow_other, max_read)
    # fusermount3 sets user_id/group_id itself and refuses them from the caller
    opts = ",".join(o for o in opts.split(",") if not o.startswith(("user_id=", "group_id=")))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run(
            [tool, "-o", opts, "--", path],
            env=env,
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            check=False,
        )
        theirs.close()
        if proc.returncode != 0:
            raise OSError(errno.EPERM, proc.stderr.strip() or f"{FUSERMOUNT} failed")
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise OSError(errno.EIO, f"{FUSERMOUNT} passed no file descriptor")
        os.set_inheritable(fds[0], False)
        return Mounted(path, fds[0], allow_other, False)
    finally:
        ours.close()
        theirs.close()


def unmount(path: str, privileged_mount: bool) -> None:
    """Lazily detach the mount at ``path``; not mounted any more is not an error."""
    if privileged_mount:
        if _c().umount2(os.fsencode(path), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                log.warning("unmounting '%s' failed: %s", path, os.strerror(err))
        return
    tool = _fusermount() or FUSERMOUNT
    proc = subprocess.run([tool, "-u", "-z", "--", path], capture_output=True, check=False)
    if proc.returncode != 0 and is_fuse_mount(path):
        log.warning("unmounting '%s' failed: %s", path, proc.stderr.decode().strip())


# --- ending the connection ----------------------------------------------------------------------
def _mount_device(path: str) -> int | None:
    """The FUSE connection number (the mount's device minor) from /proc/self/mountinfo,
    read without stat(): a stat() on our own mount from the serving loop would deadlock."""
    found = None
    path = os.path.abspath(path)  # mountinfo has absolute paths; a mountpoint may be relative
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if _unescape(fields[4]) == path and fields[sep + 1].startswith("fuse"):
                    found = int(fields[2].split(":")[1])  # the last (topmost) one wins
    except (OSError, ValueError, IndexError):
        return None
    return found


def abort_connection(path: str, privileged: bool) -> bool:
    """Abort the FUSE connection mounted at ``path`` so parked ring entries complete
    (-ENOTCONN) and waiting callers get ECONNABORTED. Closing /dev/fuse would not do it:
    every parked URING_CMD holds a reference to the file. Returns True if it was aborted."""
    minor = _mount_device(path)
    if minor is not None:
        try:
            with open(f"{FUSECTL_DIR}/{minor}/abort", "w") as f:
                f.write("1")
            return True
        except OSError:
            pass  # fusectl not mounted, or not ours
    if minor is not None and privileged:
        # MNT_FORCE calls the file system's umount_begin, which for FUSE aborts the connection.
        if _c().umount2(os.fsencode(path), MNT_FORCE | MNT_DETACH) == 0:
            return True
        log.warning("forced unmount of '%s' failed: %s", path, os.strerror(ctypes.get_errno()))
    return False
