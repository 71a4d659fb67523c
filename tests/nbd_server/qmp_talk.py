"""A raw QMP client that records a conversation: each command's reply and the events
that came with it (before the reply, and shortly after), with timestamps dropped, so the
same conversation held with qsd-py and with QEMU's daemon can be compared as data."""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Any


class Talk:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 10
        while True:  # the socket file appears at bind(), a moment before listen()
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.pending_events: list[dict[str, Any]] = []
        self._read_message()  # greeting
        self.command("qmp_capabilities")

    def _read_message(self, timeout: float = 10) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name: str, args: Any = None) -> dict[str, Any]:
        """``{"reply": ..., "events": [names...]}``: the events sent before the reply
        and within ``settle`` seconds after it."""
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        events: list[str] = []
        while True:
            message = self._read_message()
            assert message is not None, f"no reply to {name}"
            if "event" in message:
                events.append(_event(message))
                continue
            return {"reply": message, "events": events}

    def events_after(self, settle: float = 0.3) -> list[str]:
        """Events that arrive within ``settle`` seconds (after a command's reply)."""
        found = []
        while (message := self._read_message(settle)) is not None:
            found.append(_event(message))
        return found

    def close(self) -> None:
        self.sock.close()


def _event(message: dict[str, Any]) -> str:
    data = message.get("data")
    return f"{message['event']} {json.dumps(data, sort_keys=True)}" if data else message["event"]
