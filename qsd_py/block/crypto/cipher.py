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
BLOCK_SIZE = 16  # AES and SM4: the LUKS ciphers the cryptography package has

HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")

_ALGS: dict[str, Callable[[bytes], algorithms.BlockCipherAlgorithm]] = {
    "aes": algorithms.AES,
    "sm4": algorithms.SM4,
}


class CipherError(Exception):
    """A cipher spec this build cannot serve; the text is QEMU's."""


def hash_new(name: str) -> hashlib._Hash:
    if name not in HASHES:
        raise CipherError(f"Hash algorithm '{name}' not supported")
    return hashlib.new(name)


_KEY_SIZES = {"aes": (16, 24, 32), "sm4": (16,)}


def check_spec(alg: str, mode: str, ivgen: str, key_len: int) -> None:
    """Refuse what QEMU refuses (its texts), and what the cryptography package lacks
    (serpent, twofish, cast5: refused as an unknown algorithm), before any key exists."""
    if mode not in ("xts", "cbc", "ecb", "ctr"):
        raise CipherError(f"Cipher mode '{mode}' not supported")
    if mode == "xts" and key_len % 2:
        raise CipherError("XTS cipher key length should be a multiple of 2")
    size = key_len // 2 if mode == "xts" else key_len
    if size not in _KEY_SIZES.get(alg, ()):
        raise CipherError(f"Algorithm '{alg}' with key size {size} bytes not supported")
    if ivgen not in ("plain", "plain64", "essiv") and not (mode == "ecb" and ivgen == ""):
        raise CipherError(f"IV generator '{ivgen}' not supported")


class SectorCipher:
    """``alg``-``mode``-``ivgen`` with ``key``; :meth:`encrypt`/:meth:`decrypt` take whole
    sectors, the first numbered ``sector``."""

    def __init__(self, alg: str, mode: str, ivgen: str, ivhash: str | None, key: bytes) -> None:
        check_spec(alg, mode, ivgen, len(key))
        self.alg, self.mode, self.ivgen = _ALGS[alg], mode, ivgen
        self.key = key
        self._essiv: Cipher | None = None
        if ivgen == "essiv":
            if ivhash is None:
                raise CipherError("Missing IV generator hash specification")
            salt = hash_new(ivhash)
            salt.update(key)
            self._essiv = Cipher(self.alg(salt.digest()), modes.ECB())
        # One algorithm object, reused for every sector (its key schedule is OpenSSL's).
        self._algo = self.alg(key)
        self._ecb = Cipher(self._algo, modes.ECB()) if mode == "ecb" else None

    def _iv(self, sector: int) -> bytes:
        if self.ivgen == "plain":
            return (sector & 0xFFFFFFFF).to_bytes(4, "little") + bytes(BLOCK_SIZE - 4)
        num = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + bytes(BLOCK_SIZE - 8)
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
        for pos in range(0, len(data), unit):
            cipher = Cipher(self._algo, self._mode(self._iv(sector + pos // unit)))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out[pos : pos + unit] = ctx.update(view[pos : pos + unit]) + ctx.finalize()
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
