"""What every block export shares, whatever carries its bytes (FUSE, NBD...).

QEMU's ``block-export-add`` does the same generic steps for every export type before the
type's own ``create`` runs, and the same ones after its ``delete``; :class:`BlockExport` does
them here, in QEMU's order and with its texts:

1. :meth:`BlockExport.lookup_node` (called by the registry before the export is built): the
   node by name, and ``Cannot export read-only node as writable``.
2. :meth:`BlockExport.start`: the iothreads (``iothread`` as one name or a list, the list
   meaning one queue per thread where the type can do that, ``fixed-iothread``), then the
   node's permissions as an export user (:meth:`take_node`), then the type's :meth:`setup`.
   A failure anywhere undoes what was done, so a failed add leaves nothing behind.
3. :meth:`BlockExport.stop`: ``safe`` refuses while :meth:`in_use`; otherwise the type's
   :meth:`teardown` and then the node and iothreads are given back.

A type overrides :meth:`setup`, :meth:`teardown` and :meth:`in_use`, and sets ``type``
(the QAPI name), ``label`` (the name QEMU's messages use), ``multithread`` and, when they
differ from FUSE's, the node permissions ``resize`` and ``shared``. The registry
(``qsd_py/export/registry.py``) owns the list of exports, ``block-export-del``'s modes and the
``BLOCK_EXPORT_DELETED`` event, and ``query-block-exports`` asks each export's :meth:`info`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar

from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon
    from qsd_py.objects.iothread import IOThread


class BlockExport:
    """One export of a block node: the options and bookkeeping all export types share."""

    type: ClassVar[str]
    # How QEMU names the type in its messages ("FUSE", "NBD").
    label: ClassVar[str] = ""
    # Whether a list of iothreads (one queue per thread) is supported.
    multithread: ClassVar[bool] = False
    # The node permissions of the type (see take_node): whether it resizes the node (None:
    # when writable, as QEMU's FUSE exports) and what it lets others do (QEMU's NBD exports:
    # everything but resize).
    resize: ClassVar[bool | None] = None
    shared: ClassVar[Perm] = PERM_ALL

    def __init__(self, daemon: Daemon, opts: dict[str, Any], node: BlockNode) -> None:
        self.daemon = daemon
        self.opts = opts
        self.id: str = opts["id"]
        self.node = node
        self.writable: bool = bool(opts.get("writable", False))
        self.writethrough: bool = bool(opts.get("writethrough", False))
        self.shutting_down = False
        # The export's iothreads, in the order given; empty: the main loop serves it.
        self.iothreads: list[IOThread] = []
        # ``iothread`` was a list: one queue per thread (only types with ``multithread``).
        self.multithreaded = isinstance(opts.get("iothread"), list)
        self._held_iothreads: list[str] = []
        self._node_taken = False

    @staticmethod
    def lookup_node(daemon: Daemon, opts: dict[str, Any]) -> BlockNode:
        """The node to export, refused with QEMU's text when it cannot be exported as asked.

        QEMU checks the exported node itself first, before iothreads and the type's own
        options; a writable export of a read-write node over a read-only child fails later,
        on the child's permissions (``Block node is read-only``)."""
        node = daemon.graph.lookup(opts["node-name"])
        if opts.get("writable", False) and node.read_only:
            raise QMPError("Cannot export read-only node as writable")
        return node

    # --- the life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Make the export reachable. Raises QMPError on failure, leaving nothing behind."""
        try:
            self.take_iothreads()
            self.take_node()
            if self.multithreaded and not self.multithread:
                raise QMPError(f"{self.label} export does not support multi-threading")
            await self.setup()
        except BaseException:
            await self._close(abort=True)
            raise

    async def stop(self, mode: str) -> Awaitable[None] | None:
        """Tear the export down. ``mode`` is ``safe`` or ``hard`` (block-export-del).

        ``safe`` raises QMPError (``export 'ID' still in use``) if requests are in flight;
        ``hard`` aborts them. Returns None once nothing of the export remains; a type whose
        last requests outlive the command (NBD clients) returns an awaitable that completes
        when they are done, and the registry finishes the deletion then.
        """
        if mode == "safe" and self.in_use():
            raise QMPError(f"export '{self.id}' still in use")
        await self._close(abort=mode == "hard")
        return None

    async def _close(self, abort: bool) -> None:
        try:
            await self.teardown(abort)
        finally:
            self.release_node()
            self.release_iothreads()

    # --- what a type provides ----------------------------------------------------------------
    async def setup(self) -> None:
        """The type's own checks and start-up (mount, serve...), after iothreads and node
        permissions are taken. On failure :meth:`teardown` runs (with ``abort``), so it must
        cope with a half-done setup."""
        raise NotImplementedError

    async def teardown(self, abort: bool) -> None:
        """Undo :meth:`setup` (``abort``: requests in flight are cut short). The node and
        iothreads are given back after it, even when it fails."""
        raise NotImplementedError

    def in_use(self) -> bool:
        """True while requests are in flight (``safe`` deletion refuses then)."""
        return False

    def after_command(self) -> None:
        """Called after every QMP command (one may have changed the node)."""

    def info(self) -> dict[str, Any]:
        """The ``BlockExportInfo`` answer of ``query-block-exports``."""
        return {
            "type": self.type,
            "id": self.id,
            "node-name": self.node.node_name,
            "shutting-down": self.shutting_down,
        }

    # --- shared helpers ----------------------------------------------------------------------
    def take_iothreads(self) -> None:
        """Resolve and hold ``iothread`` with QEMU's rules: a list may not be empty nor go
        with ``fixed-iothread``, and every name must be an iothread (held until the export
        goes, so ``object-del`` refuses meanwhile)."""
        spec = self.opts.get("iothread")
        if spec is None:
            return
        names = [spec] if isinstance(spec, str) else list(spec)
        if self.multithreaded:
            if not names:
                raise QMPError("The set of I/O threads must not be empty")
            if self.opts.get("fixed-iothread", False):
                raise QMPError("Cannot use fixed-iothread for a multi-threaded export")
        threads = [self.daemon.objects.iothread(name) for name in names]
        for name in names:
            self.daemon.objects.hold(name)
            self._held_iothreads.append(name)
        self.iothreads = threads

    def release_iothreads(self) -> None:
        for name in self._held_iothreads:
            self.daemon.objects.release(name)
        self._held_iothreads.clear()

    def take_node(self) -> None:
        """Hold the node's permissions as an export user: consistent read, write when
        ``writable``, resize as the type's ``resize`` says, sharing the type's ``shared``.
        Conflicts and a read-only node are refused with QEMU's texts."""
        self.node.add_user(
            self.id,
            self.writable,
            self.resize,
            shared=self.shared,
            quiesce=self.quiesce_hook(),
            repoint=self.repoint_hook(),
        )
        self._node_taken = True

    def release_node(self) -> None:
        if self._node_taken:
            self.node.remove_user(self.id)
            self._node_taken = False

    def repoint_hook(self) -> Any:
        """For a type that can serve another node after a job's pivot (mirror): the
        ``NodeUser.repoint`` function, else None (the export stays on its node).
        Evaluated when the node is taken, so it may depend on the export's options."""
        return None

    def quiesce_hook(self) -> Any:
        """For a type that starts requests of its own: the ``NodeUser.quiesce`` coroutine
        function that pauses them (``BlockNode.drained``), or None."""
        return None
