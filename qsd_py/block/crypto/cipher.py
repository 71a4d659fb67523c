"""Sector ciphers: a LUKS ``cipher-name`` + ``cipher-mode`` (``aes`` + ``xts-plain64``,
``cbc-essiv:sha256``, ...) that encrypts and decrypts whole 512-byte sectors, each with the IV
its sector number gives (QEMU's ``ivgen``: ``plain`` the number's low 32 bits, ``plain64`` all
64, little-endian, zero-padded to the block; ``essiv`` that number encrypted with the hash of
the key, in ECB mode, with the cipher of the hash's key size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECTOR_SIZE = 512

# QEMU's LUKS hashes that this Python's hashlib (OpenSSL) has: sm3 and ripemd160 only where
# OpenSSL offers them.
HASHES = tuple(
    h
    for h in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", "sm3")
    if h in hashlib.algorithms_available
)


def _cast5() -> Callable[[bytes], algorithms.BlockCipherAlgorithm]:
    """CAST5 lives in the ``decrepit`` module from cryptography 43 on."""
    try:
        from cryptography.hazmat.decrepit.ciphers import algorithms as old
    except ImportError:  # an older cryptography: still among the primitives
        return algorithms.CAST5  # type: ignore[attr-defined,no-any-return]
    return old.CAST5


# The LUKS ciphers served (header name: the cryptography class, key sizes, modes). QEMU's
# LUKS also knows serpent and twofish, which the cryptography package lacks; XTS is AES's
# only there, and OpenSSL has neither CAST5-CTR nor AES-192-XTS, so qsd-py makes those two
# from ECB.
_ALGS: dict[str, tuple[Callable[[bytes], algorithms.BlockCipherAlgorithm], tuple[int, ...],
                       tuple[str, ...]]] = {
    "aes": (algorithms.AES, (16, 24, 32), ("xts", "cbc", "ecb", "ctr")),
    "sm4": (algorithms.SM4, (16,), ("cbc", "ecb", "ctr")),
    "cast5": (_cast5(), (16,), ("cbc", "ecb", "ctr")),
}  # fmt: skip
# The ciphers QEMU's LUKS names (its name map), with their key sizes: any other name or
# size is refused by name, as QEMU does.
_LUKS_NAMES = {"aes": (16, 24, 32), "serpent": (16, 24, 32), "twofish": (16, 24, 32),
               "cast5": (16,), "sm4": (16,)}  # fmt: skip


class CipherError(Exception):
    """A cipher spec this build cannot serve; the text is QEMU's."""


def hash_new(name: str) -> hashlib._Hash:
    if name not in HASHES:
        raise CipherError(f"Hash algorithm '{name}' not supported")
    return hashlib.new(name)


def qapi_name(alg: str, size: int) -> str:
    """QEMU's QCryptoCipherAlgo name: ``aes-256``, ``cast5-128``, ``sm4``."""
    return alg if alg == "sm4" else f"{alg}-{size * 8}"


def check_spec(alg: str, mode: str, ivgen: str, key_len: int) -> None:
    """Refuse what QEMU refuses (its texts), and what the cryptography package lacks
    (serpent, twofish; XTS but for AES): refused with the text QEMU's own cipher backends
    give for an algorithm or mode they lack, before any key exists."""
    if mode not in ("xts", "cbc", "ecb", "ctr"):
        raise CipherError(f"Cipher mode '{mode}' not supported")
    if mode == "xts" and key_len % 2:
        raise CipherError("XTS cipher key length should be a multiple of 2")
    size = key_len // 2 if mode == "xts" else key_len
    if size not in _LUKS_NAMES.get(alg, ()):
        raise CipherError(f"Algorithm '{alg}' with key size {size} bytes not supported")
    if ivgen not in ("plain", "plain64", "essiv") and not (mode == "ecb" and ivgen == ""):
        raise CipherError(f"IV generator '{ivgen}' not supported")
    if alg not in _ALGS:
        raise CipherError(f"Unsupported cipher algorithm {qapi_name(alg, size)}")
    if mode not in _ALGS[alg][2]:
        raise CipherError(f"Unsupported cipher mode {mode}")


def essiv_check(alg: str, ivhash: str) -> None:
    """ESSIV encrypts with the same cipher keyed by the hash: the digest must be one of the
    cipher's key sizes (QEMU's text for AES; the others by QEMU's key length check)."""
    size = hash_new(ivhash).digest_size
    sizes = _LUKS_NAMES.get(alg, ())
    if size not in sizes:
        if alg == "aes":
            raise CipherError(f"No AES cipher with key size {size} available")
        raise CipherError(f"Cipher key length {size} should be {sizes[0] if sizes else 0}")


def supported(alg: str, mode: str, key_len: int) -> bool:
    """Whether :class:`SectorCipher` serves ``alg``-``mode`` with a ``key_len`` key."""
    try:
        check_spec(alg, mode, "plain64", key_len)
    except CipherError:
        return False
    return True


