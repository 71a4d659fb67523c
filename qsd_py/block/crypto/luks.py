"""The LUKS1 header (QEMU's ``crypto/block-luks.c`` format, which is cryptsetup's): parsing
with QEMU's checks and error texts, and unlocking a key slot with a passphrase.

The header is 592 bytes, big-endian: magic, version 1, cipher name and mode, hash, the
payload's offset in sectors, the master key's length, a PBKDF2 digest of the master key and
eight key slots. An active slot holds the master key split into ``stripes`` pieces
(anti-forensic split, each piece passed through the hash), encrypted with a key PBKDF2 makes
from the passphrase and the slot's salt. QEMU (and so qsd-py) opens LUKS1 only; a LUKS2
header has version 2 and is refused with QEMU's text.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from qsd_py.block.crypto.cipher import (
    SECTOR_SIZE,
    CipherError,
    SectorCipher,
    check_spec,
    essiv_check,
    hash_new,
    parse_spec,
)

MAGIC = b"LUKS\xba\xbe"
HEADER_SIZE = 592
NUM_SLOTS = 8
STRIPES = 4000
DIGEST_LEN = 20
SLOT_ACTIVE = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HEAD.size + NUM_SLOTS * _SLOT.size == HEADER_SIZE

INVALID_PASSWORD = "Invalid password, cannot unlock any keyslot"


class LuksError(Exception):
    """A header QEMU refuses, or a passphrase no slot takes; the text is QEMU's."""


@dataclass
class KeySlot:
    active: int
    iterations: int
    salt: bytes
    key_offset: int  # sectors
    stripes: int


