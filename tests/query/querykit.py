"""An in-process daemon for the query/transaction tests: commands run as QMP runs them
(validated against the schema), events collected."""

from __future__ import annotations

from typing import Any

from qsd_py.daemon import Daemon
from qsd_py.errors import QMPError


class Events:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def send_event(self, event: dict[str, Any]) -> None:
        self.seen.append({"event": event["event"], "data": event.get("data")})

    def take(self) -> list[dict[str, Any]]:
        out, self.seen = self.seen, []
        return out


def new_daemon() -> tuple[Daemon, Events]:
    daemon = Daemon()
    events = Events()
    daemon.monitors.add(events)
    return daemon, events


async def reply(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    """The command's return value, or ``("error", desc)``."""
    try:
        return await daemon.execute(name, args)
    except QMPError as e:
        return ("error", e.desc)
