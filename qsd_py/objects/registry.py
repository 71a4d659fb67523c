"""The registry of user-created objects (``--object``, ``object-add``, ``object-del``)."""

from __future__ import annotations

from typing import Any

from qsd_py.errors import QMPError
from qsd_py.objects.iothread import IOThread


class ObjectRegistry:
    """Objects by id. Only ``iothread`` exists in qsd-py so far."""

    def __init__(self) -> None:
        self._objects: dict[str, IOThread] = {}
        self._users: dict[str, int] = {}

    def add(self, opts: dict[str, Any]) -> IOThread:
        obj_id = opts["id"]
        if obj_id in self._objects:
            raise QMPError(
                f"attempt to add duplicate property '{obj_id}' to object (type 'container')"
            )
        obj = IOThread(obj_id, opts)
        self._objects[obj_id] = obj
        return obj

    def delete(self, obj_id: str) -> None:
        obj = self._objects.get(obj_id)
        if obj is None:
            raise QMPError(f"object '{obj_id}' not found")
        if self._users.get(obj_id):
            raise QMPError(f"object '{obj_id}' can't be deleted")
        del self._objects[obj_id]
        obj.stop()

    def iothread(self, obj_id: str) -> IOThread:
        """Look up an iothread by id, with QEMU's text when there is none."""
        obj = self._objects.get(obj_id)
        if obj is None:
            raise QMPError(f'iothread "{obj_id}" not found')
        return obj

    def hold(self, obj_id: str) -> IOThread:
        """Mark an iothread as used by an export (it cannot be deleted meanwhile)."""
        obj = self.iothread(obj_id)
        self._users[obj_id] = self._users.get(obj_id, 0) + 1
        return obj

    def release(self, obj_id: str) -> None:
        self._users[obj_id] -= 1

    def stop_all(self) -> None:
        for obj in self._objects.values():
            obj.stop()
        self._objects.clear()