class SectorCipher:
    """``alg``-``mode``-``ivgen`` with ``key``; :meth:`encrypt`/:meth:`decrypt` take whole
    sectors, the first numbered ``sector``."""

    def __init__(self, alg: str, mode: str, ivgen: str, ivhash: str | None, key: bytes) -> None:
        check_spec(alg, mode, ivgen, len(key))
        self.alg, self.mode, self.ivgen = _ALGS[alg][0], mode, ivgen
        self.key = key
        self._essiv: Cipher | None = None
        if ivgen == "essiv":
            if ivhash is None:
                raise CipherError("Missing IV generator hash specification")
            essiv_check(alg, ivhash)
            salt = hash_new(ivhash)
            salt.update(key)
            self._essiv = Cipher(self.alg(salt.digest()), modes.ECB())
        # One algorithm object, reused for every sector (its key schedule is OpenSSL's).
        # (AES-192-XTS's 48-byte key is no AES key: its halves are, below)
        self._algo = self.alg(key if len(key) != 48 or mode != "xts" else key[:32])
        self.block = self._algo.block_size // 8
        self._ecb = Cipher(self._algo, modes.ECB()) if mode == "ecb" else None
        # OpenSSL's XTS takes two 128- or 256-bit keys: AES-192-XTS is made from ECB.
        self._xts_ecb: tuple[Cipher, Cipher] | None = None
        if mode == "xts" and len(key) == 48:
            half = len(key) // 2
            self._xts_ecb = (
                Cipher(self.alg(key[:half]), modes.ECB()),
                Cipher(self.alg(key[half:]), modes.ECB()),
            )
        # No CTR in OpenSSL for a 64-bit block: the key stream from ECB of the counters.
        self._ctr_ecb = (
            Cipher(self._algo, modes.ECB()) if mode == "ctr" and self.block != 16 else None
        )

    def _iv(self, sector: int) -> bytes:
        if self.ivgen == "plain":
            return (sector & 0xFFFFFFFF).to_bytes(4, "little") + bytes(self.block - 4)
        num = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + bytes(self.block - 8)
        if self._essiv is not None:
            enc = self._essiv.encryptor()
            return enc.update(num) + enc.finalize()
        return num

    def _mode(self, iv: bytes) -> modes.Mode:
        if self.mode == "xts":
            return modes.XTS(iv)
        if self.mode == "cbc":
            return modes.CBC(iv)
        return modes.CTR(iv)

    def _run(self, data: bytes | memoryview, sector: int, encrypt: bool, unit: int) -> bytes:
        if self._ecb is not None:
            ctx = self._ecb.encryptor() if encrypt else self._ecb.decryptor()
            return ctx.update(data) + ctx.finalize()
        out = bytearray(len(data))
        view = memoryview(data)
        if self._ctr_ecb is not None:
            return self._ctr_stream(view, sector, unit)
        if self._xts_ecb is not None:
            return self._xts(view, sector, unit, encrypt)
        for pos in range(0, len(data), unit):
            cipher = Cipher(self._algo, self._mode(self._iv(sector + pos // unit)))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out[pos : pos + unit] = ctx.update(view[pos : pos + unit]) + ctx.finalize()
        return bytes(out)

    def _ctr_stream(self, view: memoryview, sector: int, unit: int) -> bytes:
        """CTR for a small block: each unit XORed with ECB of IV, IV + 1, ... (the IV a
        big-endian counter over the whole block, as QEMU's backends count)."""
        assert self._ctr_ecb is not None
        out = bytearray(len(view))
        bits = self.block * 8
        for pos in range(0, len(view), unit):
            n = min(unit, len(view) - pos)
            start = int.from_bytes(self._iv(sector + pos // unit), "big")
            blocks = -(-n // self.block)
            counters = b"".join(
                ((start + i) % (1 << bits)).to_bytes(self.block, "big") for i in range(blocks)
            )
            enc = self._ctr_ecb.encryptor()
            stream = enc.update(counters) + enc.finalize()
            chunk = int.from_bytes(view[pos : pos + n], "big") ^ int.from_bytes(stream[:n], "big")
            out[pos : pos + n] = chunk.to_bytes(n, "big")
        return bytes(out)

    def _xts(self, view: memoryview, sector: int, unit: int, encrypt: bool) -> bytes:
        """XTS from ECB (whole 16-byte blocks: sectors and key material never need
        ciphertext stealing): the tweak, the IV encrypted with the second key, multiplied
        by x in GF(2^128) from block to block, XORed in before and after the first key."""
        assert self._xts_ecb is not None
        data_ecb, tweak_ecb = self._xts_ecb
        out = bytearray(len(view))
        for pos in range(0, len(view), unit):
            n = min(unit, len(view) - pos)
            enc = tweak_ecb.encryptor()
            tweak = int.from_bytes(enc.update(self._iv(sector + pos // unit)), "little")
            tweaks = bytearray()
            for _ in range(n // 16):
                tweaks += tweak.to_bytes(16, "little")
                tweak = ((tweak << 1) & ((1 << 128) - 1)) ^ (0x87 if tweak >> 127 else 0)
            mask = int.from_bytes(tweaks, "big")
            inner = (int.from_bytes(view[pos : pos + n], "big") ^ mask).to_bytes(n, "big")
            ctx = data_ecb.encryptor() if encrypt else data_ecb.decryptor()
            done = ctx.update(inner) + ctx.finalize()
            out[pos : pos + n] = (int.from_bytes(done, "big") ^ mask).to_bytes(n, "big")
        return bytes(out)

    def encrypt(self, data: bytes | memoryview, sector: int, unit: int = SECTOR_SIZE) -> bytes:
        return self._run(data, sector, True, unit)

    def decrypt(self, data: bytes | memoryview, sector: int, unit: int = SECTOR_SIZE) -> bytes:
        return self._run(data, sector, False, unit)


def parse_spec(mode_spec: str) -> tuple[str, str, str | None]:
    """``xts-plain64``: (``xts``, ``plain64``, None); ``cbc-essiv:sha256``: (``cbc``,
    ``essiv``, ``sha256``)."""
    mode, _, ivspec = mode_spec.partition("-")
    ivgen, _, ivhash = ivspec.partition(":")
    return mode, ivgen, ivhash or None
