"""The NBD client's protocol engine: bytes in, events and bytes out, no I/O.

Two objects, one per phase, so that a driver owns its sockets, TLS and timers and the
protocol rules are tested with raw bytes alone:

* :class:`Handshake` negotiates an export: fixed newstyle with NO_ZEROES, STARTTLS when
  asked (the :class:`StartTLS` event: the driver upgrades its stream, then calls
  :meth:`Handshake.tls_started`), extended headers or else structured replies, the
  ``base:allocation`` meta context, and ``OPT_GO`` asking for block sizes. Servers without
  ``OPT_GO`` get ``OPT_LIST`` and ``OPT_EXPORT_NAME``, and oldstyle servers are understood,
  as QEMU's client does. The result is an :class:`ExportInfo`.
* :class:`Transmission` encodes requests and decodes replies: simple, structured or
  extended, chunks arriving in any order and interleaved across requests. A read's data goes
  straight into the caller's buffer; a finished :class:`Request` is the event.

Protocol violations raise :class:`ProtocolError`: the protocol wants the connection
dropped then. Errors the server reports for a request are the request's ``error`` (an
errno), not exceptions.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

from qsd_py.nbd import wire
from qsd_py.nbd.constants import (
    CLISERV_MAGIC,
    EXPORT_NAME_MAX,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_BUFFER,
    MAX_STRING,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REP_FLAG_ERROR,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
)

# --- results and events ---------------------------------------------------------------------


class ProtocolError(Exception):
    """The server broke the protocol or refused the negotiation; the text says how, in
    QEMU's words where QEMU has them. The connection is unusable afterwards."""


class OptionError(ProtocolError):
    """The server answered an option with an error reply (``rep``, a :class:`Rep`);
    ``message`` is the server's own text, if it sent one."""

    def __init__(self, text: str, rep: int, message: str = "") -> None:
        super().__init__(text)
        self.rep = rep
        self.message = message


