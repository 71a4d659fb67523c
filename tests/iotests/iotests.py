"""Harness for qsd-py's iotests: scenario scripts whose filtered output is compared with a
hand-written reference file (``NNN.out``), in the style of QEMU's own iotests.

A scenario imports this module, starts daemons with :class:`Daemon`, drives them with QMP and
ordinary tools, and prints everything through :func:`log` so that run-dependent text (the
test directory, timestamps, pids, timings, versions) is filtered out. The runner
(``check.py``) says where to work and which daemon to run through environment variables, so
the same scenario runs against qsd-py over /dev/fuse, over io_uring, or against QEMU's own
daemon (which is how the reference outputs were checked).

Environment (set by the runner; defaults suit a scenario run by hand):

- ``QSD_IOTESTS_TEST_DIR``: an empty scratch directory for this run;
- ``QSD_IOTESTS_QSD_PROG``: the daemon command, shell-split (default: ``python -m qsd_py``);
- ``QSD_IOTESTS_TRANSPORT``: ``fuse`` (default) or ``io_uring``. With ``io_uring`` every FUSE
  export the scenario creates gets ``io_uring=on`` added on the way out, invisibly to the
  logged output, so both transports share one reference file.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Filter = Callable[[str], str]

TEST_DIR = os.path.realpath(
    os.environ.get("QSD_IOTESTS_TEST_DIR") or tempfile.mkdtemp(prefix="qsd-iotest-")
)
QSD_PROG = shlex.split(os.environ.get("QSD_IOTESTS_QSD_PROG", "")) or [
    sys.executable,
    "-m",
    "qsd_py",
]
TRANSPORT = os.environ.get("QSD_IOTESTS_TRANSPORT", "fuse")
QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
URING_KNOB = "/sys/module/fuse/parameters/enable_uring"

# --- filters ------------------------------------------------------------------------------

_PROG_RE = re.compile(r"^(?:qsd-py|qemu-storage-daemon|\S*/python3?[\d.]*(?: -m qsd_py)?): ", re.M)
# qemu-io's time is "00.01 sec" below a second and "0:00:01.09" (no "sec") from one up.
_QEMU_IO_TIMING_RE = re.compile(
    r"[\d.]+ (?:[KMGT]?i?B|bytes), \d+ ops; [\d:.]+(?: sec)? \([^)]*\)", re.M
)
_IMG_PROG_RE = re.compile(r"^(qemu-img|qemu-io): ", re.M)


def filter_test_dir(text: str) -> str:
    """The scratch directory changes every run; the reference says TEST_DIR."""
    return text.replace(TEST_DIR, "TEST_DIR")


def filter_prog(text: str) -> str:
    """Error lines start with the daemon's name: QSD_PROG, whichever daemon ran."""
    return _PROG_RE.sub("QSD_PROG: ", text)


def filter_qemu_io(text: str) -> str:
    """qemu-io's throughput lines hold timings."""
    return _QEMU_IO_TIMING_RE.sub("X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", text)


def filter_img_map(text: str) -> str:
    """qemu-img map --output=json: newer qemu-img adds "compressed", older lacks it; the
    reference follows the older tool (Debian 12's)."""
    return text.replace(', "compressed": false', "")


def filter_pid(text: str) -> str:
    return re.sub(r"\bpid \d+", "pid PID", text)


_NODE_NAME_RE = re.compile(r"#block\d+")
_NODE_NAMES: dict[str, str] = {}


def filter_node_names(text: str) -> str:
    """Implicit node names are ``#block`` + a counter + two random digits, never the same twice.
    Each distinct one becomes ``#block-1``, ``#block-2``, ... in the order it first shows up in
    the scenario's output, so a child reference still says which listed node it is."""

    def rename(m: re.Match[str]) -> str:
        return _NODE_NAMES.setdefault(m.group(0), f"#block-{len(_NODE_NAMES) + 1}")

    return _NODE_NAME_RE.sub(rename, text)


DEFAULT_FILTERS: tuple[Filter, ...] = (
    filter_test_dir,
    filter_prog,
    filter_qemu_io,
    filter_img_map,
    filter_pid,
    filter_node_names,
)


