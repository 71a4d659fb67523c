"""The protocol's own QMP commands: version, command list, schema, quit.

``qmp_capabilities`` is answered by the session while negotiating; once negotiation is over
it is an ordinary command again, whose handler only says so (after the daemon has checked
its arguments, the order in which QEMU reports the two problems).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py import QEMU_VERSION, __version__
from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon


@qmp_command("qmp_capabilities")
async def qmp_capabilities(daemon: Daemon, args: dict[str, Any]) -> Any:
    from qsd_py.qmp.protocol import ALREADY_NEGOTIATED  # a monitor exists: already loaded

    raise QMPError(ALREADY_NEGOTIATED, "CommandNotFound")


@qmp_command("query-version")
async def query_version(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    major, minor, micro = QEMU_VERSION
    return {
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": f"qsd-py {__version__}",
    }


@qmp_command("query-commands")
async def query_commands(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in daemon.schema.command_names()]


@qmp_command("query-qmp-schema")
async def query_qmp_schema(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.schema.introspect()


@qmp_command("quit")
async def quit_(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Delete every export (each sends BLOCK_EXPORT_DELETED), drain, cancel every job and
    wait for it, then reply: QEMU's reply comes after these events.

    The session writes the reply before the main loop gets to run the shutdown, and closing
    a session flushes its output, so the client sees ``{"return": {}}`` before EOF.
    """
    await daemon.shut_down_exports_and_jobs()
    daemon.request_shutdown()
    return {}
