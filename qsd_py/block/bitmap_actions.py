"""``transaction`` actions of the dirty bitmaps (QEMU's block_dirty_bitmap_*_action in
blockdev.c): each does in prepare what its command does, in a form that abort can undo.

- add: the bitmap is made at once (visible to later actions); abort removes it.
- remove: the bitmap is checked, a persistent one leaves the image at once (as QEMU's) and
  the bitmap is made busy; commit removes it, abort makes it usable again (and stored on
  close again).
- clear, merge: the bits are saved first; abort puts them back.
- enable, disable: abort puts back the state found.
"""

from __future__ import annotations

from qsd_py.block import bitmap_commands as cmds
from qsd_py.block.dirty import DirtyBitmap
from qsd_py.transaction import Action, transaction_action


class _BitsAction(Action):
    """An action that changes a bitmap's bits: abort restores the saved ones."""

    bitmap: DirtyBitmap | None = None
    backup: bytes = b""

    def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.restore(self.backup)


@transaction_action
class BitmapAdd(Action):
    kind = "block-dirty-bitmap-add"
    bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        self.bitmap = cmds.add(self.daemon.graph, self.data)

    def abort(self) -> None:
        if self.bitmap is not None:
            node = self.daemon.graph.lookup_device_or_node(self.data["node"], self.data["node"])
            node.remove_dirty_bitmap(self.bitmap)


@transaction_action
class BitmapRemove(Action):
    kind = "block-dirty-bitmap-remove"
    bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        graph, data = self.daemon.graph, self.data
        self.node, bitmap = cmds.lookup(graph, data["node"], data["name"])
        await cmds.drop_from_image(self.node, bitmap)
        self.bitmap = bitmap
        bitmap.busy = True

    def commit(self) -> None:
        if self.bitmap is not None:
            self.bitmap.busy = False
            self.node.remove_dirty_bitmap(self.bitmap)

    def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.busy = False


@transaction_action
class BitmapClear(_BitsAction):
    kind = "block-dirty-bitmap-clear"

    async def prepare(self) -> None:
        _, bitmap = cmds.lookup(self.daemon.graph, self.data["node"], self.data["name"])
        bitmap.check()
        self.bitmap, self.backup = bitmap, bitmap.saved()
        bitmap.clear(0, bitmap.length)


@transaction_action
class BitmapMerge(_BitsAction):
    kind = "block-dirty-bitmap-merge"

    async def prepare(self) -> None:
        data = self.data
        dst, scratch = cmds.merged(self.daemon.graph, data["node"], data["target"], data["bitmaps"])
        self.bitmap, self.backup = dst, dst.saved()
        dst.merge_from(scratch)


class _Toggle(Action):
    """enable/disable: abort gives the bitmap back the state prepare found."""

    enabled: bool
    bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        self.node, bitmap = cmds.lookup(self.daemon.graph, self.data["node"], self.data["name"])
        bitmap.check(allow_readonly=True)
        self.was_enabled = bitmap.enabled
        self.bitmap = bitmap
        self.node.enable_dirty_bitmap(bitmap, self.enabled)

    def abort(self) -> None:
        if self.bitmap is not None and self.was_enabled != self.enabled:
            self.node.enable_dirty_bitmap(self.bitmap, self.was_enabled)


@transaction_action
class BitmapEnable(_Toggle):
    kind = "block-dirty-bitmap-enable"
    enabled = True


@transaction_action
class BitmapDisable(_Toggle):
    kind = "block-dirty-bitmap-disable"
    enabled = False
