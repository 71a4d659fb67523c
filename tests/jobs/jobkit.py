"""An in-process daemon and a block job kind made for driving the state machine.

``StepJob`` works in steps (a pause point before each, a rate limit after each) and, when
asked, becomes ``ready`` afterwards and waits there for job-complete or a cancel, as mirror
does. Until mirror and friends exist it is the only block job there is; the commands reach
it through ``Daemon.execute``, the same path (schema checks, handlers) QMP takes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qsd_py.daemon import Daemon
from qsd_py.errors import QMPError
from qsd_py.jobs.blockjob import BlockJob


class Events:
    """A monitor that only keeps events (what Daemon.emit_event sends to every monitor)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []

    def send_event(self, event: dict[str, Any]) -> None:
        self.got.append(event)

    def take(self) -> list[tuple[str, Any]]:
        """(event, status or data) since the last take, timestamps dropped."""
        out = []
        for ev in self.got:
            data = ev.get("data", {})
            out.append((ev["event"], data["status"] if "status" in data else data))
        self.got.clear()
        return out


class StepJob(BlockJob):
    """``steps`` steps of ``step`` bytes; ``ready``: wait in ready until completed."""

    job_type = "mirror"

    def __init__(
        self,
        *args: Any,
        steps: int = 4,
        step: int = 65536,
        ready: bool = False,
        fail: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.steps, self.step, self.wants_ready, self.fail = steps, step, ready, fail
        self.gate = asyncio.Event()  # each step waits for it: the test decides the pace
        self.gate.set()
        self.should_complete = False
        self.changes: list[dict[str, Any]] = []

    async def run(self) -> None:
        self.set_remaining(self.steps * self.step)
        for _ in range(self.steps):
            await self.checkpoint()
            await self.gate.wait()
            await asyncio.sleep(0)  # the step's I/O: other tasks run meanwhile
            self.progress_update(self.step)
            await self.ratelimit(self.step)
        if self.fail:
            raise QMPError(self.fail)
        if not self.wants_ready:
            return
        self.transition_to_ready()
        while not self.should_complete and not self.cancelled:
            await self.sleep(3600)
        if self.is_cancelled:
            await self.checkpoint()

    def cancel_hook(self, force: bool) -> bool:
        """A soft cancel of a ready job completes it (mirror's rule)."""
        return force or not self.is_ready

    def can_complete(self) -> bool:
        return True

    def do_complete(self) -> None:
        self.should_complete = True
        self.enter()

    def do_change(self, opts: dict[str, Any]) -> None:
        self.changes.append(opts)


async def new_daemon() -> tuple[Daemon, Events]:
    daemon = Daemon()
    events = Events()
    daemon.monitors.add(events)
    return daemon, events


async def until(cond, timeout: float = 5.0) -> None:
    """Let the loop run until ``cond()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.001)


async def reply(daemon: Daemon, name: str, args: dict[str, Any] | None = None) -> Any:
    """The command's return value, or ``("error", class, desc)``."""
    try:
        return await daemon.execute(name, args)
    except QMPError as e:
        return ("error", e.error_class, e.desc)
