"""The block node interface every driver implements and every export calls.

CONTRACT (exports rely on it; drivers implement it):

* All I/O methods are coroutines and may be awaited from *any* asyncio loop (the main loop
  or an iothread's loop). Drivers must never block the calling loop: blocking syscalls go to
  a thread pool (``aio=threads``) or an io_uring (``aio=io_uring``).
* Offsets and lengths are in bytes, need no alignment, and must lie inside
  ``[0, length())``: callers (exports) clip requests at EOF themselves.
* ``read`` fills the whole caller-provided buffer; ``write`` writes the whole buffer. A short
  transfer from the OS is retried or becomes an ``OSError``.
* Errors are raised as ``OSError`` with a meaningful errno (exports turn them into -errno).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

Buffer = memoryview | bytearray | bytes


class BlockNode:
    """A node of the block graph.

    ``opts`` is the validated ``BlockdevOptions`` dict (blockdev-add arguments or the parsed
    ``--blockdev``). Drivers set ``read_only`` and open their children in ``__init__``
    (or an async ``open``) and release them in ``close``.
    """

    driver: ClassVar[str]

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        self.graph = graph
        self.opts = opts
        self.node_name: str = opts["node-name"]
        self.read_only: bool = bool(opts.get("read-only", False))
        # discard=unmap lets write_zeroes(unmap=True)/discard deallocate; ignore (default) zeroes.
        self.discard_unmap: bool = opts.get("discard", "ignore") == "unmap"

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        """Open files and children. Raise QMPError with QEMU's text on failure."""

    def close(self) -> None:
        """Release files, locks and children."""

    # --- permissions ----------------------------------------------------------------------
    def add_user(self, user: str, write: bool) -> None:
        """Register a user (an export id or a parent node). ``write`` asks for the write
        permission: a read-only node raises QMPError. The graph refuses to delete a node that
        has users (``Node X is in use``)."""
        raise NotImplementedError

    def remove_user(self, user: str) -> None:
        raise NotImplementedError

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        """Current length in bytes (cached; updated by truncate)."""
        raise NotImplementedError

    async def truncate(self, length: int) -> None:
        """Grow (new range reads zeroes) or shrink the node."""
        raise NotImplementedError

    async def allocated_size(self) -> int:
        """Bytes allocated on the host for this node (st_blocks * 512 for files); 0 if unknown."""
        raise NotImplementedError

    # --- I/O ------------------------------------------------------------------------------
    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes from ``offset``."""
        raise NotImplementedError

    async def write(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Make written data stable (fdatasync unless cache.no-flush)."""
        raise NotImplementedError

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero a range; deallocate it too when ``unmap`` and the node has discard=unmap."""
        raise NotImplementedError

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate a range if discard=unmap, else do nothing (QEMU's discard=ignore)."""
        raise NotImplementedError

    async def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        """Allocation at ``offset``: ``(is_data, n)`` where ``n`` (>0, <= length) bytes from
        ``offset`` share that status. Holes are ``is_data=False`` (read as zeroes)."""
        raise NotImplementedError

    # --- introspection --------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The ``BlockDeviceInfo`` entry of ``query-named-block-nodes``."""
        raise NotImplementedError
