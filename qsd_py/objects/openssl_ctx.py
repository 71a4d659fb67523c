"""The few OpenSSL calls on an ``ssl.SSLContext`` that Python 3.11's ``ssl`` module lacks.

QEMU's PSK and anonymous TLS credentials need OpenSSL settings the ``ssl`` module does not
expose before 3.13 (PSK callbacks) or at all (TLS 1.3 suites, automatic DH parameters). They
are set here through ``ctypes`` on the context's own ``SSL_CTX``, in the very libssl the
``_ssl`` module is linked with, so the context stays a stdlib ``SSLContext`` that asyncio's
``start_tls`` takes like any other.

The ``SSL_CTX`` pointer is the first field after the object header of CPython's
``PySSLContext``. It is trusted only after reading the context's options through it and
finding ``SSLContext.options``, before and after flipping one option: a layout that ever
differs raises :class:`Unavailable` rather than writing through a wrong pointer.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from typing import Any

SSL_CTRL_SET_DH_AUTO = 118


class Unavailable(RuntimeError):
    """The running Python's ssl module cannot be reached this way."""


_LIB: ctypes.CDLL | None = None
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "SSL_CTX_get_options": (ctypes.c_uint64, [ctypes.c_void_p]),
    "SSL_CTX_set_ciphersuites": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
    "SSL_CTX_ctrl": (
        ctypes.c_long,
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
    ),
    "SSL_CTX_set_psk_server_callback": (None, [ctypes.c_void_p, ctypes.c_void_p]),
    "SSL_CTX_set_psk_client_callback": (None, [ctypes.c_void_p, ctypes.c_void_p]),
    "SSL_CTX_set_session_id_context": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint],
    ),
}


def libssl() -> ctypes.CDLL:
    """The libssl the ``_ssl`` module uses (found in our own memory map, not by name)."""
    global _LIB
    if _LIB is None:
        import _ssl

        path = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and "/libssl.so" in fields[5]:
                    path = fields[5]
                    break
        if path is None:
            raise Unavailable(f"no libssl mapped for {_ssl.__file__}")
        lib = ctypes.CDLL(path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
        _LIB = lib
    return _LIB


def ssl_ctx(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of ``ctx``, checked against the options the context reports."""
    if sys.implementation.name != "cpython":
        raise Unavailable("needs CPython's ssl module")
    lib = libssl()
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise Unavailable("the ssl module's SSLContext layout is not the expected one")
    ctx.options ^= ssl.OP_NO_TICKET
    try:
        matches = lib.SSL_CTX_get_options(pointer) == int(ctx.options)
    finally:
        ctx.options ^= ssl.OP_NO_TICKET
    if not matches:
        raise Unavailable("the ssl module's SSLContext layout is not the expected one")
    return pointer


def set_tls13_suites(ctx: ssl.SSLContext, suites: str) -> None:
    """Limit the TLS 1.3 cipher suites (``SSL_CTX_set_ciphersuites``)."""
    if not libssl().SSL_CTX_set_ciphersuites(ssl_ctx(ctx), suites.encode()):
        raise ssl.SSLError(f"OpenSSL refused the TLS 1.3 suites {suites}")


def set_dh_auto(ctx: ssl.SSLContext) -> None:
    """Let OpenSSL pick DH parameters matching the key size (``SSL_CTX_set_dh_auto``)."""
    libssl().SSL_CTX_ctrl(ssl_ctx(ctx), SSL_CTRL_SET_DH_AUTO, 1, None)


def clear_session_id_context(ctx: ssl.SSLContext) -> None:
    """Forget the session id context the ``ssl`` module gives every context. A TLS 1.3 client
    compares it with the one of the PSK session its callback made (none), and refuses the
    server's acceptance of the key when they differ."""
    libssl().SSL_CTX_set_session_id_context(ssl_ctx(ctx), b"", 0)


def set_psk_callback(ctx: ssl.SSLContext, server: bool, callback: Any) -> None:
    """Set a PSK callback (a ctypes function object) and keep it alive with the context."""
    name = "SSL_CTX_set_psk_server_callback" if server else "SSL_CTX_set_psk_client_callback"
    getattr(libssl(), name)(ssl_ctx(ctx), ctypes.cast(callback, ctypes.c_void_p))
    ctx._qsd_psk_callback = callback  # type: ignore[attr-defined]