def apply_filters(text: str, filters: Iterable[Filter] = DEFAULT_FILTERS) -> str:
    for f in filters:
        text = f(text)
    return text


def filter_qmp(obj: Any) -> Any:
    """Make a QMP message run-independent: timestamps, QEMU version, paths."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "timestamp" and isinstance(value, dict):
                value = {"microseconds": "USECS", "seconds": "SECS"}
            elif key == "QMP" and isinstance(value, dict) and "version" in value:
                value = {**value, "version": "VERSION"}
            else:
                value = filter_qmp(value)
            out[key] = value
        return out
    if isinstance(obj, list):
        return [filter_qmp(v) for v in obj]
    if isinstance(obj, str):
        return filter_test_dir(obj)
    return obj


def filter_qmp_values(obj: Any, replace: dict[str, str]) -> Any:
    """Replace the values of the keys in ``replace`` wherever they occur (at any depth): for
    numbers that depend on the host file system, such as ``actual-size``."""
    if isinstance(obj, dict):
        return {
            k: replace[k] if k in replace else filter_qmp_values(v, replace) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [filter_qmp_values(v, replace) for v in obj]
    return obj


def log(
    msg: Any = "", filters: Iterable[Filter] = DEFAULT_FILTERS, indent: int | None = None
) -> None:
    """Print one line (dicts and lists as sorted JSON, as QEMU's iotests do), filtered.
    ``indent`` spreads a long JSON answer over lines, so that a diff points at the key."""
    if isinstance(msg, (dict, list)):
        msg = json.dumps(filter_qmp(msg), sort_keys=True, indent=indent)
    print(apply_filters(str(msg), filters), flush=True)


# --- tools ---------------------------------------------------------------------------------


def run(argv: Sequence[str], *, quiet: bool = False, user: str | None = None) -> str:
    """Run a tool, print its filtered output (unless ``quiet``) and return it.

    A non-zero exit status is printed too, since it is part of what a scenario checks.
    ``user`` runs the tool as that user (util-linux ``setpriv``), for permission checks.
    """
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    proc = subprocess.run(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120
    )
    out = apply_filters(proc.stdout)
    if not quiet:
        print(out, end="", flush=True)
        if proc.returncode != 0:
            log(f"[exit status {proc.returncode}]")
    return out


def qemu_img(*args: str, quiet: bool = False) -> str:
    return run([QEMU_IMG, *args], quiet=quiet)


def qemu_io(*args: str, quiet: bool = False, user: str | None = None) -> str:
    return run([QEMU_IO, *args], quiet=quiet, user=user)


def path(name: str) -> str:
    """A path in the scratch directory."""
    return os.path.join(TEST_DIR, name)


def create_file(name: str, size: int = 0) -> str:
    """An (empty or sparse) regular file in TEST_DIR: a mountpoint or a raw image."""
    p = path(name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def os_call(label: str, func: Callable[[], Any]) -> Any:
    """Log ``label: result`` or ``label: ErrnoName`` for one system call."""
    try:
        result = func()
    except OSError as err:
        log(f"{label}: {errno_name(err)}")
        return None
    log(f"{label}: {result}" if result is not None else f"{label}: ok")
    return result


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (punch-hole, zero-range, keep-size), which
    os.posix_fallocate cannot pass."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fresh_size(file: str) -> int:
    """The size of ``file`` asked of its file system now: statx(AT_STATX_FORCE_SYNC) makes
    FUSE fetch the attributes again instead of answering from its attribute cache (QEMU's
    export lets the kernel keep them for a second, so a plain stat right after a
    block_resize may still show the old size). The kernel keeps what it fetched, so a tool
    that opens the file next sees the same size."""
    import ctypes

    at_fdcwd, at_statx_force_sync, statx_size = -100, 0x2000, 0x200
    buf = ctypes.create_string_buffer(256)  # struct statx; stx_size is the u64 at byte 40
    libc = ctypes.CDLL(None, use_errno=True)
    libc.statx.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    if libc.statx(at_fdcwd, os.fsencode(file), at_statx_force_sync, statx_size, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), file)
    return int.from_bytes(buf.raw[40:48], sys.byteorder)


def errno_name(err: OSError) -> str:
    import errno

    return errno.errorcode.get(err.errno or 0, str(err.errno))


def fuse_mounts() -> list[str]:
    """FUSE mount points under TEST_DIR, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            mnt = fields[4].encode().decode("unicode_escape")
            if fstype.startswith("fuse") and (mnt == TEST_DIR or mnt.startswith(TEST_DIR + "/")):
                found.append(mnt)
    return found


def mount_options(mountpoint: str) -> list[str]:
    """The mount options of the FUSE mount at ``mountpoint`` (empty if not mounted)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == mountpoint:
                sep = fields.index("-")
                return fields[5].split(",") + fields[sep + 3].split(",")
    return []


def unmount_all() -> None:
    """Lazily unmount every FUSE mount left under TEST_DIR (clean-up, even after failure)."""
    for mnt in reversed(fuse_mounts()):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)


# --- transport -------------------------------------------------------------------------------


def _add_uring_cli(arg: str) -> str:
    """``--export fuse,...`` with ``io_uring=on`` appended when the run asks for io_uring."""
    parts = arg.split(",")
    is_fuse = parts[0] == "fuse" or "type=fuse" in parts
    if (
        TRANSPORT != "io_uring"
        or not is_fuse
        or any(p.split("=")[0] in ("io_uring", "io-uring") for p in parts)
    ):
        return arg
    return arg + ",io_uring=on"


def _add_uring_qmp(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    if TRANSPORT == "io_uring" and cmd == "block-export-add" and args.get("type") == "fuse":
        if "io_uring" not in args and "io-uring" not in args:
            return {**args, "io_uring": True}
    return args


# --- the daemon ------------------------------------------------------------------------------

_DAEMONS: list[Daemon] = []


class Daemon:
    """One storage daemon, started as QEMU's iotests start it.

    ``qmp="client"`` (the default) is QEMU's harness contract: the test listens on a socket and
    the daemon connects to it (``--chardev socket,...`` without ``server=on``).
    ``qmp="server"`` makes the daemon listen (``server=on,wait=off``), for raw-socket
    scenarios. ``qmp=None`` starts it without a monitor. Start-up waits for the pidfile.
    """

    def __init__(
        self,
        *args: str,
        qmp: str | None = "client",
        name: str = "qsd",
        uring: bool = True,
    ) -> None:
        self.pidfile = path(f"{name}.pid")
        self.qmp_path = path(f"{name}-qmp.sock")
        self.mountpoints: list[str] = []
        self.monitor: Any = None
        self.uring = uring
        args = self._rewrite(args)
        argv = [*QSD_PROG, *args, "--pidfile", self.pidfile]
        if qmp == "client":
            from qemu.qmp.legacy import QEMUMonitorProtocol

            self.monitor = QEMUMonitorProtocol(self.qmp_path, server=True)
            argv += ["--chardev", f"socket,id=qmp-sock,path={self.qmp_path}"]
            argv += ["--monitor", "qmp-sock"]
        elif qmp == "server":
            argv += ["--chardev", f"socket,id=qmp-sock,path={self.qmp_path},server=on,wait=off"]
            argv += ["--monitor", "qmp-sock"]
        self.stderr_path = path(f"{name}.stderr")
        self._stderr = open(self.stderr_path, "w+")  # noqa: SIM115 - closed in stop()
        _DAEMONS.append(self)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr
        )
        if qmp == "client":
            try:
                self._accept()
            except Exception as err:
                self.close()
                raise RuntimeError(f"daemon never connected to QMP: {self.output()}") from err
        self.wait_pidfile()
        self.pid = self.proc.pid

    def _accept(self, timeout: float = 20.0) -> None:
        """Wait for the daemon to connect to our QMP socket; a daemon that exits first
        would leave accept() waiting for the timeout, so a watcher pokes the socket."""
        import threading

        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.01):
                if self.proc.poll() is not None:
                    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.qmp_path)  # accept() then fails on the missing greeting
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            self.monitor.accept(timeout)
        finally:
            done.set()
            watcher.join()

    def _rewrite(self, args: Sequence[str]) -> list[str]:
        """Note the mountpoints (to clean up) and add io_uring=on for an io_uring run."""
        out = list(args)
        for i, arg in enumerate(out):
            if i > 0 and out[i - 1] == "--export":
                if self.uring:
                    out[i] = _add_uring_cli(arg)
                m = re.search(r"(?:^|,)mountpoint=([^,]*)", arg)
                if m:
                    self.mountpoints.append(m.group(1))
        return out

    def wait_pidfile(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError("daemon did not write its pidfile")
            time.sleep(0.002)

    def output(self) -> str:
        """What the daemon printed so far (stdout and stderr)."""
        with open(self.stderr_path) as f:
            return f.read()

    # QMP ------------------------------------------------------------------------------------
    def qmp(self, cmd: str, arguments: dict[str, Any] | None = None, **args: Any) -> dict[str, Any]:
        """Send one command, return the raw reply (``return`` or ``error``).

        Arguments come as a dict (names with dashes) and/or as keywords.
        """
        args = {**(arguments or {}), **args}
        args = _add_uring_qmp(cmd, args) if self.uring else args
        if cmd == "block-export-add" and "mountpoint" in args:
            self.mountpoints.append(args["mountpoint"])
        return self.monitor.cmd_obj({"execute": cmd, "arguments": args})

    def qmp_log(
        self, cmd: str, arguments: dict[str, Any] | None = None, **args: Any
    ) -> dict[str, Any]:
        """Log the command as given (without transport options) and its reply."""
        args = {**(arguments or {}), **args}
        log({"execute": cmd, "arguments": args} if args else {"execute": cmd})
        reply = self.qmp(cmd, args)
        log(reply)
        return reply

    def log_events(self, wait: float = 0.0, sync: bool = False) -> None:
        """Log (and forget) the events received so far, after waiting up to ``wait`` for one
        (none may come). ``sync`` first makes a QMP round trip (query-version, not logged):
        an event the daemon sent before it answered is then here, so that "no event" means
        none was sent."""
        events = []
        if sync:
            self.monitor.cmd_obj({"execute": "query-version"})
        if wait:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                events.append(self.monitor.pull_event(wait=float(wait)))
        events += self.monitor.get_events()
        self.monitor.clear_events()
        for ev in events:
            log(ev)

    # stopping ---------------------------------------------------------------------------------
    def check_transport(self) -> None:
        """Say so (and so fail the comparison) if an export is not served by the transport
        this run asked for. qsd-py only: QEMU has no x-query-fuse-queues and is skipped."""
        if self.monitor is None or self.proc.poll() is not None:
            return
        reply = self.monitor.cmd_obj({"execute": "x-query-fuse-queues"})
        want = "io_uring" if TRANSPORT == "io_uring" and self.uring else None
        for exp in reply.get("return", []):
            if want and exp["transport"] != want:
                log(f"[{TRANSPORT} run, but export {exp['id']} is served by {exp['transport']}]")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon, wait for it, unmount (``umount -l``) what it left behind."""
        self.check_transport()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.close()
        return rc

    def left_mounted(self) -> list[str]:
        """Which of this daemon's mountpoints are still FUSE mounts."""
        mounts = fuse_mounts()
        return [m for m in self.mountpoints if os.path.realpath(m) in mounts]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.monitor is not None:
            try:
                self.monitor.close()
            except Exception:  # noqa: BLE001 - the daemon may be long gone
                pass
            self.monitor = None
        for mnt in self.mountpoints:
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        if not self._stderr.closed:
            self._stderr.close()
        if self in _DAEMONS:
            _DAEMONS.remove(self)


def run_daemon(*args: str, timeout: float = 10.0) -> int | None:
    """Run the daemon to completion (for start-up errors): log its output and exit status.

    A daemon that starts fine would serve forever: after ``timeout`` it is killed and
    logged as still running.
    """
    try:
        proc = subprocess.run(
            [*QSD_PROG, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        log("[still running: killed]")
        unmount_all()
        return None
    if proc.stdout:
        log(proc.stdout.rstrip("\n"))
    log(f"[exit status {proc.returncode}]")
    return proc.returncode


def qmp_raw_connect(sock_path: str) -> socket.socket:
    """A plain socket to a daemon's QMP server, for scenarios about the wire format."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    s.connect(sock_path)
    return s


@atexit.register
def _cleanup() -> None:
    for daemon in list(_DAEMONS):
        daemon.close()
    unmount_all()
