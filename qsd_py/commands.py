"""The table of QMP command handlers.

Each layer registers its handlers here with :func:`qmp_command`; the QAPI schema (``qapi/``)
says which arguments each command takes, and :meth:`Daemon.execute` validates them against
the schema before a handler runs. A handler therefore receives a dict that already has the
right shape and types, and only applies defaults and semantics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon

Handler = Callable[["Daemon", dict[str, Any]], Awaitable[Any]]

HANDLERS: dict[str, Handler] = {}


def qmp_command(name: str) -> Callable[[Handler], Handler]:
    """Register ``func`` as the handler of the QMP command ``name``."""

    def register(func: Handler) -> Handler:
        if name in HANDLERS:
            raise RuntimeError(f"QMP command {name} registered twice")
        HANDLERS[name] = func
        return func

    return register


def load_handlers() -> None:
    """Import every module that registers handlers (kept lazy for start-up time)."""
    import qsd_py.block.bitmap_commands  # noqa: F401
    import qsd_py.block.commands  # noqa: F401
    import qsd_py.block.snapshot_commands  # noqa: F401
    import qsd_py.export.commands  # noqa: F401
    import qsd_py.export.nbd.commands  # noqa: F401
    import qsd_py.graph_commands  # noqa: F401
    import qsd_py.jobs.commands  # noqa: F401
    import qsd_py.objects.commands  # noqa: F401
    import qsd_py.qmp.char_commands  # noqa: F401
    import qsd_py.qmp.commands  # noqa: F401
    import qsd_py.qmp.qom  # noqa: F401
    import qsd_py.transaction  # noqa: F401
