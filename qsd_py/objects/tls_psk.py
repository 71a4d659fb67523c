"""TLS-PSK on the standard library's ``ssl.SSLContext``.

QEMU's ``tls-creds-psk`` needs pre-shared keys. Python's ``ssl`` module offers PSK callbacks
only from 3.13 on (``SSLContext.set_psk_server_callback``/``set_psk_client_callback``); qsd-py
runs on 3.11. The contexts stay stdlib ``SSLContext`` objects either way, so the NBD code
upgrades a connection with asyncio's ``start_tls`` whatever the credentials are: on 3.13 and
later the stdlib methods are used; before, the same OpenSSL calls are made on the context's
``SSL_CTX`` through ``ctypes`` (``openssl_ctx.py`` says how that pointer is found and checked).

Why not a package: pyOpenSSL has no PSK API (a monkey-patching add-on for it is unmaintained)
and its connections do not plug into asyncio's ``start_tls``; ``sslpsk3`` builds a C extension
reaching into the same ``_ssl`` internals (a compiler and OpenSSL headers on every machine).

Both sides use TLS 1.3, or TLS 1.2 with the PSK key exchanges QEMU adds to GnuTLS's priority.
Under TLS 1.3 a PSK is only offered: a server that declines it and shows a certificate instead
must not be trusted, so the client context requires a certificate while trusting none (a PSK
handshake shows none at all); and the TLS 1.3 suites are the SHA-256 ones, the hash the
legacy callbacks give OpenSSL's PSK.
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable

from qsd_py.objects import openssl_ctx

# The TLS 1.2 key exchanges QEMU adds to GnuTLS's priority for PSK (ECDHE-PSK, DHE-PSK, PSK).
PSK_CIPHERS = "kECDHEPSK:kDHEPSK:kPSK:!aNULL:!eNULL:!MD5:!3DES"
# TLS 1.3 suites whose hash is the SHA-256 the legacy PSK callbacks imply.
PSK_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
ServerLookup = Callable[[str], bytes | None]

_SERVER_CB = ctypes.CFUNCTYPE(
    ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint
)
_CLIENT_CB = ctypes.CFUNCTYPE(
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_char),
    ctypes.c_uint,
    ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_uint,
)

PskUnavailable = openssl_ctx.Unavailable


def server_context(lookup: ServerLookup) -> ssl.SSLContext:
    """A server context whose clients authenticate with a pre-shared key.

    ``lookup(identity)`` gives the key for an identity (username), or None to refuse it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _psk_suites(ctx)

    def key_for(identity: str | None) -> bytes:
        key = lookup(identity or "")
        return key if key else b""  # empty: unknown identity, the handshake fails

    if hasattr(ctx, "set_psk_server_callback"):  # Python >= 3.13
        ctx.set_psk_server_callback(key_for)
        return ctx

    def callback(_ssl: int, identity: bytes | None, psk: ctypes.Array, max_len: int) -> int:
        try:
            key = key_for(identity.decode("utf-8", "replace") if identity else None)
        except Exception:  # noqa: BLE001 - an exception must not cross into OpenSSL
            return 0
        if not key or len(key) > max_len:
            return 0
        ctypes.memmove(psk, key, len(key))
        return len(key)

    openssl_ctx.set_psk_callback(ctx, True, _SERVER_CB(callback))
    return ctx


def client_context(identity: str, key: bytes) -> ssl.SSLContext:
    """A client context that authenticates with ``identity`` and ``key`` and accepts only a
    server that knows the key (no certificate is trusted, see the module text)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # no certificate: nothing to match a name against
    ctx.verify_mode = ssl.CERT_REQUIRED  # with no CA loaded: a certificate never passes
    _psk_suites(ctx)
    name = identity.encode()
    if hasattr(ctx, "set_psk_client_callback"):  # Python >= 3.13
        ctx.set_psk_client_callback(lambda _hint: (identity, key))
        return ctx

    def callback(
        _ssl: int,
        _hint: bytes | None,
        out: ctypes.Array,
        max_id: int,
        psk: ctypes.Array,
        max_psk: int,
    ) -> int:
        if len(name) > max_id or len(key) > max_psk:
            return 0
        ctypes.memmove(out, name + b"\0", len(name) + 1)
        ctypes.memmove(psk, key, len(key))
        return len(key)

    openssl_ctx.set_psk_callback(ctx, False, _CLIENT_CB(callback))
    openssl_ctx.clear_session_id_context(ctx)
    return ctx


def _psk_suites(ctx: ssl.SSLContext) -> None:
    ctx.set_ciphers(PSK_CIPHERS)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        openssl_ctx.set_tls13_suites(ctx, PSK_TLS13_SUITES)
    except openssl_ctx.Unavailable:
        if not hasattr(ctx, "set_psk_server_callback"):
            raise  # Python 3.13 goes on with its own suites
