"""The NBD server's protocol engine: bytes in, events and bytes out, no I/O.

One engine per phase of a connection:

* :class:`Handshake`, the fixed newstyle negotiation. The caller feeds it what the socket
  delivered (:meth:`Handshake.receive_data`), sends what it wrote into :attr:`Handshake.out`
  and acts on the events of :meth:`Handshake.next_event`: :class:`StartTLS` (send ``out``,
  upgrade the stream, call :meth:`Handshake.tls_started`), :class:`Ready` (the transmission
  phase begins) or :class:`Closed` (send ``out``, hang up). Option payloads are parsed as
  they stream in, so a client announcing 32 MiB of option costs no more memory than one
  announcing 32 bytes.
* :class:`Transmission`, the request checks and reply encodings of the transmission phase.
  Its methods take a request's fields and return bytes (or pack into the caller's buffer),
  so the export's connection parses requests straight out of its receive buffer and sends
  replies around buffers the node filled, without an object per request.

The behaviour is QEMU's (``nbd/server.c``): the same options, the same order of checks, the
same error replies and texts, the same meta context ids. Where QEMU would crash or disconnect
for no protocol reason (trailing bytes after meta context queries, a failed read in the
middle of a structured reply), the client gets the protocol's error instead.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from qsd_py.nbd import wire
from qsd_py.nbd.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_BUFFER,
    MAX_STRING,
    META_BASE_ALLOCATION,
    META_QEMU_ALLOCATION_DEPTH,
    META_QEMU_DIRTY_BITMAP_PREFIX,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
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
    TransmissionFlag,
)

# Meta context ids, as QEMU numbers them: bitmaps come last, one id each from BITMAP.
META_ID_BASE_ALLOCATION = 0
META_ID_ALLOCATION_DEPTH = 1
META_ID_DIRTY_BITMAP = 2

#: Most extents in one block status chunk (1 MiB of descriptors, QEMU's bound).
MAX_BLOCK_STATUS_EXTENTS = (1 << 20) // 8

#: Preferred block size announced with NBD_INFO_BLOCK_SIZE (QEMU's fixed 4 KiB).
PREFERRED_BLOCK = 4096

_EXPORT_NAME_PADDING = bytes(wire.EXPORT_NAME_PADDING)
_SANE_NAME = 80  # longer names are cut in error messages


class Mode(enum.IntEnum):
    """What the client negotiated, in QEMU's order: each mode includes the ones before."""

    EXPORT_NAME = 1  # newstyle without the fixed bit: NBD_OPT_EXPORT_NAME only
    SIMPLE = 2  # fixed newstyle, simple replies
    STRUCTURED = 3  # structured replies
    EXTENDED = 4  # extended headers (64-bit lengths; implies structured replies)


_OPT_NAMES = {
    Opt.EXPORT_NAME: "export name",
    Opt.ABORT: "abort",
    Opt.LIST: "list",
    Opt.STARTTLS: "starttls",
    Opt.INFO: "info",
    Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply",
    Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
    Opt.EXTENDED_HEADERS: "extended headers",
}

_CMD_NAMES = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.DISC: "disconnect",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.CACHE: "cache",
    Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}


def opt_name(opt: int) -> str:
    """QEMU's name of an option, as its error messages spell it."""
    return _OPT_NAMES.get(opt, "<unknown>")  # type: ignore[call-overload]


def cmd_name(cmd: int) -> str:
    """QEMU's name of a command, as its error messages spell it."""
    return _CMD_NAMES.get(cmd, "<unknown>")  # type: ignore[call-overload]


