"""The ``amend`` job of x-blockdev-amend: a driver changes an image's options in place.

As QEMU 11.1's: no block job, finalized by itself and dismissed by the user, progress 0 to 1
of 1, and the driver's refusal is the job's error. What can change is the LUKS key slots
(qsd_py/block/crypto/amend.py): of a ``luks`` node, or of a qcow2 node's ``encrypt``; a qcow2
amend without ``encrypt`` changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.jobs.job import Job

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.jobs.registry import JobRegistry


class AmendJob(Job):
    job_type = "amend"

    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        *,
        node: BlockNode,
        options: dict[str, Any],
        force: bool = False,
    ) -> None:
        super().__init__(registry, job_id, auto_finalize=True, auto_dismiss=False)
        self.node = node
        self.options = options
        self.force = force

    async def run(self) -> None:
        self.set_remaining(1)
        try:
            if self.node.driver == "luks":
                await self.node.amend(self.options, self.force, self._secret)  # type: ignore[attr-defined]
            else:
                await amend_qcow2(self.node, self.options, self.force, self._secret)
        finally:
            self.progress_update(1)

    def _secret(self, secret_id: str) -> bytes:
        """A secret's passphrase (QEMU's text for a missing one)."""
        objects = self.node.graph.objects
        if objects is None:
            raise QMPError(f"No secret with id '{secret_id}'")
        return objects.secret(secret_id).as_utf8().encode("utf-8")


async def amend_qcow2(
    node: BlockNode, options: dict[str, Any], force: bool, secret: Callable[[str], bytes]
) -> None:
    """QEMU's qcow2_co_amend: only the encryption can change, and only of a LUKS image."""
    encrypt = options.get("encrypt")
    if encrypt is None:
        return
    crypt = getattr(node, "crypt", None)
    if crypt is None:
        raise QMPError("image is not encrypted, can't amend")
    if encrypt["format"] != "luks":
        raise QMPError("Amend can't be used to change the qcow2 encryption format")
    own = (node.opts.get("encrypt") or {}).get("key-secret")
    await crypt.amend(node.children["file"].node, encrypt, force, secret, own, node.read_only)


def check(node: BlockNode | None, name: str, options: dict[str, Any]) -> BlockNode:
    """QEMU's checks before the job exists, in its order and with its texts."""
    if node is None:
        raise QMPError(f"Cannot find device='' nor node-name='{name}'")
    if options["driver"] != node.driver:
        raise QMPError("x-blockdev-amend doesn't support changing the block driver")
    if node.driver not in ("qcow2", "luks"):
        raise QMPError("Driver does not support x-blockdev-amend")
    return node
