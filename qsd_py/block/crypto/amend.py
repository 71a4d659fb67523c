"""LUKS key slot management, QEMU's ``QCryptoBlockAmendOptionsLUKS``: ``state=active`` puts
a new passphrase into a free (or, with ``force``, any) slot, unlocking the master key with
the image's own secret; ``state=inactive`` erases one slot or every slot an old passphrase
opens. The checks, their order and their texts are QEMU 11.1's ``crypto/block-luks.c``.

``read(offset, length)`` and ``write(offset, data)`` reach the LUKS header's bytes (offset 0
is the header's start: the file for the ``luks`` driver, the encryption clusters for
qcow2); PBKDF2 runs off the event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from qsd_py.block.crypto import luks
from qsd_py.block.crypto.cipher import SECTOR_SIZE
from qsd_py.errors import QMPError

Read = Callable[[int, int], Awaitable[bytes]]
Write = Callable[[int, bytes], Awaitable[None]]
Secret = Callable[[str], bytes]
DEFAULT_ITER_TIME_MS = 2000


async def _offload(func: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


async def _material(h: luks.LuksHeader, index: int, read: Read) -> bytes:
    slot = h.slots[index]
    return await read(slot.key_offset * SECTOR_SIZE, luks.split_len(h, slot))


async def _load(h: luks.LuksHeader, index: int, password: bytes, read: Read) -> bytes | None:
    if h.slots[index].active != luks.SLOT_ACTIVE:
        return None
    return await _offload(luks.load_key, h, index, password, await _material(h, index, read))


async def _find_master(h: luks.LuksHeader, password: bytes, read: Read) -> bytes:
    for index in range(luks.NUM_SLOTS):
        master = await _load(h, index, password, read)
        if master is not None:
            return master
    raise QMPError(luks.INVALID_PASSWORD)


def _active(h: luks.LuksHeader) -> list[int]:
    return [i for i, s in enumerate(h.slots) if s.active == luks.SLOT_ACTIVE]


async def amend(
    h: luks.LuksHeader,
    opts: dict[str, Any],
    force: bool,
    secret: Secret,
    own_secret: str | None,
    read: Read,
    write: Write,
) -> None:
    """Apply ``opts`` to the image whose header ``h`` is (``h`` is updated in place, and on
    disk). ``secret(id)`` gives a secret's passphrase; ``own_secret`` is the id the image
    was opened with."""
    if opts["state"] == "active":
        await _add_keyslot(h, opts, force, secret, own_secret, read, write)
    else:
        await _erase_keyslots(h, opts, force, secret, read, write)


async def _add_keyslot(
    h: luks.LuksHeader,
    opts: dict[str, Any],
    force: bool,
    secret: Secret,
    own_secret: str | None,
    read: Read,
    write: Write,
) -> None:
    if opts.get("new-secret") is None:
        raise QMPError("'new-secret' is required to activate a keyslot")
    if opts.get("old-secret") is not None:
        raise QMPError("'old-secret' must not be given when activating keyslots")
    if "keyslot" in opts:
        index = opts["keyslot"]
        if not 0 <= index < luks.NUM_SLOTS:  # QEMU prints it unsigned
            raise QMPError(
                f"Invalid keyslot {index & 0xFFFFFFFF} specified, must be between 0 and "
                f"{luks.NUM_SLOTS - 1}"
            )
    else:
        free = [i for i, s in enumerate(h.slots) if s.active != luks.SLOT_ACTIVE]
        if not free:
            raise QMPError("Can't add a keyslot - all keyslots are in use")
        index = free[0]
    if not force and h.slots[index].active == luks.SLOT_ACTIVE:
        raise QMPError(f"Refusing to overwrite active keyslot {index} - please erase it first")
    master = await _find_master(h, secret(opts.get("secret") or own_secret or ""), read)
    password = secret(opts["new-secret"])
    iter_time = opts.get("iter-time", DEFAULT_ITER_TIME_MS)
    try:
        material = await _offload(luks.store_key, h, index, password, master, iter_time,
                                  os.urandom)  # fmt: skip
    except luks.LuksError as err:
        raise QMPError(str(err)) from err
    await write(h.slots[index].key_offset * SECTOR_SIZE, material)
    await write(0, luks.pack_header(h))


async def _erase_keyslots(
    h: luks.LuksHeader,
    opts: dict[str, Any],
    force: bool,
    secret: Secret,
    read: Read,
    write: Write,
) -> None:
    for name in ("new-secret", "iter-time", "secret"):
        if opts.get(name) is not None:
            raise QMPError(f"'{name}' must not be given when erasing keyslots")
    old = secret(opts["old-secret"]) if opts.get("old-secret") is not None else None
    if "keyslot" in opts:
        index = opts["keyslot"]
        if not 0 <= index < luks.NUM_SLOTS:
            raise QMPError(
                f"Invalid keyslot {index} specified, must be between 0 and {luks.NUM_SLOTS - 1}"
            )
        if old is not None and await _load(h, index, old, read) is None:
            raise QMPError(
                f"Given keyslot {index} doesn't contain the given old password for erase operation"
            )
        if not force and h.slots[index].active != luks.SLOT_ACTIVE:
            raise QMPError(f"Given keyslot {index} is already erased (inactive) ")
        if not force and len(_active(h)) == 1:
            raise QMPError(
                f"Attempt to erase the only active keyslot {index} which will erase all the "
                "data in the image irreversibly - refusing operation"
            )
        await _erase(h, index, write)
        return
    if old is None:
        raise QMPError(
            "To erase keyslot(s), either explicit keyslot index or the password currently "
            "contained in them must be given"
        )
    matching = [i for i in range(luks.NUM_SLOTS) if await _load(h, i, old, read) is not None]
    if not matching:
        raise QMPError("No keyslots match given (old) password for erase operation")
    if not force and len(matching) == len(_active(h)):
        raise QMPError(
            "All the active keyslots match the (old) password that was given and erasing "
            "them will erase all the data in the image irreversibly - refusing operation"
        )
    for index in matching:
        await _erase(h, index, write)


async def _erase(h: luks.LuksHeader, index: int, write: Write) -> None:
    """QEMU's order: the header first, then the key material overwritten with garbage."""
    luks.erase_key(h, index)
    await write(0, luks.pack_header(h))
    slot = h.slots[index]
    for _ in range(luks.ERASE_PASSES):
        await write(slot.key_offset * SECTOR_SIZE, os.urandom(luks.split_len(h, slot)))
