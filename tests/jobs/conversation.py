"""One QMP conversation run against a daemon: qsd-py, or QEMU's (``real-qsd``).

A conversation is a list of commands; after each one the events that arrived are collected
until the daemon is idle (for job commands: until the job has settled), so that both daemons'
transcripts can be compared entry by entry, timestamps left out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETTLED = {"concluded", "null", "ready", "pending", "paused", "standby"}


class Daemon:
    """A daemon (``real=True``: QEMU 11.1's in the chroot) with a QMP socket in ``workdir``."""

    def __init__(self, workdir: Path, real: bool, args: list[str] | None = None) -> None:
        """Both daemons run in ``workdir`` (QEMU's through a shell in the chroot), so that
        relative file names mean the same to both."""
        self.sock = workdir / ("real.sock" if real else "py.sock")
        self.sock.unlink(missing_ok=True)
        qmp = [
            "--chardev",
            f"socket,id=m0,path={self.sock},server=on,wait=off",
            "--monitor",
            "chardev=m0",
        ]
        if real:
            from realqsd_support import require_real_qsd

            prefix = [
                str(require_real_qsd()),
                "run",
                "sh",
                "-c",
                f'cd "{workdir}" && exec qemu-storage-daemon "$@"',
                "sh",
            ]
        else:
            prefix = [sys.executable, "-m", "qsd_py"]
        self.proc = subprocess.Popen(
            [*prefix, *qmp, *(args or [])],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.01)
        from qemu.qmp.legacy import QEMUMonitorProtocol
        from qemu.qmp.protocol import ConnectError

        while True:  # the socket file appears at bind(), a moment before listen()
            self.qmp = QEMUMonitorProtocol(str(self.sock))
            try:
                self.qmp.connect()
                break
            except ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The reply without its ``id``."""
        reply = self.qmp.cmd_raw(name, args)
        reply.pop("id", None)
        return reply

    def events(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """Events received so far (after ``wait`` seconds), without timestamps."""
        if wait:
            time.sleep(wait)
        out = self.qmp.get_events(wait=False)
        for ev in out:
            ev.pop("timestamp", None)
        return out

    def events_until_exit(self, timeout: float = 20.0) -> list[dict[str, Any]]:
        """After ``quit``: every event the daemon sends until it has exited (QEMU's come
        after the reply: the exports' deletion, the drain and the jobs' cancel)."""
        self.proc.wait(timeout)
        out: list[dict[str, Any]] = []
        while True:
            try:
                ev = self.qmp.pull_event(wait=0.3)
            except Exception:  # noqa: BLE001 - the wait timed out, or the socket ended
                break
            if ev is None:
                break
            ev.pop("timestamp", None)
            out.append(ev)
        return out

    def settle(self, job: str, timeout: float = 20.0, past: str = "") -> list[dict[str, Any]]:
        """Events until job ``job`` reaches a state where it waits for the user (or is gone),
        other than ``past`` (a job completed in ``ready`` stays there a moment). A daemon sends
        a state's event before any reply that shows the state, so the events are all in once
        query-jobs says so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.cmd("query-jobs")["return"]
            states = [j["status"] for j in jobs if j["id"] == job]
            if not states or (states[0] in SETTLED and states[0] != past):
                return self.events()
            time.sleep(0.002)
        raise TimeoutError(f"job {job} did not settle")

    def close(self) -> None:
        try:
            try:
                self.qmp.close()
            except EOFError:  # the daemon hung up first (it quit): its EOF is no error
                pass
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()


def run(daemon: Daemon, script: list[list[Any]]) -> list[Any]:
    """Run ``script`` (entries ``[command, args]``, ``["settle", job]``,
    ``["settle-past-ready", job]``, ``["settle-gone", job]`` or ``["quit-until-exit", {}]``);
    the transcript."""
    out: list[Any] = []
    for name, args in script:
        if name == "settle":
            out.append({"events": daemon.settle(args)})
            continue
        if name == "settle-past-ready":
            out.append({"events": daemon.settle(args, past="ready")})
            continue
        if name == "settle-gone":  # an auto-finalized job: until its end, not its pending
            out.append({"events": daemon.settle(args, past="pending")})
            continue
        if name == "quit-until-exit":  # quit, then all the events until the daemon exits
            out.append({"cmd": "quit", "reply": daemon.cmd("quit")})
            out.append({"events": daemon.events_until_exit()})
            continue
        out.append({"cmd": name, "reply": daemon.cmd(name, args)})
        events = daemon.events()
        if events:
            out.append({"events": events})
    return out


if __name__ == "__main__":  # probe: conversation.py real|py 'JSON script'
    import json

    os.makedirs("/tmp/qsd-cmp/jobs-probe", exist_ok=True)
    d = Daemon(Path("/tmp/qsd-cmp/jobs-probe"), sys.argv[1] == "real")
    try:
        for entry in run(d, json.loads(sys.argv[2])):
            print(json.dumps(entry))
    finally:
        d.close()


def run_once(workdir: Path, real: bool, script: list[list[Any]]) -> list[Any]:
    """:func:`run` on a daemon started for it in ``workdir`` and stopped after it."""
    daemon = Daemon(workdir, real)
    try:
        return run(daemon, script)
    finally:
        daemon.close()


def record(run_script: Any, data: Path, name: str) -> None:
    """Write what ``run_script(True, workdir)`` gives against QEMU 11.1 (real-qsd) to
    ``data``: how a ``*_script.py`` module refreshes its recorded transcript."""
    import json

    work = Path(f"/tmp/qsd-cmp/{name}-record")  # the real-qsd chroot sees /tmp/qsd-cmp
    os.makedirs(work, exist_ok=True)
    data.write_text(json.dumps(run_script(True, work), indent=1) + "\n")
    print(f"wrote {data}")
