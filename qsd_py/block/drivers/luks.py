"""The ``luks`` format driver: a LUKS1-encrypted image in its ``file`` child (QEMU's
``block/crypto.c``).

The header is read and a key slot unlocked with the passphrase of the secret ``key-secret``
at open; the payload starts ``payload-offset`` sectors into the file and is encrypted 512
bytes at a time, each sector's IV from its number counted from the payload's start (the
guest sector), by :class:`~qsd_py.block.crypto.io.EncryptedIO`.

The node has no fast target (the base class's None): the exports' workers read and write
the file's bytes directly, which would hand out ciphertext and store plaintext here.
"""

from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Any

from qsd_py.block.crypto import luks
from qsd_py.block.crypto.cipher import SECTOR_SIZE
from qsd_py.block.crypto.io import EncryptedIO, open_luks
from qsd_py.block.node import STATUS_DATA, BlockNode, BlockStatus, Buffer
from qsd_py.block.perm import PERM_ALL, Perm

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph


class LuksNode(BlockNode):
    driver = "luks"
    format_name = "luks"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.header: luks.LuksHeader | None = None
        self.io: EncryptedIO | None = None
        self.payload = 0

    @property
    def file(self) -> BlockNode:
        return self.children["file"].node

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        child = await self.graph.open_child(self, self.opts["file"])
        self.attach_child("file", child, Perm(0), PERM_ALL)
        if self.opts.get("header") is not None:  # a detached header: its own node
            child = await self.graph.open_child(self, self.opts["header"])
            self.attach_child("header", child, Perm.CONSISTENT_READ, PERM_ALL)

        async def read(offset: int, length: int) -> bytes:
            buf = bytearray(length)
            end = min(length, max(0, child.length() - offset))
            if end:
                await child.read(offset, memoryview(buf)[:end])
            return bytes(buf)

        detached = "header" in self.children
        self.header, cipher = await open_luks(
            self, self.opts.get("key-secret"), read, detached=detached
        )
        self.payload = 0 if detached else self.header.payload_bytes
        self.io = EncryptedIO(self.file, cipher, self.payload)

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if "file" in self.children:
            self.attach_child("file", self.file, perm, shared)

    async def amend(self, opts: dict[str, Any], force: bool, secret: Any) -> None:
        """x-blockdev-amend's key slot changes, in the header's node (the file, or a
        detached header)."""
        from qsd_py.block.crypto.amend import amend

        assert self.header is not None
        node = self.children["header"].node if "header" in self.children else self.file

        async def read(offset: int, length: int) -> bytes:
            buf = bytearray(length)
            await node.read(offset, memoryview(buf))
            return bytes(buf)

        await amend(self.header, opts, force, secret, self.opts.get("key-secret"), read,
                    node.write)  # fmt: skip
        await node.flush()

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        return max(0, self.file.length() - self.payload) // SECTOR_SIZE * SECTOR_SIZE

    async def do_truncate(self, length: int, prealloc: str) -> None:
        if self.read_only:
            raise OSError(errno.EACCES, "Image is read-only")
        await self.file.truncate(length + self.payload, prealloc)

    async def do_allocated_size(self) -> int:
        return await self.file.allocated_size()

    def allocated_size_now(self) -> int | None:
        return self.file.allocated_size_now()

    # --- I/O ------------------------------------------------------------------------------
    async def do_read(self, offset: int, buf: memoryview) -> None:
        assert self.io is not None
        await self.io.read(self.payload + offset, buf)

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        assert self.io is not None
        await self.io.write(self.payload + offset, data)

    async def do_flush(self) -> None:
        await self.file.flush()

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        assert self.io is not None
        await self.io.write_zeroes(self.payload + offset, length, unmap, no_fallback)

    async def do_discard(self, offset: int, length: int) -> None:
        """Nothing: a hole would read back as garbage once decrypted (QEMU passes discards
        down, qsd-py keeps the bytes as discard=ignore would)."""

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(STATUS_DATA, length, None)

    # --- introspection --------------------------------------------------------------------
    def filename(self) -> str:
        """A ``json:`` name always: ``key-secret`` is an option the file's name cannot say."""
        return "json:" + json.dumps(self.full_options())

    def full_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": "luks", "file": self.file.full_options()}
        if self.opts.get("key-secret") is not None:
            opts["key-secret"] = self.opts["key-secret"]
        return opts

    def image_extra(self) -> dict[str, Any]:
        assert self.header is not None
        return {
            "dirty-flag": False,
            "encrypted": True,
            "format-specific": {
                "type": "luks",
                "data": luks_info(self.header, "header" in self.children),
            },
        }

    def limits(self) -> dict[str, int]:
        own = super().limits()
        own["request-alignment"] = SECTOR_SIZE
        return own

    def info(self, flat: bool = False) -> dict[str, Any]:
        entry = super().info(flat)
        entry["encrypted"] = True
        return entry


def luks_info(h: luks.LuksHeader, detached: bool = False) -> dict[str, Any]:
    """QEMU's ``QCryptoBlockInfoLUKS``: the header's cipher and its slots."""
    mode, ivgen, ivhash = luks.parse_spec(h.cipher_mode)
    key_bits = h.key_bytes * 8 // (2 if mode == "xts" else 1)
    data: dict[str, Any] = {
        "cipher-alg": f"{h.cipher_name}-{key_bits}",
        "cipher-mode": mode,
        "ivgen-alg": ivgen,
    }
    if ivhash is not None:
        data["ivgen-hash-alg"] = ivhash
    data.update(
        {
            "hash-alg": h.hash_spec,
            "detached-header": detached,
            "payload-offset": h.payload_bytes,
            "master-key-iters": h.mk_digest_iter,
            "uuid": h.uuid,
            "slots": [_slot_info(s) for s in h.slots],
        }
    )
    return data


def _slot_info(slot: luks.KeySlot) -> dict[str, Any]:
    active = slot.active == luks.SLOT_ACTIVE
    info: dict[str, Any] = {"active": active}
    if active:
        info["iters"] = slot.iterations
        info["stripes"] = slot.stripes
    info["key-offset"] = slot.key_offset * SECTOR_SIZE
    return info


NODE = LuksNode
