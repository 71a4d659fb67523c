"""LUKS encryption of a qcow2 image (``encrypt.format=luks``): the LUKS header lives in
clusters the full-disk-encryption header extension points at; data clusters are encrypted
512 bytes at a time with the key it unlocks, each sector's IV from its *host* offset (QEMU's
``crypt_physical_offset``: a cluster's bytes are bound to where they lie in the file).
Unallocated and zero clusters read as zeroes without decryption; a cluster a write
allocates gets its copy-on-write parts (zeroes included) encrypted too, and compressed
clusters are never written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block.crypto import luks
from qsd_py.block.crypto.io import EncryptedIO

if TYPE_CHECKING:
    from qsd_py.block.crypto.cipher import SectorCipher
    from qsd_py.block.node import BlockNode


class Qcow2Crypt:
    """The unlocked header and one :class:`EncryptedIO` per data node (the one that keeps
    overlapping partial-sector writes in order)."""

    def __init__(
        self, header: luks.LuksHeader, cipher: SectorCipher, base: int = 0, length: int = 0
    ) -> None:
        self.header = header
        self.cipher = cipher
        self.base, self.length = base, length  # the LUKS header's clusters in the file
        self._io: EncryptedIO | None = None

    def over(self, node: BlockNode) -> Any:
        if self._io is None or self._io.node is not node:
            self._io = EncryptedIO(node, self.cipher, 0)
        return self._io

    def info(self) -> dict[str, Any]:
        """ImageInfoSpecificQCow2Encryption: ``format`` and QEMU's LUKS block info."""
        from qsd_py.block.drivers.luks import luks_info

        return {"format": "luks", **luks_info(self.header)}

    async def amend(
        self,
        file: BlockNode,
        opts: dict[str, Any],
        force: bool,
        secret: Any,
        own: str | None,
        read_only: bool = False,
    ) -> None:
        """x-blockdev-amend's key slot changes, within the header's clusters (QEMU's text
        for a reach outside them; a read-only node's write fails as QEMU's does, EPERM
        under its write function's "read" text)."""
        from qsd_py.block.crypto.amend import amend
        from qsd_py.errors import QMPError

        def check(offset: int, n: int) -> None:
            if offset + n > self.length:
                raise QMPError("Request for data outside of extension header")

        async def read(offset: int, n: int) -> bytes:
            check(offset, n)
            buf = bytearray(n)
            await file.read(self.base + offset, memoryview(buf))
            return bytes(buf)

        async def write(offset: int, data: bytes) -> None:
            check(offset, len(data))
            if read_only:
                raise QMPError("Could not read encryption header: Operation not permitted")
            await file.write(self.base + offset, data)

        await amend(self.header, opts, force, secret, own, read, write)
        await file.flush()
