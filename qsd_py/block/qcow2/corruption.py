"""What a qcow2 node does when it finds its metadata wrong while open.

QEMU's reaction, kept here in one place: the report on stderr, ``BLOCK_IMAGE_CORRUPTED``, and
on a writable node the corrupt bit in the header, after which every request fails (the node
checks ``node.corrupt`` itself on each request: that test stays on its fast road).
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import TYPE_CHECKING, Any

from qsd_py.block.qcow2 import header as hdr
from qsd_py.block.qcow2.entries import corruption_report
from qsd_py.block.qcow2.mapping import MappingError

if TYPE_CHECKING:
    from qsd_py.block.qcow2.node import Qcow2Node

log = logging.getLogger(__name__)


class CorruptImage(OSError):
    """Metadata found wrong while serving a request: the image is marked corrupt."""


async def signal_corruption(
    node: Qcow2Node, msg: str, offset: int = -1, size: int = -1, fatal: bool = True
) -> None:
    """QEMU's reaction to metadata found wrong at run time: report, emit
    BLOCK_IMAGE_CORRUPTED and, when fatal on a writable node, set the corrupt bit and
    fail every request from now on. A read-only node only reports (fatal: false) and
    goes on. After the first report only a fatal one on a node not yet marked is told."""
    fatal = fatal and not node.read_only
    if node.corruption_signaled and (not fatal or node.corrupt):
        return
    node.corruption_signaled = True
    print(corruption_report(msg, fatal), file=sys.stderr, flush=True)  # QEMU's fprintf
    data: dict[str, Any] = {"device": "", "node-name": node.node_name, "msg": msg}
    if offset >= 0:
        data["offset"] = offset
        data["size"] = size
    data["fatal"] = fatal
    node.graph.emit_event("BLOCK_IMAGE_CORRUPTED", data)
    if not fatal:
        return
    node.corrupt = True
    if node.table is not None:
        node.table.clear_all()  # the fast path asks the node, which refuses
    if node.header is not None and node.header.version >= 3:
        try:
            await node.set_incompatible(node.header.incompatible_features | hdr.INCOMPAT_CORRUPT)
            await node.file.flush()
        except OSError:
            log.exception("qcow2: could not set the corrupt bit")


async def corruption_error(node: Qcow2Node, msg: str) -> MappingError:
    """Report ``msg`` (fatal) and return the error the request fails with."""
    await signal_corruption(node, msg)
    return MappingError(msg)


async def overlap_error(node: Qcow2Node, msg: str, offset: int, size: int) -> OSError:
    """Report a write that would land on metadata (fatal) and return the error it fails
    with."""
    await signal_corruption(node, msg, offset, size)
    return CorruptImage(errno.EIO, msg)
