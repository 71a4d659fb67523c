"""``transaction`` actions of the snapshots (QEMU's external_snapshot_action and
internal_snapshot_action in blockdev.c).

- blockdev-snapshot, blockdev-snapshot-sync: prepare does the command's work up to the
  overlay taking the node's place (a -sync overlay file is created and opened first);
  commit makes the old node read-only (QEMU reopens it so in commit); abort puts the old
  node back in its place; clean closes an implicit overlay nobody uses (an aborted -sync
  overlay: its file stays, as QEMU leaves it).
- blockdev-snapshot-internal-sync: prepare takes the snapshot; abort deletes it again.
"""

from __future__ import annotations

import logging
from typing import Any

from qsd_py.block import external_snapshot as ext
from qsd_py.block.reopen import make_read_only
from qsd_py.block.snapshot_commands import take_internal
from qsd_py.transaction import Action, transaction_action

log = logging.getLogger(__name__)


@transaction_action
class ExternalSnapshot(Action):
    kind = "blockdev-snapshot"
    old: Any = None
    new: Any = None
    appended = False

    async def prepare(self) -> None:
        graph = self.daemon.graph
        old = ext._find(graph, self.data["node"])
        ext._check_old(old)
        await ext._flush(old)
        new = ext._find(graph, self.data["overlay"])
        await self._attach(old, new)

    async def _attach(self, old: Any, new: Any) -> None:
        self.old, self.new, self.opts = old, new, dict(new.opts)
        await ext.attach(old, new)
        self.appended = True

    async def commit(self) -> None:
        if self.appended:
            try:
                await make_read_only(self.old)
            except Exception:  # noqa: BLE001 - QEMU ignores a failed reopen here too
                log.exception("snapshot: %s not made read-only", self.old.node_name)

    async def abort(self) -> None:
        if self.appended:
            await ext.detach(self.old, self.new, self.opts)


@transaction_action
class ExternalSnapshotSync(ExternalSnapshot):
    kind = "blockdev-snapshot-sync"

    async def prepare(self) -> None:
        old, new = await ext.open_sync_overlay(self.daemon.graph, self.data)
        self.new = new
        await self._attach(old, new)

    async def clean(self) -> None:
        if self.new is not None:
            await ext.drop_overlay(self.daemon.graph, self.new)


@transaction_action
class InternalSnapshot(Action):
    kind = "blockdev-snapshot-internal-sync"
    node: Any = None

    async def prepare(self) -> None:
        self.node = await take_internal(self.daemon, self.data)

    async def abort(self) -> None:
        from qsd_py.block.qcow2 import internal_snapshots as isn

        if self.node is None:
            return
        index = isn.find(self.node.snapshots, None, self.data["name"])
        if index >= 0:
            try:
                await isn.delete(self.node, index)
            except Exception:  # noqa: BLE001 - abort cannot fail (QEMU logs it too)
                log.exception("snapshot: %s not deleted", self.data["name"])
