"""The daemon's chardevs, by id: the ``--chardev`` sockets that carry monitors and the
chardevs that ``chardev-add`` made, in one table so that ids are unique across both.

``query-chardev`` lists them in the order they were made (a changed chardev moves to the
end, since chardev-change makes it anew).  QEMU lists them in the order of a GLib hash table
of the chardev container, which does not follow anything a user can see; a client that
compares answers should sort them by ``label``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from qsd_py.errors import QMPError
from qsd_py.qmp.char_backends import Backend, make_backend

log = logging.getLogger("qsd_py.qmp")


class ChardevRegistry:
    """Chardevs by id; each has ``id``, ``user``, ``frontend_open``, ``describe()``,
    ``send_break()`` and ``close()``."""

    def __init__(self, objects: Any) -> None:
        self.objects = objects  # tls-creds of socket chardevs
        self._by_id: dict[str, Any] = {}

    def find(self, chardev_id: str) -> Any | None:
        return self._by_id.get(chardev_id)

    def all(self) -> list[Any]:
        return list(self._by_id.values())

    def register(self, chardev: Any) -> None:
        """A ``--chardev`` socket (its id was checked by the command line)."""
        self._by_id[chardev.id] = chardev

    async def add(self, chardev_id: str, backend: dict[str, Any]) -> dict[str, Any]:
        """chardev-add: QEMU's duplicate check, then its ``Failed to add chardev`` errors."""
        if chardev_id in self._by_id:
            raise QMPError(f"Chardev with id '{chardev_id}' already exists")
        try:
            return await self.create(chardev_id, backend)
        except QMPError as err:
            raise QMPError(f"Failed to add chardev '{chardev_id}': {err.desc}") from err

    async def create(self, chardev_id: str, backend: dict[str, Any]) -> dict[str, Any]:
        """Open the backend and register it (``--chardev`` words its errors without
        chardev-add's prefix)."""
        chardev = make_backend(chardev_id, backend)
        try:
            reply = await chardev.open(self)
        except BaseException:
            await chardev.close()
            raise
        self._by_id[chardev_id] = chardev
        return reply

    async def change(self, chardev_id: str, backend: dict[str, Any]) -> dict[str, Any]:
        """chardev-change.  Only a chardev without a user can change in qsd (its users,
        monitors, muxes and hubs, cannot switch backends), and QEMU changes such a chardev
        by removing it and adding it anew: when the new backend fails, the chardev is gone.
        """
        chardev = self._by_id.get(chardev_id)
        if chardev is None:
            raise QMPError(f"Chardev '{chardev_id}' does not exist")
        if chardev.filename in ("mux", "hub"):
            raise QMPError("For mux or hub device hotswap is not supported yet")
        if chardev.user is not None:
            raise QMPError("Chardev user does not support chardev hotswap")
        await self._drop(chardev)
        return await self.add(chardev_id, backend)

    async def remove(self, chardev_id: str) -> None:
        chardev = self._by_id.get(chardev_id)
        if chardev is None:
            raise QMPError(f"Chardev '{chardev_id}' not found")
        if chardev.user is not None:
            raise QMPError(f"Chardev '{chardev_id}' is busy")
        await self._drop(chardev)

    async def _drop(self, chardev: Any) -> None:
        del self._by_id[chardev.id]
        await chardev.close()

    async def close_all(self) -> None:
        """At shutdown: the chardev-add ones (``--chardev`` ones are the daemon's closers)."""
        for chardev in reversed(self.all()):
            if isinstance(chardev, Backend):
                with contextlib.suppress(Exception):
                    await chardev.close()
        self._by_id.clear()