class NeedData:
    """The engine needs more bytes from the server before it can go on."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class StartTLS:
    """The server accepted STARTTLS: upgrade the stream, then call ``tls_started()``."""

    def __repr__(self) -> str:
        return "START_TLS"


START_TLS = StartTLS()


class Mode:
    """What replies look like after the handshake (QEMU's NBDMode, the useful subset)."""

    SIMPLE = 0  #: simple replies only
    STRUCTURED = 1  #: structured replies (32-bit lengths)
    EXTENDED = 2  #: extended headers (64-bit lengths)


# The defaults the protocol assumes when a server sends no NBD_INFO_BLOCK_SIZE.
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREF_BLOCK = 4096
MAX_MIN_BLOCK = 1 << 16


@dataclass
class ExportInfo:
    """What the handshake learned about the export."""

    name: str
    size: int = 0
    flags: int = 0  #: transmission flags (TransmissionFlag)
    mode: int = Mode.SIMPLE
    min_block: int = DEFAULT_MIN_BLOCK
    pref_block: int = DEFAULT_PREF_BLOCK
    max_block: int = MAX_BUFFER  #: largest payload the server takes
    description: str = ""
    #: negotiated meta contexts: name -> the id the server gave it
    contexts: dict[str, int] = field(default_factory=dict)


# NBD error values mapped to the host's errno; anything else means EINVAL, as in QEMU.
_ERRNO = {
    0: 0,
    Errno.EPERM: errno.EPERM,
    Errno.EIO: errno.EIO,
    Errno.ENOMEM: errno.ENOMEM,
    Errno.EINVAL: errno.EINVAL,
    Errno.ENOSPC: errno.ENOSPC,
    Errno.EOVERFLOW: errno.EOVERFLOW,
    Errno.ENOTSUP: errno.ENOTSUP,
    Errno.ESHUTDOWN: errno.ESHUTDOWN,
}


def errno_from_wire(value: int) -> int:
    """The host errno for an NBD error value (unknown values are EINVAL)."""
    return _ERRNO.get(value, errno.EINVAL)


OPTION_NAMES = {
    Opt.EXPORT_NAME: "export name",
    Opt.ABORT: "abort",
    Opt.LIST: "list",
    Opt.PEEK_EXPORT: "peek export",
    Opt.STARTTLS: "starttls",
    Opt.INFO: "info",
    Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply",
    Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
    Opt.EXTENDED_HEADERS: "extended headers",
}

# Texts of option error replies: QEMU's, with the option's number and name.
_REP_ERROR_TEXTS = {
    Rep.ERR_POLICY: "Denied by server for option {}",
    Rep.ERR_INVALID: "Invalid parameters for option {}",
    Rep.ERR_PLATFORM: "Server lacks support for option {}",
    Rep.ERR_TLS_REQD: "TLS negotiation required before option {}",
    Rep.ERR_UNKNOWN: "Requested export not available",
    Rep.ERR_SHUTDOWN: "Server shutting down before option {}",
    Rep.ERR_BLOCK_SIZE_REQD: "Server requires INFO_BLOCK_SIZE for option {}",
    Rep.ERR_TOO_BIG: "option {} exceeded maximum payload",
    Rep.ERR_EXT_HEADER_REQD: "Server requires extended headers for option {}",
}


def option_label(opt: int) -> str:
    """An option as QEMU's messages name it: number and name."""
    return f"{opt} ({OPTION_NAMES.get(opt, '<unknown>')})"


# --- the handshake --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    """What the handshake generator waits for: ``n`` bytes, named ``what`` for errors."""

    n: int
    what: str


_OptionReply = tuple[int, bytes]  # reply type, payload

# The longest option reply payload read into memory (QEMU refuses longer ones too).
MAX_OPTION_REPLY = MAX_BUFFER


class Handshake:
    """Negotiates one export with a server.

    Feed what the server sends to :meth:`receive_data` (``b""`` for end of file), send what
    :meth:`data_to_send` returns, and call :meth:`next_event` until it returns the
    :class:`ExportInfo`. It returns ``NEED_DATA`` while waiting for bytes and ``START_TLS``
    once the stream must become TLS. A failure raises :class:`ProtocolError` (an
    ``OPT_ABORT`` is then queued in :meth:`data_to_send` when the protocol allows one).
    """

    def __init__(
        self,
        export: str = "",
        *,
        tls: bool = False,
        meta_contexts: Sequence[str] = (),
        extended_headers: bool = True,
        structured_replies: bool = True,
    ) -> None:
        if len(export.encode()) > EXPORT_NAME_MAX:
            raise ProtocolError(f"export name '{export}' too long")
        self.export = export
        self.tls = tls
        self.meta_contexts = list(meta_contexts)
        self.want_extended = extended_headers
        self.want_structured = structured_replies or extended_headers
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._want: _Read | None = None
        self._paused = False  # waiting for tls_started()
        self._options = False  # options may be sent (abort is polite from then on)
        self._result: ExportInfo | None = None
        self._failed: ProtocolError | None = None
        self._steps = self._negotiate()

    # --- the driver's side ----------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The stream is TLS now: go on with the options."""
        self._paused = False

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake (none from a correct server)."""
        return bytes(self._in)

    def next_event(self) -> NeedData | StartTLS | ExportInfo:
        if self._result is not None:
            return self._result
        if self._failed is not None:
            raise self._failed
        if self._paused:
            return NEED_DATA
        try:
            return self._advance()
        except ProtocolError as err:
            self._failed = err
            if self._options:
                self._out += _option(Opt.ABORT)
            self._options = False
            raise

    def _advance(self) -> NeedData | StartTLS | ExportInfo:
        value: bytes | None = None
        while True:
            if self._want is not None:
                n = self._want.n
                if len(self._in) < n:
                    if self._eof:
                        raise ProtocolError(
                            f"Failed to read {self._want.what}: Unexpected end-of-file "
                            "before all data were read"
                        )
                    return NEED_DATA
                value = bytes(self._in[:n])
                del self._in[:n]
                self._want = None
            try:
                step = self._steps.send(value)
            except StopIteration as done:
                self._result = done.value
                self._options = False
                return done.value
            value = None
            if isinstance(step, _Read):
                self._want = step
                continue
            self._paused = True
            return step

    # --- the negotiation, as a generator that yields what it waits for -----------------------
    def _negotiate(self) -> Generator[_Read | StartTLS, bytes | None, ExportInfo]:
        (magic,) = struct.unpack(">Q", (yield _Read(8, "initial magic")))
        if magic != NBDMAGIC:
            raise ProtocolError(f"Bad initial magic received: {magic:#x}")
        (style,) = struct.unpack(">Q", (yield _Read(8, "server magic")))
        if style == CLISERV_MAGIC:
            return (yield from self._oldstyle())
        if style != IHAVEOPT:
            raise ProtocolError(f"Bad server magic received: {style:#x}")
        (server_flags,) = wire.U16.unpack((yield _Read(2, "server flags")))
        fixed = bool(server_flags & FLAG_FIXED_NEWSTYLE)
        zeroes = not server_flags & FLAG_NO_ZEROES
        client_flags = FLAG_C_FIXED_NEWSTYLE if fixed else 0
        if not zeroes:
            client_flags |= FLAG_C_NO_ZEROES
        self._out += wire.CLIENT_FLAGS.pack(client_flags)
        self._options = fixed
        info = ExportInfo(self.export)
        if self.tls:
            if not fixed:
                raise ProtocolError("Server does not support STARTTLS")
            yield from self._starttls()
        if fixed:
            info.mode = yield from self._reply_mode()
            if info.mode != Mode.SIMPLE and self.meta_contexts:
                info.contexts = yield from self._set_meta_contexts()
            if (yield from self._go(info)):
                return info
            yield from self._check_listed()
        yield from self._export_name(info, zeroes)
        return info

    def _oldstyle(self) -> Generator[_Read, bytes | None, ExportInfo]:
        """A server from before options: size and flags at once, no export names."""
        if self.export:
            raise ProtocolError("Server does not support non-empty export names")
        if self.tls:
            raise ProtocolError("Server does not support STARTTLS")
        size, flags = struct.unpack(">QI", (yield _Read(12, "export size and flags")))
        yield _Read(124, "reserved block")
        return ExportInfo(self.export, size=size, flags=flags & 0xFFFF)

    def _send_option(self, opt: int, payload: bytes = b"") -> None:
        self._out += _option(opt, payload)

    def _option_reply(
        self, opt: int, strict: bool = True
    ) -> Generator[_Read, bytes | None, _OptionReply]:
        """One reply to ``opt``: its type and payload. Error replies raise when ``strict``,
        except ``ERR_UNSUP``, which callers take as "fall back"; options that only ask for
        an extension are not strict (any error means "go on without it", as in QEMU: a
        server that wants TLS first refuses them, and then says so to OPT_GO)."""
        magic, got, rep, length = wire.OPTION_REPLY.unpack((yield _Read(20, "option reply")))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError("Unexpected option reply magic")
        if got != opt:
            raise ProtocolError(f"Unexpected option type {got} (expected {option_label(opt)})")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"server's reply to option {option_label(opt)} is too long")
        payload = (yield _Read(length, "option reply payload")) if length else b""
        if strict and rep & REP_FLAG_ERROR and rep != Rep.ERR_UNSUP:
            text = _REP_ERROR_TEXTS.get(rep, "Unknown error code when asking for option {}")
            message = payload.decode(errors="replace")
            raise OptionError(text.format(option_label(opt)), rep, message)
        return rep, payload

    def _simple_option(self, opt: int) -> Generator[_Read, bytes | None, bool]:
        """An extension without data: ACK (True) or any error reply (False)."""
        self._send_option(opt)
        rep, payload = yield from self._option_reply(opt, strict=False)
        if rep & REP_FLAG_ERROR:
            return False
        if rep != Rep.ACK:
            raise ProtocolError(
                f"Server answered option {option_label(opt)} with unexpected reply {rep:#x}"
            )
        if payload:
            raise ProtocolError(
                f"Server answered option {option_label(opt)} with a non-empty payload"
            )
        return True

    def _starttls(self) -> Generator[_Read | StartTLS, bytes | None, None]:
        self._send_option(Opt.STARTTLS)
        rep, payload = yield from self._option_reply(Opt.STARTTLS)
        if rep != Rep.ACK:
            raise ProtocolError(f"Server rejected request to start TLS {rep:x}")
        if payload:
            raise ProtocolError(f"Start TLS response was not zero {len(payload)}")
        if self._in:
            raise ProtocolError("Server sent data before the TLS handshake")
        yield START_TLS

    def _reply_mode(self) -> Generator[_Read, bytes | None, int]:
        """Extended headers if the server has them, else structured replies, else simple."""
        if self.want_extended and (yield from self._simple_option(Opt.EXTENDED_HEADERS)):
            return Mode.EXTENDED
        if self.want_structured and (yield from self._simple_option(Opt.STRUCTURED_REPLY)):
            return Mode.STRUCTURED
        return Mode.SIMPLE

    def _set_meta_contexts(self) -> Generator[_Read, bytes | None, dict[str, int]]:
        """The contexts the server agreed to (it may agree to none, or not know the
        option: then block status is not available)."""
        name = self.export.encode()
        queries = [q.encode() for q in self.meta_contexts]
        payload = wire.U32.pack(len(name)) + name + wire.U32.pack(len(queries))
        payload += b"".join(wire.U32.pack(len(q)) + q for q in queries)
        self._send_option(Opt.SET_META_CONTEXT, payload)
        contexts: dict[str, int] = {}
        while True:
            rep, data = yield from self._option_reply(Opt.SET_META_CONTEXT, strict=False)
            if rep & REP_FLAG_ERROR:
                return {}
            if rep == Rep.ACK:
                if data:
                    raise ProtocolError("Unexpected length to ACK response")
                return contexts
            if rep != Rep.META_CONTEXT or len(data) < 4 or len(data) > 4 + MAX_STRING:
                raise ProtocolError(
                    f"Unexpected reply type {rep:#x} (length {len(data)}) to option "
                    f"{option_label(Opt.SET_META_CONTEXT)}"
                )
            (ctx_id,) = wire.META_CONTEXT_ID.unpack_from(data)
            ctx_name = data[4:].decode(errors="replace")
            if ctx_name not in self.meta_contexts:
                raise ProtocolError(f"Unexpected context name '{ctx_name}'")
            if ctx_name in contexts:
                raise ProtocolError(f"Server replied with context '{ctx_name}' twice")
            contexts[ctx_name] = ctx_id

    def _go(self, info: ExportInfo) -> Generator[_Read, bytes | None, bool]:
        """OPT_GO asking for block sizes; False if the server does not know the option."""
        name = self.export.encode()
        payload = wire.U32.pack(len(name)) + name + wire.U16.pack(1)
        payload += wire.U16.pack(Info.BLOCK_SIZE)
        self._send_option(Opt.GO, payload)
        have_export = False
        while True:
            rep, data = yield from self._option_reply(Opt.GO)
            if rep == Rep.ERR_UNSUP:
                if info.mode == Mode.EXTENDED:
                    raise ProtocolError("Server supports extended headers but not NBD_OPT_GO")
                return False
            if rep == Rep.ACK:
                if data:
                    raise ProtocolError("Unexpected length to ACK response")
                if not have_export:
                    raise ProtocolError("broken server omitted NBD_INFO_EXPORT")
                return True
            if rep != Rep.INFO or len(data) < 2:
                raise ProtocolError(
                    f"unexpected reply type {rep:#x} (length {len(data)}) to option "
                    f"{option_label(Opt.GO)}"
                )
            have_export |= _apply_info(info, data)

    def _check_listed(self) -> Generator[_Read, bytes | None, None]:
        """Before OPT_EXPORT_NAME, which cannot fail politely: is the export listed?"""
        self._send_option(Opt.LIST)
        found = False
        while True:
            rep, data = yield from self._option_reply(Opt.LIST)
            if rep == Rep.ERR_UNSUP:
                return  # no list: assume the export exists
            if rep == Rep.ACK:
                if data:
                    raise ProtocolError("length too long for option end")
                if not found:
                    raise ProtocolError(f"No export with name '{self.export}' available")
                return
            if rep != Rep.SERVER or len(data) < 4:
                raise ProtocolError(f"Unexpected reply type {rep:#x} expected {Rep.SERVER:#x}")
            (length,) = wire.U32.unpack_from(data)
            if length > len(data) - 4:
                raise ProtocolError("incorrect option name length")
            found |= data[4 : 4 + length] == self.export.encode()

    def _export_name(self, info: ExportInfo, zeroes: bool) -> Generator[_Read, bytes | None, None]:
        self._send_option(Opt.EXPORT_NAME, self.export.encode())
        self._options = False  # no abort after this option: the server does not answer it
        info.size, info.flags = wire.EXPORT_NAME_REPLY.unpack(
            (yield _Read(wire.EXPORT_NAME_REPLY.size, "export length and flags"))
        )
        if zeroes:
            yield _Read(wire.EXPORT_NAME_PADDING, "reserved block")


def _option(opt: int, payload: bytes = b"") -> bytes:
    return wire.OPTION.pack(IHAVEOPT, opt, len(payload)) + payload


def _apply_info(info: ExportInfo, data: bytes) -> bool:
    """Take one NBD_REP_INFO into ``info``; True if it was NBD_INFO_EXPORT."""
    (kind,) = wire.INFO_TYPE.unpack_from(data)
    if kind == Info.EXPORT:
        if len(data) != wire.INFO_EXPORT.size:
            raise ProtocolError(f"remaining export info len {len(data) - 2} is unexpected size")
        _, info.size, info.flags = wire.INFO_EXPORT.unpack(data)
        return True
    if kind == Info.BLOCK_SIZE:
        if len(data) != wire.INFO_BLOCK_SIZE.size:
            raise ProtocolError(f"remaining export info len {len(data) - 2} is unexpected size")
        _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(data)
        _check_block_sizes(minimum, preferred, maximum)
        info.min_block, info.pref_block, info.max_block = minimum, preferred, maximum
    elif kind == Info.DESCRIPTION:
        info.description = data[2:].decode(errors="replace")
    return False  # NAME and unknown types are ignored, as the protocol asks


def _is_power_of_2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def _check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """The rules of the protocol's size constraints (texts as QEMU's)."""
    if not _is_power_of_2(minimum) or minimum > MAX_MIN_BLOCK:
        raise ProtocolError(f"server minimum block size {minimum} is not a power of two")
    if not _is_power_of_2(preferred):
        raise ProtocolError(f"server preferred block size {preferred} is not a power of two")
    if preferred < minimum:
        raise ProtocolError(
            f"server preferred block size {preferred} less than minimum block size {minimum}"
        )
    if maximum < preferred or maximum % minimum:
        raise ProtocolError(
            f"server maximum block size {maximum} is not a multiple of minimum block size "
            f"{minimum}, or less than preferred block size {preferred}"
        )


# --- the transmission phase ---------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Request:
    """One request in flight, and when finished, its result.

    ``buf`` receives a read's data (None: the data is dropped, the caller went away).
    ``error`` is the host errno of the first error the server reported (0: success) and
    ``message`` the server's text for it. A block status request collects
    ``extents``: ``(length, flags)`` pairs by meta context name (ids are per connection)."""

    cookie: int
    cmd: int
    offset: int
    length: int
    flags: int = 0
    buf: memoryview | None = None
    error: int = 0
    message: str = ""
    received: int = 0  #: bytes of a read that data or hole chunks answered
    extents: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def fail(self, err: int, message: str = "") -> None:
        if not self.error:
            self.error, self.message = err, message


# Reply header sizes by magic.
_HEADER_SIZE = {
    SIMPLE_REPLY_MAGIC: wire.SIMPLE_REPLY.size,
    STRUCTURED_REPLY_MAGIC: wire.STRUCTURED_REPLY.size,
    EXTENDED_REPLY_MAGIC: wire.EXTENDED_REPLY.size,
}
MIN_HEADER = wire.SIMPLE_REPLY.size
MAX_CHUNK_META = 14 + MAX_STRING  # the longest payload kept whole: an error chunk
MAX_STATUS_PAYLOAD = 8 + 16 * (1 << 20)  # 2^20 extended descriptors and their heading
STAGE_SIZE = 256 * 1024  # received bytes land here unless a read's data goes direct
DIRECT_MIN = 16 * 1024  # payload left at which the socket writes into the caller's buffer
_HEADER, _SIMPLE_DATA, _CHUNK_FIXED, _CHUNK_DATA, _CHUNK_PAYLOAD = range(5)
_MAX_COMPACT_LENGTH = 0xFFFFFFFF


class Transmission:
    """The transmission phase of one connection.

    :meth:`request` encodes a request; the bytes the server sends go in through
    :meth:`get_buffer`/:meth:`buffer_updated` (the shape of asyncio's BufferedProtocol, so
    a read's payload can land in the caller's buffer without a copy) or
    :meth:`receive_data`; :meth:`next_event` hands out finished requests.
    """

    def __init__(self, info: ExportInfo) -> None:
        self.info = info
        self.mode = info.mode
        self.pending: dict[int, Request] = {}
        self._context_names = {ctx_id: name for name, ctx_id in info.contexts.items()}
        self._next_cookie = 1
        self._done: deque[Request] = deque()
        self._stage = bytearray(STAGE_SIZE)
        self._view = memoryview(self._stage)
        self._start = self._end = 0  # unparsed bytes: _stage[_start:_end]
        # A header is read at its smallest size first, then completed once its magic says
        # which it is (structured replies may come with simple ones).
        self._min_header = wire.EXTENDED_REPLY.size if self.mode == Mode.EXTENDED else MIN_HEADER
        self._state = _HEADER
        self._need = self._min_header  # bytes the current state parses at once
        self._req: Request | None = None  # the request of the reply being parsed
        self._chunk = (0, 0, 0)  # flags, type, payload length of the current chunk
        self._target: memoryview | None = None  # where payload bytes go (None: dropped)
        self._left = 0  # payload bytes still to come for _target
        self._direct = False  # the last get_buffer() handed out _target

    # --- requests ---------------------------------------------------------------------------
    def request(
        self, cmd: int, offset: int, length: int, flags: int = 0, buf: memoryview | None = None
    ) -> tuple[Request, bytes]:
        """A new request and its header. A write's payload (``length`` bytes) is sent
        right after the header by the caller; a read's data goes into ``buf``.
        ``NBD_CMD_DISC`` gets no reply and is not kept."""
        if cmd == Cmd.READ and (buf is None or len(buf) != length):
            raise ValueError("a read needs a buffer of its length")
        cookie = self._next_cookie
        self._next_cookie += 1
        if self.mode == Mode.EXTENDED:
            if cmd == Cmd.WRITE:
                flags |= CmdFlag.PAYLOAD_LEN
            header = wire.EXTENDED_REQUEST.pack(
                EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length
            )
        else:
            if length > _MAX_COMPACT_LENGTH:
                raise ValueError("length needs extended headers")
            header = wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        req = Request(cookie, cmd, offset, length, flags, buf if cmd == Cmd.READ else None)
        if cmd != Cmd.DISC:
            self.pending[cookie] = req
        return req, header

    def abandon(self, req: Request) -> None:
        """The caller no longer wants ``req`` (cancelled): its data is dropped from now on
        instead of landing in a buffer the caller may reuse."""
        req.buf = None
        if self._req is req and self._target is not None and self._state != _HEADER:
            self._target = None

    # --- bytes in -------------------------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the server should be written."""
        self._direct = (
            self._target is not None and self._start == self._end and self._left >= DIRECT_MIN
        )
        if self._direct:
            assert self._target is not None
            return self._target[: self._left]
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._stage) > STAGE_SIZE:  # back to normal after a long status reply
                self._stage = bytearray(STAGE_SIZE)
                self._view = memoryview(self._stage)
        elif len(self._stage) - self._end < MAX_CHUNK_META:
            self._make_room(MAX_CHUNK_META)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer`'s memory."""
        if self._direct:
            self._direct = False
            self._target = self._target[nbytes:] if self._target is not None else None
            self._left -= nbytes
            if not self._left:
                self._payload_done()
        else:
            self._end += nbytes
        self._parse()

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the server (a convenience over get_buffer/buffer_updated)."""
        view = memoryview(data)
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def next_event(self) -> Request | NeedData:
        """The next finished request, or NEED_DATA."""
        return self._done.popleft() if self._done else NEED_DATA

    def _make_room(self, need: int) -> None:
        """Move the unparsed bytes to the front of the stage so that ``need`` bytes fit
        behind its start; a payload larger than the stage (a long block status reply) gets
        a larger stage (a new one: the old one may still be referenced by views)."""
        n = self._end - self._start
        if need + MAX_CHUNK_META > len(self._stage):
            stage = bytearray(need + MAX_CHUNK_META)
            stage[:n] = self._view[self._start : self._end]
            self._stage, self._view = stage, memoryview(stage)
        else:
            self._stage[:n] = self._stage[self._start : self._end]
        self._start, self._end = 0, n

    # --- parsing --------------------------------------------------------------------------
    def _parse(self) -> None:
        while True:
            avail = self._end - self._start
            if self._state in (_SIMPLE_DATA, _CHUNK_DATA):
                if not avail:
                    return
                n = min(avail, self._left)
                if self._target is not None:
                    self._target[:n] = self._view[self._start : self._start + n]
                    self._target = self._target[n:]
                self._start += n
                self._left -= n
                if not self._left:
                    self._payload_done()
                continue
            if avail < self._need:
                if self._need > len(self._stage) - self._start:
                    self._make_room(self._need)
                return
            data = self._view[self._start : self._start + self._need]
            self._start += self._need
            if self._state == _HEADER:
                self._header(data)
            elif self._state == _CHUNK_FIXED:
                self._data_offset(data)
            else:
                self._chunk_payload(bytes(data))

    def _expect(self, state: int, need: int) -> None:
        self._state, self._need = state, need

    def _header(self, data: memoryview) -> None:
        (magic,) = wire.U32.unpack_from(data)
        size = _HEADER_SIZE.get(magic)
        if size is None:
            raise ProtocolError(f"invalid magic {magic:#x} in reply")
        if (magic == EXTENDED_REPLY_MAGIC) != (self.mode == Mode.EXTENDED) or (
            magic == STRUCTURED_REPLY_MAGIC and self.mode == Mode.SIMPLE
        ):
            raise ProtocolError(f"reply magic {magic:#x} does not fit the negotiated headers")
        if len(data) < size:
            self._start -= len(data)  # parse the whole header at once
            self._need = size
            return
        if magic == SIMPLE_REPLY_MAGIC:
            _, err, cookie = wire.SIMPLE_REPLY.unpack(data)
            self._simple(cookie, err)
        elif magic == STRUCTURED_REPLY_MAGIC:
            _, flags, kind, cookie, length = wire.STRUCTURED_REPLY.unpack(data)
            self._chunk_header(cookie, flags, kind, length)
        else:
            _, flags, kind, cookie, _offset, length = wire.EXTENDED_REPLY.unpack(data)
            self._chunk_header(cookie, flags, kind, length)

    def _lookup(self, cookie: int) -> Request:
        req = self.pending.get(cookie)
        if req is None:
            raise ProtocolError(f"cookie {cookie:#x} in reply matches no request in flight")
        return req

    def _simple(self, cookie: int, err: int) -> None:
        req = self._req = self._lookup(cookie)
        if err:
            req.fail(errno_from_wire(err), "")
        elif req.cmd == Cmd.READ:
            if self.mode != Mode.SIMPLE:
                raise ProtocolError("simple reply with data to a read with structured replies")
            req.received = req.length
            self._start_payload(_SIMPLE_DATA, req.buf, req.length)
            return
        self._finish(req)

    def _chunk_header(self, cookie: int, flags: int, kind: int, length: int) -> None:
        req = self._req = self._lookup(cookie)
        self._chunk = (flags, kind, length)
        if kind == Chunk.OFFSET_DATA:
            if req.cmd != Cmd.READ or length <= wire.OFFSET.size:
                raise ProtocolError(f"invalid data chunk of length {length} for this request")
            self._expect(_CHUNK_FIXED, wire.OFFSET.size)
            return
        if kind == Chunk.NONE:
            if length or not flags & REPLY_FLAG_DONE:
                raise ProtocolError("invalid NBD_REPLY_TYPE_NONE chunk")
            self._chunk_done()
            return
        status = kind in (Chunk.BLOCK_STATUS, Chunk.BLOCK_STATUS_EXT)
        if length > (MAX_STATUS_PAYLOAD if status else MAX_CHUNK_META):
            raise ProtocolError(f"chunk of type {kind} too long ({length} bytes)")
        if length == 0:
            self._chunk_payload(b"")
        else:
            self._expect(_CHUNK_PAYLOAD, length)

    def _start_payload(self, state: int, target: memoryview | None, length: int) -> None:
        self._state, self._left = state, length
        self._target = target

    def _data_offset(self, data: memoryview) -> None:
        """The offset of a data chunk: check it, then let its bytes into the buffer."""
        req = self._req
        assert req is not None
        (offset,) = wire.OFFSET.unpack(data)
        size = self._chunk[2] - wire.OFFSET.size
        start = self._check_content(req, offset, size)
        target = None if req.buf is None else req.buf[start : start + size]
        self._start_payload(_CHUNK_DATA, target, size)

    def _check_content(self, req: Request, offset: int, size: int) -> int:
        """Where a data or hole chunk lies in ``req``'s buffer; it must lie inside."""
        start = offset - req.offset
        if start < 0 or start + size > req.length:
            raise ProtocolError(
                f"server sent chunk exceeding requested region ({offset:#x}+{size})"
            )
        req.received += size
        return start

    def _payload_done(self) -> None:
        self._target = None
        if self._state == _SIMPLE_DATA:
            assert self._req is not None
            self._finish(self._req)
            self._expect(_HEADER, self._min_header)
        else:
            self._chunk_done()

    def _chunk_payload(self, payload: bytes) -> None:
        req = self._req
        assert req is not None
        kind = self._chunk[1]
        if kind == Chunk.OFFSET_HOLE:
            self._hole(req, payload)
        elif kind in (Chunk.BLOCK_STATUS, Chunk.BLOCK_STATUS_EXT):
            self._status(req, kind, payload)
        elif kind & (1 << 15):
            self._error(req, kind, payload)
        else:
            raise ProtocolError(f"unexpected reply chunk type {kind}")
        self._chunk_done()

    def _hole(self, req: Request, payload: bytes) -> None:
        if req.cmd != Cmd.READ or len(payload) != wire.OFFSET_HOLE.size:
            raise ProtocolError("invalid NBD_REPLY_TYPE_OFFSET_HOLE chunk")
        offset, size = wire.OFFSET_HOLE.unpack(payload)
        if not size:
            raise ProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE chunk of size 0")
        start = self._check_content(req, offset, size)
        if req.buf is not None:
            req.buf[start : start + size] = bytes(size)

    def _status(self, req: Request, kind: int, payload: bytes) -> None:
        extended = kind == Chunk.BLOCK_STATUS_EXT
        if req.cmd != Cmd.BLOCK_STATUS or extended != (self.mode == Mode.EXTENDED):
            raise ProtocolError(f"unexpected block status chunk (type {kind})")
        if extended:
            desc, head = wire.BLOCK_DESCRIPTOR_EXT, wire.BLOCK_STATUS_EXT.size
        else:
            desc, head = wire.BLOCK_DESCRIPTOR, wire.BLOCK_STATUS.size
        count, rest = divmod(len(payload) - head, desc.size)
        if len(payload) < head + desc.size or rest:
            raise ProtocolError(f"invalid block status payload of {len(payload)} bytes")
        (ctx,) = wire.U32.unpack_from(payload)
        if extended and wire.BLOCK_STATUS_EXT.unpack_from(payload)[1] != count:
            raise ProtocolError("block status descriptor count does not match its length")
        name = self._context_names.get(ctx)
        if name is None:
            raise ProtocolError(f"block status for unknown meta context id {ctx}")
        if name in req.extents:
            raise ProtocolError(f"second block status chunk for meta context id {ctx}")
        extents = list(desc.iter_unpack(payload[head:]))
        if any(length == 0 for length, _ in extents):
            raise ProtocolError("block status descriptor of length 0")
        req.extents[name] = extents

    def _error(self, req: Request, kind: int, payload: bytes) -> None:
        """An error chunk (also unknown ones with bit 15 set, as the protocol asks)."""
        if len(payload) < wire.ERROR.size:
            raise ProtocolError(f"error chunk of type {kind} too short")
        err, msg_len = wire.ERROR.unpack_from(payload)
        fixed = wire.ERROR.size + (wire.ERROR_OFFSET.size if kind == Chunk.ERROR_OFFSET else 0)
        if msg_len > len(payload) - fixed or (
            kind == Chunk.ERROR_OFFSET and len(payload) != fixed + msg_len
        ):
            raise ProtocolError(f"error chunk of type {kind} with inconsistent lengths")
        if not err:
            raise ProtocolError("error chunk with error value 0")
        message = payload[wire.ERROR.size : wire.ERROR.size + msg_len].decode(errors="replace")
        if kind == Chunk.ERROR_OFFSET:
            (offset,) = wire.ERROR_OFFSET.unpack_from(payload, wire.ERROR.size + msg_len)
            if not req.offset <= offset < req.offset + max(req.length, 1):
                raise ProtocolError(f"error offset {offset:#x} outside the request")
        req.fail(errno_from_wire(err), message)

    def _chunk_done(self) -> None:
        self._expect(_HEADER, self._min_header)
        if self._chunk[0] & REPLY_FLAG_DONE and self._req is not None:
            self._finish(self._req)

    def _finish(self, req: Request) -> None:
        del self.pending[req.cookie]
        self._req = None
        if not req.error and req.cmd == Cmd.READ and req.received != req.length:
            req.fail(errno.EIO, f"server's reply covered {req.received} of {req.length} bytes")
        if not req.error and req.cmd == Cmd.BLOCK_STATUS and not req.extents:
            req.fail(errno.EIO, "server sent no block status")
        self._done.append(req)