@dataclass
class LuksHeader:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: list[KeySlot]

    @property
    def payload_bytes(self) -> int:
        return self.payload_offset * SECTOR_SIZE

    def slot_bytes(self) -> int:
        """Key material of one slot on disk: the split key, whole sectors."""
        return -(-self.key_bytes * STRIPES // SECTOR_SIZE) * SECTOR_SIZE


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def parse_header(buf: bytes, detached: bool = False) -> LuksHeader:
    """The header at the start of ``buf`` (zero-padded if the image is shorter), checked as
    QEMU checks it before it asks for any key (a ``detached`` header's payload is a node of
    its own: nothing can overlap it)."""
    buf = bytes(buf[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    fields = _HEAD.unpack_from(buf)
    magic, version = fields[0], fields[1]
    if magic != MAGIC:
        raise LuksError("Volume is not in LUKS format")
    if version != 1:
        raise LuksError(f"LUKS version {version} is not supported")
    slots = [
        KeySlot(*_SLOT.unpack_from(buf, _HEAD.size + i * _SLOT.size)) for i in range(NUM_SLOTS)
    ]
    h = LuksHeader(
        cipher_name=_cstr(fields[2]),
        cipher_mode=_cstr(fields[3]),
        hash_spec=_cstr(fields[4]),
        payload_offset=fields[5],
        key_bytes=fields[6],
        mk_digest=fields[7],
        mk_digest_salt=fields[8],
        mk_digest_iter=fields[9],
        uuid=_cstr(fields[10]),
        slots=slots,
    )
    _check_slots(h, detached)
    return h


def _check_slots(h: LuksHeader, detached: bool) -> None:
    """QEMU's qcrypto_block_luks_check_header: slots' state, stripes and places."""
    header_sectors = -(-HEADER_SIZE // SECTOR_SIZE)
    slot_sectors = h.slot_bytes() // SECTOR_SIZE
    if not detached and h.payload_offset < header_sectors:
        raise LuksError("LUKS payload is overlapping with the header")
    for i, slot in enumerate(h.slots):
        if slot.stripes != STRIPES:
            raise LuksError(f"Keyslot {i} is corrupted (stripes {slot.stripes} != {STRIPES})")
        if slot.active not in (SLOT_ACTIVE, SLOT_DISABLED):
            raise LuksError(f"Keyslot {i} state (active/disable) is corrupted")
        if slot.active == SLOT_ACTIVE and slot.iterations == 0:
            raise LuksError(f"Keyslot {i} iteration count is zero")
        if slot.key_offset < header_sectors:
            raise LuksError(f"Keyslot {i} is overlapping with the LUKS header")
        if not detached and slot.key_offset + slot_sectors > h.payload_offset:
            raise LuksError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, NUM_SLOTS):
            other = h.slots[j]
            if (
                slot.key_offset + slot_sectors > other.key_offset
                and other.key_offset + slot_sectors > slot.key_offset
            ):
                raise LuksError(f"Keyslots {i} and {j} are overlapping in the header")


def _split_mode(h: LuksHeader) -> tuple[str, str, str | None]:
    return parse_spec(h.cipher_mode)


def payload_cipher(h: LuksHeader, master_key: bytes) -> SectorCipher:
    """The cipher of the payload (and of the key slots' material)."""
    mode, ivgen, ivhash = _split_mode(h)
    return SectorCipher(h.cipher_name, mode, ivgen, ivhash, master_key)


def check_cipher(h: LuksHeader) -> None:
    """Refuse a cipher or hash this build cannot use before any key is derived."""
    mode, ivgen, ivhash = parse_spec(h.cipher_mode)
    try:
        check_spec(h.cipher_name, mode, ivgen, h.key_bytes)
        if ivgen == "essiv":
            if ivhash is None:
                raise CipherError("Missing IV generator hash specification")
            essiv_check(h.cipher_name, ivhash)
        hash_new(h.hash_spec)
    except CipherError as err:
        raise LuksError(str(err)) from err


def af_merge(split: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """Undo the anti-forensic split: XOR the stripes, diffusing the sum by the hash between
    them; the last stripe XORed with the sum is the key."""
    acc = bytes(key_bytes)
    for i in range(stripes - 1):
        stripe = split[i * key_bytes : (i + 1) * key_bytes]
        acc = _diffuse(_xor(acc, stripe), hash_name)
    return _xor(acc, split[(stripes - 1) * key_bytes : stripes * key_bytes])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _diffuse(block: bytes, hash_name: str) -> bytes:
    """Each digest-sized piece replaced by the hash of its index and itself (the last,
    shorter piece by as much of its hash)."""
    size = hash_new(hash_name).digest_size
    out = bytearray()
    for index, pos in enumerate(range(0, len(block), size)):
        piece = block[pos : pos + size]
        h = hash_new(hash_name)
        h.update(index.to_bytes(4, "big") + piece)
        out += h.digest()[: len(piece)]
    return bytes(out)


def af_split(key: bytes, stripes: int, hash_name: str, random: Callable[[int], bytes]) -> bytes:
    """The split :func:`af_merge` undoes: random stripes, the last one chosen to give ``key``."""
    key_bytes = len(key)
    pieces = random(key_bytes * (stripes - 1))
    acc = bytes(key_bytes)
    for i in range(stripes - 1):
        acc = _diffuse(_xor(acc, pieces[i * key_bytes : (i + 1) * key_bytes]), hash_name)
    return pieces + _xor(acc, key)


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_name, secret, salt, iterations, length)


def unlock(h: LuksHeader, password: bytes, read_slot: Callable[[int, int], bytes]) -> bytes:
    """The master key from the first active slot ``password`` opens. ``read_slot(offset,
    length)`` gives the slot's key material; a wrong password opens none (QEMU's text)."""
    for slot in h.slots:
        if slot.active != SLOT_ACTIVE:
            continue
        slot_key = pbkdf2(h.hash_spec, password, slot.salt, slot.iterations, h.key_bytes)
        material = read_slot(slot.key_offset * SECTOR_SIZE, h.slot_bytes())
        split = payload_cipher(h, slot_key).decrypt(material, 0)
        master = af_merge(split, h.key_bytes, slot.stripes, h.hash_spec)
        digest = pbkdf2(h.hash_spec, master, h.mk_digest_salt, h.mk_digest_iter, DIGEST_LEN)
        if digest == h.mk_digest:
            return master
    raise LuksError(INVALID_PASSWORD)


# --- creation ------------------------------------------------------------------------------
KEY_AREA_ALIGN = 4096  # QEMU puts the key slots, and the payload, on 4 KiB boundaries
MIN_ITERS = 1000  # QEMU's floor for slot and digest iterations
DIGEST_SHARE = 8  # the master key digest gets 1/8 of the slot's iter-time (QEMU's, cryptsetup's)


def cipher_spec(alg: str, mode: str, ivgen: str, ivhash: str | None) -> tuple[str, str, int]:
    """QAPI's ``aes-256`` + ``xts`` + ``plain64``: the header's cipher name, mode text and
    key length (an XTS key is two keys)."""
    name, _, bits = alg.partition("-")
    size = {"sm4": 16, "des": 8, "3des": 24}.get(alg) or int(bits or 0) // 8
    key_bytes = size * (2 if mode == "xts" else 1)
    mode_text = f"{mode}-{ivgen}" + (f":{ivhash}" if ivgen == "essiv" and ivhash else "")
    return name, mode_text, key_bytes


def layout(key_bytes: int) -> tuple[list[int], int]:
    """The key slots' offsets and the payload's, in sectors (QEMU's placement)."""
    align = KEY_AREA_ALIGN // SECTOR_SIZE
    slot_sectors = -(-key_bytes * STRIPES // SECTOR_SIZE)
    stride = -(-slot_sectors // align) * align
    offsets = [align + i * stride for i in range(NUM_SLOTS)]
    return offsets, align + NUM_SLOTS * stride


def iterations_per_second(hash_name: str, key_bytes: int) -> int:
    """PBKDF2 iterations this CPU does in one second (QEMU benchmarks it the same way, on
    the thread's CPU time)."""
    import time

    count = 1 << 14
    while True:
        start = time.thread_time()
        pbkdf2(hash_name, b"benchmark", bytes(32), count, key_bytes)
        spent = time.thread_time() - start
        if spent >= 0.05 or count >= 1 << 26:
            return max(1, int(count / max(spent, 1e-6)))
        count *= 4


def build_image_header(
    password: bytes,
    cipher_name: str,
    mode_text: str,
    hash_name: str,
    key_bytes: int,
    iter_time_ms: int,
    random: Callable[[int], bytes],
    uuid: str,
) -> tuple[bytes, int]:
    """A LUKS1 header with key slot 0 holding a fresh master key for ``password``: the bytes
    from offset 0 to the payload, and the payload's offset in bytes."""
    offsets, payload = layout(key_bytes)
    master = random(key_bytes)
    speed = iterations_per_second(hash_name, key_bytes)
    mk_iters = max(MIN_ITERS, speed * iter_time_ms // 1000 // DIGEST_SHARE)
    slot_iters = max(MIN_ITERS, min(0xFFFFFFFF, speed * iter_time_ms // 1000))
    mk_salt, slot_salt = random(32), random(32)
    mk_digest = pbkdf2(hash_name, master, mk_salt, mk_iters, DIGEST_LEN)
    h = LuksHeader(cipher_name, mode_text, hash_name, payload, key_bytes, mk_digest, mk_salt,
                   mk_iters, uuid, [])  # fmt: skip
    slot_key = pbkdf2(hash_name, password, slot_salt, slot_iters, key_bytes)
    split = af_split(master, STRIPES, hash_name, random)
    split += bytes(h.slot_bytes() - len(split))
    material = payload_cipher(h, slot_key).encrypt(split, 0)
    out = bytearray(payload * SECTOR_SIZE)
    _HEAD.pack_into(
        out, 0, MAGIC, 1, cipher_name.encode(), mode_text.encode(), hash_name.encode(),
        payload, key_bytes, mk_digest, mk_salt, mk_iters, uuid.encode(),
    )  # fmt: skip
    for i, sector in enumerate(offsets):
        active, iters, salt = (SLOT_ACTIVE, slot_iters, slot_salt) if i == 0 else (
            SLOT_DISABLED, 0, bytes(32))  # fmt: skip
        _SLOT.pack_into(out, _HEAD.size + i * _SLOT.size, active, iters, salt, sector, STRIPES)
    out[offsets[0] * SECTOR_SIZE : offsets[0] * SECTOR_SIZE + len(material)] = material
    return bytes(out), payload * SECTOR_SIZE


# --- key slot management (x-blockdev-amend) ------------------------------------------------
ERASE_PASSES = 16  # QEMU overwrites an erased slot's key material this many times


def pack_header(h: LuksHeader) -> bytes:
    """The 592 header bytes of ``h`` (what QEMU rewrites after each key slot change)."""
    out = bytearray(HEADER_SIZE)
    _HEAD.pack_into(
        out, 0, MAGIC, 1, h.cipher_name.encode(), h.cipher_mode.encode(), h.hash_spec.encode(),
        h.payload_offset, h.key_bytes, h.mk_digest, h.mk_digest_salt, h.mk_digest_iter,
        h.uuid.encode(),
    )  # fmt: skip
    for i, s in enumerate(h.slots):
        _SLOT.pack_into(out, _HEAD.size + i * _SLOT.size, s.active, s.iterations, s.salt,
                        s.key_offset, s.stripes)  # fmt: skip
    return bytes(out)


def split_len(h: LuksHeader, slot: KeySlot) -> int:
    """Bytes of a slot's split key as QEMU writes them (not rounded up to a sector)."""
    return h.key_bytes * slot.stripes


def load_key(h: LuksHeader, index: int, password: bytes, material: bytes) -> bytes | None:
    """The master key if slot ``index`` is active and ``password`` opens it, else None."""
    slot = h.slots[index]
    if slot.active != SLOT_ACTIVE:
        return None
    slot_key = pbkdf2(h.hash_spec, password, slot.salt, slot.iterations, h.key_bytes)
    split = payload_cipher(h, slot_key).decrypt(material, 0)
    master = af_merge(split, h.key_bytes, slot.stripes, h.hash_spec)
    digest = pbkdf2(h.hash_spec, master, h.mk_digest_salt, h.mk_digest_iter, DIGEST_LEN)
    return master if digest == h.mk_digest else None


def store_key(
    h: LuksHeader,
    index: int,
    password: bytes,
    master: bytes,
    iter_time_ms: int,
    random: Callable[[int], bytes],
) -> bytes:
    """Fill slot ``index`` of ``h`` for ``password`` (fresh salt, iterations for
    ``iter_time_ms`` of this CPU, at least QEMU's 1000) and give its encrypted split key,
    to be written at the slot's key offset before the header."""
    slot = h.slots[index]
    slot.salt = random(32)
    speed = iterations_per_second(h.hash_spec, h.key_bytes)
    iters = speed * iter_time_ms // 1000
    if iters > 0xFFFFFFFF:
        raise LuksError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}")
    slot.iterations = max(iters, MIN_ITERS)
    slot.stripes = STRIPES
    slot_key = pbkdf2(h.hash_spec, password, slot.salt, slot.iterations, h.key_bytes)
    split = af_split(master, STRIPES, h.hash_spec, random)
    material = payload_cipher(h, slot_key).encrypt(split, 0)
    slot.active = SLOT_ACTIVE
    return material


def erase_key(h: LuksHeader, index: int) -> None:
    """Mark slot ``index`` disabled in ``h`` (salt zeroed, no iterations), as QEMU does
    before it overwrites the slot's key material."""
    slot = h.slots[index]
    slot.salt = bytes(32)
    slot.iterations = 0
    slot.active = SLOT_DISABLED