_ERRNO_TO_NBD = {
    0: 0,
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(err: int) -> int:
    """The wire error for a host errno: the protocol allows only a few, the rest is EINVAL."""
    return int(_ERRNO_TO_NBD.get(err, Errno.EINVAL))


# --- what the engine needs to know about exports ----------------------------------------------


class ExportView(Protocol):
    """What a client can learn about an export (the export object itself provides it)."""

    name: str
    description: str | None
    size: int  #: bytes, a multiple of 512 as QEMU announces it
    flags: int  #: transmission flags (DF and BLOCK_STAT_PAYLOAD are the engine's to add)
    min_block: int  #: request alignment the node needs
    max_block: int  #: largest request the node takes (the engine caps it at 32 MiB)
    allocation_depth: bool  #: offer ``qemu:allocation-depth``
    bitmaps: Sequence[str]  #: names of the dirty bitmaps offered as ``qemu:dirty-bitmap:``


class ExportCatalog(Protocol):
    """The exports of a server, for NBD_OPT_LIST and for lookups by name."""

    def find(self, name: str) -> ExportView | None: ...

    def listing(self) -> Iterable[ExportView]: ...


@dataclass
class MetaContexts:
    """The meta contexts selected for one export (NBD_OPT_SET_META_CONTEXT)."""

    export: ExportView | None = None
    base_allocation: bool = False
    allocation_depth: bool = False
    bitmaps: list[bool] = field(default_factory=list)
    count: int = 0  #: how many were acknowledged (0: none usable)

    def ids(self) -> tuple[int, ...]:
        """The selected contexts' ids, in the order block status replies come."""
        if not self.count:
            return ()
        ids = []
        if self.base_allocation:
            ids.append(META_ID_BASE_ALLOCATION)
        if self.allocation_depth:
            ids.append(META_ID_ALLOCATION_DEPTH)
        ids.extend(META_ID_DIRTY_BITMAP + i for i, on in enumerate(self.bitmaps) if on)
        return tuple(ids)


# --- handshake events -----------------------------------------------------------------------


@dataclass
class StartTLS:
    """The client asked for TLS and got its ACK: send :attr:`Handshake.out`, run the TLS
    handshake on the stream (feeding it :meth:`Handshake.take_unread` first), then call
    :meth:`Handshake.tls_started` and go on feeding decrypted bytes."""


@dataclass
class Ready:
    """Negotiation succeeded: serve ``export`` in the transmission phase."""

    export: ExportView
    transmission: Transmission


@dataclass
class Closed:
    """Negotiation is over without an export: send what is in ``out`` and close.
    ``error`` is None for a clean end (NBD_OPT_ABORT), else why (for the log)."""

    error: str | None


Event = StartTLS | Ready | Closed


class _Want(NamedTuple):
    """What a negotiation step waits for: ``n`` bytes, to keep or to throw away."""

    n: int
    skip: bool = False


_NegotiationSteps = Generator[_Want, bytes | None, None]
# An option handler: yields what it needs; returns True when negotiation ended, else False.
_OptionSteps = Generator[_Want, bytes | None, bool]
# A payload read: yields what it needs; returns the bytes, or None when the option is answered.
_ReadSteps = Generator[_Want, bytes | None, bytes | None]


class Handshake:
    """The server side of a fixed newstyle negotiation, as QEMU's server conducts it.

    ``tls``: the server has TLS credentials, so every option but STARTTLS is refused until
    the stream is encrypted (``NBD_REP_ERR_TLS_REQD``).
    """

    def __init__(self, exports: ExportCatalog, tls: bool = False) -> None:
        self.exports = exports
        self.tls = tls
        self.tls_active = False
        self.out = bytearray(
            wire.SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        )
        self.finished = False
        self.aborted = False  # ended by NBD_OPT_ABORT: the client may not read our reply
        self.mode = Mode.EXPORT_NAME
        self.fixed = False
        self.no_zeroes = False
        self.contexts = MetaContexts()
        self.opt = 0  # the option being answered
        self.optlen = 0  # its payload bytes not read yet
        self._events: deque[Event] = deque()
        self._in = bytearray()
        self._paused = False
        self._steps = self._negotiate()
        self._want = next(self._steps)

    # --- the caller's side ------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client. Once :attr:`finished` (or while TLS is being set up),
        bytes are kept for :meth:`take_unread` instead of being parsed."""
        self._in += data
        self._run()

    def next_event(self) -> Event | None:
        """The next event, or None until more data arrives."""
        return self._events.popleft() if self._events else None

    def take_unread(self) -> bytes:
        """Bytes received but not parsed: the start of a TLS handshake after
        :class:`StartTLS`, pipelined requests after :class:`Ready`."""
        data = bytes(self._in)
        self._in.clear()
        return data

    def tls_started(self) -> None:
        """The stream is encrypted now: negotiation goes on."""
        self.tls_active = True
        self._paused = False
        self._run()

    def _run(self) -> None:
        while not self.finished and not self._paused:
            want = self._want
            value: bytes | None = None
            if want.skip:
                take = min(want.n, len(self._in))
                del self._in[:take]
                if take < want.n:
                    self._want = _Want(want.n - take, True)
                    return
            else:
                if len(self._in) < want.n:
                    return
                value = bytes(self._in[: want.n])
                del self._in[: want.n]
            try:
                self._want = self._steps.send(value)
            except StopIteration:
                self.finished = True

    # --- replies -----------------------------------------------------------------------------
    def _reply(self, rep: int, payload: bytes = b"") -> None:
        self.out += wire.OPTION_REPLY.pack(OPT_REPLY_MAGIC, self.opt, rep, len(payload))
        self.out += payload

    def _reply_error(self, rep: int, message: str) -> None:
        self._reply(rep, message.encode("utf-8", "surrogateescape"))

    def _end(self, event: Ready | Closed) -> None:
        self.aborted = isinstance(event, Closed) and event.error is None
        self._events.append(event)

    def _fail(self, message: str) -> bool:
        """A fatal negotiation error: QEMU logs it and closes without another reply."""
        self._end(Closed(f"option negotiation failed: {message}"))
        return True

    # --- reading the option's payload ----------------------------------------------------------
    def _drop(self, rep: int, message: str) -> Generator[_Want, bytes | None, None]:
        """Throw away the rest of the option, then answer it with an error."""
        if self.optlen:
            yield _Want(self.optlen, True)
            self.optlen = 0
        self._reply_error(rep, message)

    def _invalid(self, message: str) -> Generator[_Want, bytes | None, None]:
        yield from self._drop(Rep.ERR_INVALID, message)

    def _read(self, n: int, check_nul: bool = False) -> _ReadSteps:
        """``n`` bytes of the option's payload, or None (the option was answered) when the
        payload is shorter or, with ``check_nul``, holds a NUL."""
        if n > self.optlen:
            yield from self._invalid(f"Inconsistent lengths in option {opt_name(self.opt)}")
            return None
        self.optlen -= n
        data = b"" if n == 0 else (yield _Want(n))
        assert data is not None
        if check_nul and b"\0" in data:
            yield from self._invalid(f"Unexpected embedded NUL in option {opt_name(self.opt)}")
            return None
        return data

    def _read_name(self) -> _ReadSteps:
        """A 32-bit length and that many bytes (an export name), QEMU's bounds."""
        raw = yield from self._read(4)
        if raw is None:
            return None
        (length,) = wire.U32.unpack(raw)
        if length > MAX_STRING:
            yield from self._invalid(f"Invalid name length: {length}")
            return None
        return (yield from self._read(length, check_nul=True))

    def _reject_length(self, fatal: bool) -> _OptionSteps:
        """An option that takes no payload came with one."""
        message = f"option '{opt_name(self.opt)}' has unexpected length"
        yield from self._invalid(message)
        return self._fail(message) if fatal else False

    # --- negotiation ---------------------------------------------------------------------------
    def _negotiate(self) -> _NegotiationSteps:
        raw = yield _Want(wire.CLIENT_FLAGS.size)
        assert raw is not None
        (flags,) = wire.CLIENT_FLAGS.unpack(raw)
        if flags & FLAG_C_FIXED_NEWSTYLE:
            self.fixed = True
            self.mode = Mode.SIMPLE
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        unknown = flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if unknown:
            self._fail(f"Unknown client flags 0x{unknown:x} received")
            return
        while True:
            raw = yield _Want(wire.OPTION.size)
            assert raw is not None
            magic, self.opt, self.optlen = wire.OPTION.unpack(raw)
            if magic != IHAVEOPT:
                self._fail("Bad magic received")
                return
            if self.optlen > MAX_BUFFER:
                self._fail(f"len ({self.optlen}) is larger than max len ({MAX_BUFFER})")
                return
            if self.tls and not self.tls_active:
                done = yield from self._option_before_tls()
            elif self.fixed:
                done = yield from self._option()
            elif self.opt == Opt.EXPORT_NAME:
                done = yield from self._export_name()
            else:
                done = self._fail(f"Unsupported option {self.opt} ({opt_name(self.opt)})")
            if done:
                return

    def _option_before_tls(self) -> _OptionSteps:
        opt = self.opt
        if not self.fixed:
            return self._fail(f"Unsupported option 0x{opt:x}")
        if opt == Opt.STARTTLS:
            if self.optlen:
                return (yield from self._reject_length(fatal=True))
            self._reply(Rep.ACK)
            self._paused = True
            self._events.append(StartTLS())
            return False
        if opt == Opt.EXPORT_NAME:
            return self._fail(f"Option 0x{opt:x} not permitted before TLS")
        yield from self._drop(Rep.ERR_TLS_REQD, f"Option 0x{opt:x} not permitted before TLS")
        if opt == Opt.ABORT:
            self._end(Closed(None))
            return True
        return False

    def _option(self) -> _OptionSteps:
        opt = self.opt
        if opt == Opt.LIST:
            if self.optlen:
                return (yield from self._reject_length(fatal=False))
            self._list()
            return False
        if opt == Opt.ABORT:
            self._reply(Rep.ACK)
            self._end(Closed(None))
            return True
        if opt == Opt.EXPORT_NAME:
            return (yield from self._export_name())
        if opt in (Opt.INFO, Opt.GO):
            return (yield from self._info())
        if opt == Opt.STARTTLS:
            if self.optlen:
                return (yield from self._reject_length(fatal=False))
            if self.tls:
                self._reply_error(Rep.ERR_INVALID, "TLS already enabled")
            else:
                self._reply_error(Rep.ERR_POLICY, "TLS not configured")
            return False
        if opt == Opt.STRUCTURED_REPLY:
            if self.optlen:
                return (yield from self._reject_length(fatal=False))
            if self.mode >= Mode.EXTENDED:
                self._reply_error(Rep.ERR_EXT_HEADER_REQD, "extended headers already negotiated")
            elif self.mode >= Mode.STRUCTURED:
                self._reply_error(Rep.ERR_INVALID, "structured reply already negotiated")
            else:
                self._reply(Rep.ACK)
                self.mode = Mode.STRUCTURED
            return False
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            yield from self._meta_contexts()
            return False
        if opt == Opt.EXTENDED_HEADERS:
            if self.optlen:
                return (yield from self._reject_length(fatal=False))
            if self.mode >= Mode.EXTENDED:
                self._reply_error(Rep.ERR_INVALID, "extended headers already negotiated")
            else:
                self._reply(Rep.ACK)
                self.mode = Mode.EXTENDED
            return False
        yield from self._drop(Rep.ERR_UNSUP, f"Unsupported option {opt} ({opt_name(opt)})")
        return False

    def _list(self) -> None:
        for export in self.exports.listing():
            name = export.name.encode()
            desc = (export.description or "").encode()
            self._reply(Rep.SERVER, wire.U32.pack(len(name)) + name + desc)
        self._reply(Rep.ACK)

    def _export_flags(self, export: ExportView, info: bool = False) -> int:
        flags = export.flags
        if self.mode >= Mode.STRUCTURED:
            flags |= TransmissionFlag.SEND_DF
        if self.mode >= Mode.EXTENDED and (self.contexts.count or info):
            flags |= TransmissionFlag.BLOCK_STAT_PAYLOAD
        return flags

    def _begin(self, export: ExportView, check_align: int) -> bool:
        if self.contexts.export is not export:
            self.contexts.count = 0  # contexts chosen for another export do not carry over
        transmission = Transmission(export, self.mode, self.contexts, check_align)
        self._end(Ready(export, transmission))
        return True

    def _export_name(self) -> _OptionSteps:
        """NBD_OPT_EXPORT_NAME: no way to answer an error, so failures close."""
        if self.mode >= Mode.EXTENDED:
            return self._fail("Extended headers already negotiated")
        if self.optlen > MAX_STRING:
            return self._fail("Bad length received")
        raw = b""
        if self.optlen:
            raw = yield _Want(self.optlen)
            assert raw is not None
        self.optlen = 0
        name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        export = self.exports.find(name)
        if export is None:
            return self._fail("export not found")
        self.out += wire.EXPORT_NAME_REPLY.pack(export.size, self._export_flags(export))
        if not self.no_zeroes:
            self.out += _EXPORT_NAME_PADDING
        return self._begin(export, 0)

    def _info(self) -> _OptionSteps:
        """NBD_OPT_INFO and NBD_OPT_GO: what QEMU sends, in QEMU's order."""
        raw_name = yield from self._read_name()
        if raw_name is None:
            return False
        raw = yield from self._read(2)
        if raw is None:
            return False
        (count,) = wire.U16.unpack(raw)
        want_name = want_block_size = False
        for _ in range(count):
            raw = yield from self._read(2)
            if raw is None:
                return False
            (request,) = wire.U16.unpack(raw)
            want_name |= request == Info.NAME
            want_block_size |= request == Info.BLOCK_SIZE
        if self.optlen:
            return (yield from self._reject_length(fatal=False))
        name = raw_name.decode("utf-8", "surrogateescape")
        export = self.exports.find(name)
        if export is None:
            self._reply_error(Rep.ERR_UNKNOWN, f"export '{_sanitize(raw_name)}' not present")
            return False
        go = self.opt == Opt.GO
        if go and self.contexts.export is not export:
            self.contexts.count = 0
        if want_name:
            self._reply(Rep.INFO, wire.INFO_TYPE.pack(Info.NAME) + raw_name)
        if export.description:
            desc = export.description.encode()
            self._reply(Rep.INFO, wire.INFO_TYPE.pack(Info.DESCRIPTION) + desc)
        check_align = 0
        minimum = 1
        if not go or want_block_size:
            check_align = minimum = export.min_block
        sizes = (minimum, max(PREFERRED_BLOCK, minimum), min(export.max_block, MAX_BUFFER))
        self._reply(Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, *sizes))
        flags = self._export_flags(export, info=not go)
        self._reply(Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if not go and not want_block_size and export.min_block > 1:
            self._reply_error(
                Rep.ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export"
            )
            return False
        self._reply(Rep.ACK)
        if go:
            return self._begin(export, check_align)
        return False

    def _meta_contexts(self) -> Generator[_Want, bytes | None, None]:
        """NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""
        setting = self.opt == Opt.SET_META_CONTEXT
        if setting and self.mode < Mode.STRUCTURED:
            yield from self._invalid(
                f"request option '{opt_name(self.opt)}' when structured reply is not negotiated"
            )
            return
        meta = MetaContexts()
        if setting:
            self.contexts = meta  # a SET forgets earlier choices even when it fails
        raw_name = yield from self._read_name()
        if raw_name is None:
            return
        export = self.exports.find(raw_name.decode("utf-8", "surrogateescape"))
        if export is None:
            yield from self._drop(Rep.ERR_UNKNOWN, f"export '{_sanitize(raw_name)}' not present")
            return
        meta.export = export
        meta.bitmaps = [False] * len(export.bitmaps)
        raw = yield from self._read(4)
        if raw is None:
            return
        (queries,) = wire.U32.unpack(raw)
        if not setting and queries == 0:
            _select_all(meta, export)
        for _ in range(queries):
            if not (yield from self._meta_query(meta, export, setting)):
                return
        if self.optlen:
            # QEMU trips over trailing bytes here; the protocol's answer is an error.
            yield from self._reject_length(fatal=False)
            return
        names = _context_names(meta, export)
        for context_id, name in names:
            payload = wire.META_CONTEXT_ID.pack(context_id if setting else 0) + name.encode()
            self._reply(Rep.META_CONTEXT, payload)
        self._reply(Rep.ACK)
        meta.count = len(names)

    def _meta_query(
        self, meta: MetaContexts, export: ExportView, setting: bool
    ) -> Generator[_Want, bytes | None, bool]:
        """One query: False when the option was answered with an error."""
        raw = yield from self._read(4)
        if raw is None:
            return False
        (length,) = wire.U32.unpack(raw)
        if length > MAX_STRING:  # too long to be ours: skipped, not refused
            if length > self.optlen:
                yield from self._invalid(f"Inconsistent lengths in option {opt_name(self.opt)}")
                return False
            self.optlen -= length
            if length:
                yield _Want(length, True)
            return True
        raw = yield from self._read(length, check_nul=True)
        if raw is None:
            return False
        _match_query(meta, export, raw.decode("utf-8", "surrogateescape"), listing=not setting)
        return True


def _sanitize(raw_name: bytes) -> str:
    """An export name for an error message: at most 80 bytes, then "..."."""
    name = raw_name
    if len(name) >= _SANE_NAME:
        name = name[:_SANE_NAME]
        return name.decode("utf-8", "surrogateescape") + "..."
    return name.decode("utf-8", "surrogateescape")


def _select_all(meta: MetaContexts, export: ExportView) -> None:
    meta.base_allocation = True
    meta.allocation_depth = export.allocation_depth
    meta.bitmaps = [True] * len(export.bitmaps)


def _match_query(meta: MetaContexts, export: ExportView, query: str, listing: bool) -> None:
    """Select what ``query`` names. A LIST query may be a bare namespace (``base:``,
    ``qemu:``, ``qemu:dirty-bitmap:``): all of that namespace. Unknown names select nothing."""
    if query.startswith("base:"):
        rest = query[len("base:") :]
        if rest == "allocation" or (not rest and listing):
            meta.base_allocation = True
        return
    if not query.startswith("qemu:"):
        return
    rest = query[len("qemu:") :]
    if not rest:
        if listing:
            meta.allocation_depth = export.allocation_depth
            meta.bitmaps = [True] * len(export.bitmaps)
        return
    if rest == "allocation-depth":
        meta.allocation_depth = export.allocation_depth
        return
    if rest.startswith("dirty-bitmap:"):
        wanted = rest[len("dirty-bitmap:") :]
        if not wanted:
            if listing:
                meta.bitmaps = [True] * len(export.bitmaps)
            return
        for i, name in enumerate(export.bitmaps):
            if name == wanted:
                meta.bitmaps[i] = True
                return


def _context_names(meta: MetaContexts, export: ExportView) -> list[tuple[int, str]]:
    names = []
    if meta.base_allocation:
        names.append((META_ID_BASE_ALLOCATION, META_BASE_ALLOCATION))
    if meta.allocation_depth:
        names.append((META_ID_ALLOCATION_DEPTH, META_QEMU_ALLOCATION_DEPTH))
    for i, name in enumerate(export.bitmaps):
        if meta.bitmaps[i]:
            names.append((META_ID_DIRTY_BITMAP + i, META_QEMU_DIRTY_BITMAP_PREFIX + name))
    return names


# --- transmission ----------------------------------------------------------------------------

# Reply headers with the 8-byte offset of a data chunk appended: one pack per read reply.
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # structured reply header + offset (28 bytes)
_DATA_CHUNK_EXT = struct.Struct(">IHHQQQQ")  # extended reply header + offset (40 bytes)

_WRITE_LIKE = (Cmd.WRITE, Cmd.WRITE_ZEROES)
_CHANGES_DATA = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
# Plain ints for the per-request code: an enum member lookup (``Cmd.READ``) costs a Python
# call (~150 ns), a flag operator on an enum member another.
_FUA, _PAYLOAD_LEN = int(CmdFlag.FUA), int(CmdFlag.PAYLOAD_LEN)
_READ, _WRITE, _CACHE, _BLOCK_STATUS = (
    int(Cmd.READ),
    int(Cmd.WRITE),
    int(Cmd.CACHE),
    int(Cmd.BLOCK_STATUS),
)
_SIZED = (_READ, _WRITE, _CACHE)
_OFFSET_DATA, _NONE = int(Chunk.OFFSET_DATA), int(Chunk.NONE)


class RequestError(NamedTuple):
    """Why a request is refused: the host errno (see :func:`nbd_errno`) and QEMU's text."""

    errno: int
    message: str


class BlockStatusPayload(NamedTuple):
    """A BLOCK_STATUS request's payload (extended headers): the length to report on and
    the contexts asked for; ``contexts`` is empty when the payload was not valid."""

    length: int
    contexts: tuple[int, ...]


class Transmission:
    """The transmission phase of one connection: request checks and reply encodings.

    A request is its header's fields: ``flags``, ``cmd``, ``cookie``, ``offset``,
    ``length`` (:meth:`parse_header`). Reply methods return the bytes to send; for reads,
    :meth:`pack_read_header` writes the header in front of the data in the caller's buffer.
    """

    __slots__ = (
        "export",
        "mode",
        "structured",
        "extended",
        "size",
        "read_only",
        "contexts",
        "check_align",
        "header",
        "header_size",
        "request_magic",
        "read_header_size",
        "_valid_flags",
    )

    def __init__(
        self, export: ExportView, mode: Mode, contexts: MetaContexts, check_align: int = 0
    ) -> None:
        self.export = export
        self.mode = mode
        self.structured = mode >= Mode.STRUCTURED
        self.extended = mode >= Mode.EXTENDED
        self.size = export.size
        self.read_only = bool(export.flags & TransmissionFlag.READ_ONLY)
        self.contexts = contexts.ids() if contexts.export is export else ()
        self.check_align = check_align
        self.header = wire.EXTENDED_REQUEST if self.extended else wire.REQUEST
        self.header_size = self.header.size
        self.request_magic = EXTENDED_REQUEST_MAGIC if self.extended else REQUEST_MAGIC
        if self.extended:
            self.read_header_size = _DATA_CHUNK_EXT.size
        elif self.structured:
            self.read_header_size = _DATA_CHUNK.size
        else:
            self.read_header_size = wire.SIMPLE_REPLY.size
        fua = int(CmdFlag.FUA)  # plain ints: enum flag operators cost a Python call each
        self._valid_flags: dict[int, int] = {
            Cmd.READ: fua | (CmdFlag.DF if self.structured else 0),
            Cmd.WRITE: fua | (CmdFlag.PAYLOAD_LEN if self.extended else 0),
            Cmd.FLUSH: fua,
            Cmd.TRIM: fua,
            Cmd.CACHE: fua,
            Cmd.WRITE_ZEROES: fua | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
            Cmd.BLOCK_STATUS: fua | CmdFlag.REQ_ONE | (CmdFlag.PAYLOAD_LEN if self.extended else 0),
        }
        for cmd, valid in self._valid_flags.items():
            self._valid_flags[cmd] = int(valid)

    # --- requests ------------------------------------------------------------------------------
    def parse_header(self, buf: Buffer, pos: int = 0) -> tuple[int, int, int, int, int] | None:
        """``(flags, cmd, cookie, offset, length)`` of the request at ``buf[pos:]``, or None
        when its magic is wrong (the stream is lost: close the connection)."""
        magic, flags, cmd, cookie, offset, length = self.header.unpack_from(buf, pos)
        if magic != self.request_magic:
            return None
        return flags, cmd, cookie, offset, length

    def payload_length(self, flags: int, cmd: int, length: int) -> int:
        """How many payload bytes follow the header: a WRITE's data, or with extended
        headers any command's announced payload (read and thrown away, or a BLOCK_STATUS
        payload)."""
        if cmd == _WRITE or (self.extended and flags & _PAYLOAD_LEN):
            return length
        return 0

    def check_length(self, flags: int, cmd: int, length: int) -> RequestError | None:
        """QEMU's first check, before any payload is read: READ, WRITE, CACHE and payloads
        are at most 32 MiB. A WRITE (or payload) failing it cannot be followed: reply,
        then close the connection."""
        sized = cmd in _SIZED
        if (sized or self.payload_length(flags, cmd, length)) and length > MAX_BUFFER:
            return RequestError(
                errno.EINVAL, f"len ({length}) is larger than max len ({MAX_BUFFER})"
            )
        return None

    def check(self, flags: int, cmd: int, offset: int, length: int) -> RequestError | None:
        """QEMU's checks after the payload was read, in QEMU's order: read-only export,
        range past the end, flags the command does not take. ``length`` is the length the
        command acts on (0 for a dropped payload; a BLOCK_STATUS payload's own length)."""
        if self.read_only and cmd in _CHANGES_DATA:
            return RequestError(errno.EROFS, "Export is read-only")
        size = self.size
        if offset > size or length > size - offset:
            err = errno.ENOSPC if cmd in _WRITE_LIKE else errno.EINVAL
            return RequestError(
                err, f"operation past EOF; From: {offset}, Len: {length}, Size: {size}"
            )
        valid = self._valid_flags.get(cmd, _FUA)
        if flags & ~valid:
            return RequestError(
                errno.EINVAL, f"unsupported flags for command {cmd_name(cmd)} (got 0x{flags:x})"
            )
        return None

    def plain(self, flags: int, cmd: int, offset: int, length: int) -> bool:
        """Whether a READ or WRITE of ``length`` > 0 bytes passes :meth:`check_length` and
        :meth:`check` with nothing to say (no flag, in range, data allowed): one call
        instead of two for the requests that make up a client's stream (fio's and
        nbdcopy's all are); anything else takes those checks."""
        return (
            not flags
            and length <= MAX_BUFFER
            and offset + length <= self.size
            and (cmd == _READ or (cmd == _WRITE and not self.read_only))
        )

    def parse_block_status_payload(self, payload: Buffer) -> BlockStatusPayload:
        """A BLOCK_STATUS payload (extended headers): an 8-byte length, then the ids of some
        of the negotiated contexts, each at most once; anything else is not valid."""
        negotiated = self.contexts
        size = len(payload)
        if size % 4 or size < 8 or size > 8 + 4 * len(negotiated):
            return BlockStatusPayload(0, ())
        (length,) = wire.OFFSET.unpack_from(payload, 0)
        count = (size - 8) // 4
        ids = struct.unpack_from(f">{count}I", payload, 8)
        if len(set(ids)) != count or not set(ids) <= set(negotiated):
            return BlockStatusPayload(0, ())
        return BlockStatusPayload(length, tuple(i for i in negotiated if i in ids))

    # --- replies ---------------------------------------------------------------------------------
    def _chunk(self, flags: int, kind: int, cookie: int, offset: int, payload: bytes) -> bytes:
        if self.extended:
            head = wire.EXTENDED_REPLY.pack(
                EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, len(payload)
            )
        else:
            head = wire.STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)
            )
        return head + payload

    def reply_ok(self, cookie: int, offset: int) -> bytes:
        """Success without data: a simple reply, or with extended headers a final NONE chunk."""
        if self.extended:
            return wire.EXTENDED_REPLY.pack(
                EXTENDED_REPLY_MAGIC, REPLY_FLAG_DONE, _NONE, cookie, offset, 0
            )
        return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_done(self, cookie: int, offset: int) -> bytes:
        """The final NONE chunk (a structured read of 0 bytes); simple replies: success."""
        if not self.structured:
            return self.reply_ok(cookie, offset)
        return self._chunk(REPLY_FLAG_DONE, Chunk.NONE, cookie, offset, b"")

    def reply_error(self, cookie: int, offset: int, err: int, message: str) -> bytes:
        """A failed request: a simple reply with the error, or an ERROR chunk with the text."""
        code = nbd_errno(err)
        if not self.structured:
            return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, cookie)
        text = message.encode("utf-8", "replace")[:MAX_STRING]
        payload = wire.ERROR.pack(code, len(text)) + text
        return self._chunk(REPLY_FLAG_DONE, Chunk.ERROR, cookie, offset, payload)

    def pack_read_header(
        self,
        buf: bytearray | memoryview,
        cookie: int,
        offset: int,
        chunk_offset: int,
        length: int,
        final: bool = True,
        pos: int = 0,
    ) -> int:
        """Write the header of a read reply carrying ``length`` bytes of data from
        ``chunk_offset`` (simple reply, or OFFSET_DATA chunk) at ``buf[pos:]``; returns its
        size (:attr:`read_header_size`): the data goes right after it."""
        flags = REPLY_FLAG_DONE if final else 0
        if self.extended:
            _DATA_CHUNK_EXT.pack_into(
                buf,
                pos,
                EXTENDED_REPLY_MAGIC,
                flags,
                _OFFSET_DATA,
                cookie,
                offset,
                length + 8,
                chunk_offset,
            )
        elif self.structured:
            _DATA_CHUNK.pack_into(
                buf,
                pos,
                STRUCTURED_REPLY_MAGIC,
                flags,
                _OFFSET_DATA,
                cookie,
                length + 8,
                chunk_offset,
            )
        else:
            wire.SIMPLE_REPLY.pack_into(buf, pos, SIMPLE_REPLY_MAGIC, 0, cookie)
        return self.read_header_size

    def data_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The header of a READ's whole reply, ``length`` bytes from ``offset`` in one final
        chunk (or a simple reply): :meth:`pack_read_header`'s bytes, in one ``pack`` for
        the requests every client sends most."""
        if self.extended:
            return _DATA_CHUNK_EXT.pack(
                EXTENDED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                _OFFSET_DATA,
                cookie,
                offset,
                length + 8,
                offset,
            )
        if self.structured:
            return _DATA_CHUNK.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, _OFFSET_DATA, cookie, length + 8, offset
            )
        return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def read_header(
        self, cookie: int, offset: int, chunk_offset: int, length: int, final: bool = True
    ) -> bytearray:
        """The header of a read reply as bytes (see :meth:`pack_read_header`)."""
        buf = bytearray(self.read_header_size)
        self.pack_read_header(buf, cookie, offset, chunk_offset, length, final)
        return buf

    def hole_chunk(
        self, cookie: int, offset: int, chunk_offset: int, length: int, final: bool
    ) -> bytes:
        """An OFFSET_HOLE chunk: ``length`` bytes from ``chunk_offset`` read as zeroes."""
        flags = REPLY_FLAG_DONE if final else 0
        payload = wire.OFFSET_HOLE.pack(chunk_offset, length)
        return self._chunk(flags, Chunk.OFFSET_HOLE, cookie, offset, payload)

    def block_status_chunk(
        self,
        cookie: int,
        offset: int,
        context_id: int,
        extents: Sequence[tuple[int, int]],
        final: bool,
    ) -> bytes:
        """A BLOCK_STATUS (or, with extended headers, BLOCK_STATUS_EXT) chunk of
        ``(length, flags)`` extents for one context."""
        flags = REPLY_FLAG_DONE if final else 0
        flat = [value for extent in extents for value in extent]
        if self.extended:
            payload = wire.BLOCK_STATUS_EXT.pack(context_id, len(extents))
            payload += struct.pack(f">{len(flat)}Q", *flat)
            kind = Chunk.BLOCK_STATUS_EXT
        else:
            payload = wire.BLOCK_STATUS.pack(context_id) + struct.pack(f">{len(flat)}I", *flat)
            kind = Chunk.BLOCK_STATUS
        return self._chunk(flags, kind, cookie, offset, payload)

    def new_extents(self, req_one: bool) -> Extents:
        """An extent list sized as QEMU sizes it for this connection and request."""
        limit = 1 if req_one else MAX_BLOCK_STATUS_EXTENTS
        return Extents(limit, wide=self.extended)


Buffer = bytes | bytearray | memoryview


class Extents:
    """Block status extents as they are sent: neighbours with equal flags merged (within
    32 bits without extended headers), at most ``limit`` of them. :meth:`add` returns False
    once an extent no longer fits: the reply then covers less than was asked, as the
    protocol allows."""

    __slots__ = ("limit", "wide", "items", "total")

    def __init__(self, limit: int, wide: bool) -> None:
        self.limit = limit
        self.wide = wide
        self.items: list[list[int]] = []
        self.total = 0

    def add(self, length: int, flags: int) -> bool:
        if not length:
            return True
        items = self.items
        if items and items[-1][1] == flags:
            merged = items[-1][0] + length
            if self.wide or merged <= 0xFFFFFFFF:
                items[-1][0] = merged
                self.total += length
                return True
        if len(items) >= self.limit:
            return False
        items.append([length, flags])
        self.total += length
        return True

    def pairs(self) -> list[tuple[int, int]]:
        return [(length, flags) for length, flags in self.items]
