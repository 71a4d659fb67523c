"""One QMP command over a daemon's monitor socket, synchronously, between two fio runs.

The bench asks qsd-py's FUSE queues for their counters (``x-query-fuse-queues``) before and
after a run, to show which path served the requests. A connection per command: it happens
twice per run, outside the measured window, and leaves no state behind in the daemon.
"""

from __future__ import annotations

import json
import socket
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
