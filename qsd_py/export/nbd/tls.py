"""TLS on an NBD connection after NBD_OPT_STARTTLS: the stdlib's TLS over the connection's
own non-blocking socket.

Why not ``asyncio``'s ``start_tls``: a connection is served by callbacks reading and writing
its socket directly (batched ``sendmsg``, requests parsed in place), and it moves to its
export's iothread loop once negotiated; a transport can do neither. ``ssl.SSLObject`` with
memory BIOs is TLS without I/O (asyncio's own TLS layer is built on it): :class:`TlsChannel`
pumps ciphertext between the socket and the BIOs and offers the connection the same calls
as the plain socket, so the request path does not change. The context comes from the
``tls-creds`` object (PSK credentials included), the peer check from the object too.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

TLS_READ = 256 << 10  #: ciphertext taken from the socket at once


class TlsChannel:
    """Plaintext in and out of a TLS session on a non-blocking socket. Calls that would
    block raise BlockingIOError, as the socket's own would."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, received: bytes) -> None:
        """A server session on ``sock``; ``received``: ciphertext already read from it."""
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self._pending = bytearray()  # ciphertext the socket has not taken yet
        if received:
            self._in.write(received)

    # --- the handshake, one step at a time ----------------------------------------------------
    def handshake_step(self) -> bool:
        """Advance the handshake: True when done, False when it needs more from the peer
        (feed it with :meth:`receive_ciphertext` once readable, after :meth:`flush`)."""
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._collect()
            return False
        self._collect()
        return True

    def receive_ciphertext(self) -> bool:
        """Read what the socket holds into the session: False at the peer's end of stream."""
        data = self.sock.recv(TLS_READ)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    # --- the connection's calls ---------------------------------------------------------------
    def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into ``view``; 0 at the end of the stream."""
        while True:
            try:
                n = self.ssl.read(len(view), view)
            except ssl.SSLWantReadError:
                if not self.receive_ciphertext():
                    return 0
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            if self._out.pending:  # a key update or a ticket to answer
                self._collect()
                self.flush()
            return n

    def send(self, buffers: Any) -> int:
        """Encrypt everything in ``buffers`` (taken whole: the ciphertext waits in the
        channel, :meth:`flush` sends it) and return the plaintext length."""
        data = b"".join(buffers)
        if data:
            self.ssl.write(data)
            self._collect()
        self.flush()
        return len(data)

    def flush(self) -> bool:
        """Send pending ciphertext: True once all of it is gone."""
        pending = self._pending
        while pending:
            try:
                n = self.sock.send(pending)
            except (BlockingIOError, InterruptedError):
                return False
            del pending[:n]
        return True

    def buffered(self) -> bool:
        """Whether bytes wait in the session (decrypted, or ciphertext not yet decrypted):
        the socket will not say readable for them."""
        return self.ssl.pending() > 0 or self._in.pending > 0

    def _collect(self) -> None:
        if self._out.pending:
            self._pending += self._out.read()
