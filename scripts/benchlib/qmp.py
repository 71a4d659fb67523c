"""One QMP command over a daemon's monitor socket, synchronously, between two fio runs.

The bench asks qsd-py's FUSE queues for their counters (``x-query-fuse-queues``) before and
after a run, to show which path served the requests. A connection per command: it happens
twice per run, outside the measured window, and leaves no state behind in the daemon.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import Any


class QmpError(RuntimeError):
    """The daemon answered with an error, or not as QMP does."""


def qmp_command(path: str, command: str, args: dict | None = None, timeout: float = 10) -> Any:
    """Connect to the QMP socket at ``path``, negotiate, run ``command``, return its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        stream = sock.makefile("rwb")
        greeting = _next_reply(stream)
        if "QMP" not in greeting:
            raise QmpError(f"no QMP greeting from {path}: {greeting}")
        _execute(stream, "qmp_capabilities", None)
        return _execute(stream, command, args)


def _execute(stream: Any, command: str, args: dict | None) -> Any:
    msg: dict[str, Any] = {"execute": command}
    if args:
        msg["arguments"] = args
    stream.write(json.dumps(msg).encode() + b"\n")
    stream.flush()
    reply = _next_reply(stream)
    if "error" in reply:
        raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
    if "return" not in reply:
        raise QmpError(f"{command}: unexpected reply {reply}")
    return reply["return"]


def _next_reply(stream: Any) -> dict:
    """The next message that is not an event (events may come at any time)."""
    while True:
        line = stream.readline()
        if not line:
            raise QmpError("the daemon closed the QMP connection")
        msg = json.loads(line)
        if "event" not in msg:
            return msg


class QmpSession:
    """A QMP connection kept open over block jobs: commands, and the events that come
    meanwhile, each stamped with ``time.perf_counter()`` on arrival by a reader thread (a
    job's end is timed by its event)."""

    def __init__(self, path: str, timeout: float = 60) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.stream = self.sock.makefile("rwb")
        self.events: queue.Queue[tuple[float, dict]] = queue.Queue()
        self.replies: queue.Queue[dict] = queue.Queue()
        self.kept: list[tuple[float, dict]] = []  # events read while waiting for others
        self._reader = threading.Thread(target=self._read_all, daemon=True)
        self._reader.start()
        greeting = self.replies.get(timeout=timeout)
        if "QMP" not in greeting:
            raise QmpError(f"no QMP greeting from {path}: {greeting}")
        self.execute("qmp_capabilities")

    def _read_all(self) -> None:
        for line in self.stream:
            msg = json.loads(line)
            if "event" in msg:
                self.events.put((time.perf_counter(), msg))
            else:
                self.replies.put(msg)
        self.replies.put({"error": {"desc": "the daemon closed the QMP connection"}})

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self.stream.close()
        self.sock.close()

    def execute(self, command: str, args: dict | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        self.stream.write(json.dumps(msg).encode() + b"\n")
        self.stream.flush()
        try:
            reply = self.replies.get(timeout=self.timeout)
        except queue.Empty:
            raise QmpError(f"{command}: no reply within {self.timeout:g} s") from None
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def wait_event(self, names: tuple[str, ...], timeout: float) -> tuple[float, dict]:
        """The first event named in ``names`` (earlier ones of other names are kept in
        ``kept``) and its arrival time; QmpError after ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            try:
                when, msg = self.events.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise QmpError(f"no {'/'.join(names)} within {timeout:g} s") from None
            if msg["event"] in names:
                return when, msg
            self.kept.append((when, msg))

    def drop_events(self) -> None:
        """Forget the events so far (before the next job starts)."""
        self.kept.clear()
        while not self.events.empty():
            self.events.get_nowait()
