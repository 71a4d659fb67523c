"""The ``amend`` job of x-blockdev-amend: a driver changes an image's options in place.

As QEMU 11.1's: no block job, finalized by itself and dismissed by the user, progress 0 to 1
of 1, and the driver's refusal is the job's error. For qcow2 QEMU amends only the encryption
(LUKS keyslots); qsd-py opens no encrypted image, so an ``encrypt`` change fails as QEMU's
does for an unencrypted one, and an amend without it changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.jobs.job import Job

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.jobs.registry import JobRegistry


class AmendJob(Job):
    job_type = "amend"

    def __init__(
        self, registry: JobRegistry, job_id: str, *, node: BlockNode, options: dict[str, Any]
    ) -> None:
        super().__init__(registry, job_id, auto_finalize=True, auto_dismiss=False)
        self.node = node
        self.options = options

    async def run(self) -> None:
        self.set_remaining(1)
        try:
            await amend_qcow2(self.node, self.options)
        finally:
            self.progress_update(1)


async def amend_qcow2(node: BlockNode, options: dict[str, Any]) -> None:
    """QEMU's qcow2_co_amend: only the encryption can change, and only of a LUKS image."""
    if "encrypt" in options:
        raise QMPError("image is not encrypted, can't amend")


def check(node: BlockNode | None, name: str, options: dict[str, Any]) -> BlockNode:
    """QEMU's checks before the job exists, in its order and with its texts."""
    if node is None:
        raise QMPError(f"Cannot find device='' nor node-name='{name}'")
    if options["driver"] != node.driver:
        raise QMPError("x-blockdev-amend doesn't support changing the block driver")
    if node.driver != "qcow2":
        raise QMPError("Driver does not support x-blockdev-amend")
    return node
