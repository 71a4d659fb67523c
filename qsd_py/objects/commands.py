"""QMP commands for objects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.commands import qmp_command

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon


@qmp_command("object-add")
async def object_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.objects.add(args)
    return {}


@qmp_command("object-del")
async def object_del(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.objects.delete(args["id"])
    return {}
