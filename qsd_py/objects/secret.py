"""Secret objects (``secret``, ``secret_keyring``): passwords and keys given to the daemon.

A secret's bytes come from ``data`` or ``file`` (``secret``) or from the kernel's key
retention service (``secret_keyring``, by key serial); ``format=base64`` means they are base64
text. With ``keyid`` they are AES-256-CBC ciphertext, decrypted with the 32-byte secret
``keyid`` names and the base64 ``iv``, padding stripped, as QEMU does: its management layers
pass secrets to it this way so that the cleartext never appears on a command line. The
cipher is the ``cryptography`` package's (already a dependency for TLS).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any

from qsd_py.encodings import decode_base64
from qsd_py.errors import QMPError

KEY_LENGTH = 32  # AES-256
IV_LENGTH = 16
_SYS_KEYCTL = 250  # x86_64
_KEYCTL_READ = 11

SecretLookup = Callable[[str], "Secret"]


class Secret:
    """The bytes of a secret, decrypted and decoded when the object is completed."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        self.id = obj_id
        self.opts = opts
        self.data = b""

    def complete(self, lookup: SecretLookup) -> None:
        """Load, decrypt and decode (QEMU's ``complete`` step of a user-creatable object:
        it may name another secret, ``keyid``, which ``lookup`` finds)."""
        raw = self.load()
        if self.opts.get("keyid") is not None:
            self.data = _decrypt(raw, self.opts, lookup)
        elif self.opts.get("format") == "base64":
            self.data = decode_base64(raw.decode("utf-8", "surrogateescape"))
        else:
            self.data = raw

    def load(self) -> bytes:
        raise NotImplementedError

    def as_utf8(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise QMPError(f"Data from secret {self.id} is not valid UTF-8") from err

    def as_base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def stop(self) -> None:
        """Nothing to release (object-del, shutdown)."""


class SecretData(Secret):
    """``secret``: the bytes of ``data`` (UTF-8) or of the file ``file``."""

    def load(self) -> bytes:
        data, path = self.opts.get("data"), self.opts.get("file")
        if data is not None and path is not None:
            raise QMPError("'file' and 'data' are mutually exclusive")
        if data is not None:
            return data.encode("utf-8", "surrogatepass")
        if path is None:
            raise QMPError("Either 'file' or 'data' must be provided")
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            why = f"Failed to open file \u201c{path}\u201d: {os.strerror(err.errno or errno.EIO)}"
            raise QMPError(f"Unable to read {path}: {why}") from err


class SecretKeyring(Secret):
    """``secret_keyring``: the payload of the kernel key ``serial`` (keyctl read)."""

    def load(self) -> bytes:
        serial = self.opts["serial"]
        libc = ctypes.CDLL(None, use_errno=True)
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = libc.syscall(_SYS_KEYCTL, _KEYCTL_READ, ctypes.c_int32(serial), buf, size)
            if n < 0:
                err = ctypes.get_errno()
                raise QMPError(
                    f"Unable to read serial key {serial & 0xFFFFFFFF:08x}: {os.strerror(err)}"
                )
            if n <= size:
                return buf.raw[:n]
            size = n


def _decrypt(raw: bytes, opts: dict[str, Any], lookup: SecretLookup) -> bytes:
    """AES-256-CBC decryption with the secret ``keyid`` and ``iv``, QEMU's checks and texts."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = lookup(opts["keyid"]).data
    if len(key) != KEY_LENGTH:
        raise QMPError(f"Key should be {KEY_LENGTH} bytes in length")
    if opts.get("iv") is None:
        raise QMPError("IV is required to decrypt secret")
    iv = decode_base64(opts["iv"])
    if len(iv) != IV_LENGTH:
        raise QMPError(f"IV should be {IV_LENGTH} bytes in length not {len(iv)}")
    if opts.get("format") == "base64":
        raw = decode_base64(raw.decode("utf-8", "surrogateescape"))
    if len(raw) % IV_LENGTH:
        raise QMPError(f"Length {len(raw)} must be a multiple of block size {IV_LENGTH}")
    if not raw:
        return b""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = decryptor.update(raw) + decryptor.finalize()
    pad = plain[-1]
    if pad > IV_LENGTH or pad > len(plain):
        raise QMPError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
    return plain[: len(plain) - pad]
