"""Block drivers, one module (or package) each, named for the QAPI ``BlockdevDriver`` value
they implement (``null-co`` lives in ``null_co``). A module exposes its node class as
``NODE``; :func:`driver_class` imports it on first use, so a new driver is a new module and
a new enum value in qapi/block-core.json, and no list elsewhere names it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode


def driver_class(name: str) -> type[BlockNode]:
    """The node class of driver ``name`` (a ``BlockdevDriver`` value)."""
    module_name = name.replace("-", "_")
    if not module_name.isidentifier():
        raise QMPError(f"Unknown driver '{name}'")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{module_name}":
            raise
        raise QMPError(f"Unknown driver '{name}'") from err
    return module.NODE
