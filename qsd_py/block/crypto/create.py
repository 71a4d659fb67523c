"""blockdev-create for ``luks``: a LUKS1 header with key slot 0 for the passphrase of
``key-secret``, written to the ``file`` node, then the file sized to hold ``size`` bytes of
payload. QEMU's defaults: aes-256, xts, plain64, sha256, 2000 ms of PBKDF2 for the slot.
Salts, the master key and the UUID are random, so two images never match byte for byte;
each tool opens the other's.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import TYPE_CHECKING, Any

from qsd_py.block.crypto import luks
from qsd_py.block.crypto.cipher import CipherError, check_spec, essiv_check, hash_new
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph


async def make_header(
    graph: BlockGraph, opts: dict[str, Any], prefix: str = ""
) -> tuple[bytes, int]:
    """The header (and key material) for ``QCryptoBlockCreateOptionsLUKS`` ``opts``, and
    the payload's offset: QEMU's checks first (``prefix``: qcow2's ``encrypt.``)."""
    secret_id = opts.get("key-secret")
    if secret_id is None:
        raise QMPError(f"Parameter '{prefix}key-secret' is required for cipher")
    if graph.objects is None:
        raise QMPError(f"No secret with id '{secret_id}'")
    password = graph.objects.secret(secret_id).as_utf8().encode("utf-8")
    mode, ivgen = opts.get("cipher-mode", "xts"), opts.get("ivgen-alg", "plain64")
    ivhash = opts.get("ivgen-hash-alg", "sha256") if ivgen == "essiv" else None
    hash_name = opts.get("hash-alg", "sha256")
    alg = opts.get("cipher-alg", "aes-256")
    if alg in ("des", "3des"):  # not in QEMU's LUKS name map
        raise QMPError(f"Algorithm '{alg}' not supported")
    name, mode_text, key_bytes = luks.cipher_spec(alg, mode, ivgen, ivhash)
    try:
        check_spec(name, mode, ivgen, key_bytes)
        if ivhash is not None:
            essiv_check(name, ivhash)
        hash_new(hash_name)
    except CipherError as err:
        raise QMPError(str(err)) from err
    return await asyncio.get_running_loop().run_in_executor(
        None,
        luks.build_image_header,
        password, name, mode_text, hash_name, key_bytes,
        opts.get("iter-time", 2000), os.urandom, str(uuid.uuid4()),
    )  # fmt: skip


async def create(graph: BlockGraph, opts: dict[str, Any]) -> None:
    """Create a LUKS image in the node ``opts['file']`` names (or defines)."""
    if "header" in opts:
        raise QMPError("Detached LUKS headers cannot be created by qsd-py")
    if "file" not in opts:
        raise QMPError("Parameter 'file' is missing")
    file = await graph.open_ref(opts["file"])
    try:
        header, payload = await make_header(graph, opts)
        key = "qmp:blockdev-create"
        desc = f"an unnamed block device (uses node '{file.node_name}' as 'root' child)"
        file.set_user(NodeUser(key, Perm.WRITE | Perm.RESIZE, PERM_ALL, desc))
        try:
            await file.truncate(0)
            await file.write(0, header)
            await file.truncate(payload + opts["size"], opts.get("preallocation", "off"))
        finally:
            file.remove_user(key)
        file.refresh_length()
    finally:
        await graph.drop_orphan(file)
