"""NBD wire constants, as the NBD protocol document (doc/proto.md) defines them.

Names follow the document's, without the ``NBD_`` prefix; enums group the numbers that share
a field so a reader (or a log line) can name a value.
"""

from __future__ import annotations

import enum

# Magic numbers of the handshake and of the transmission phase.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation (not served; clients may meet it)
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Handshake flags (server, 16 bits) and client flags (32 bits).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = FLAG_FIXED_NEWSTYLE
FLAG_C_NO_ZEROES = FLAG_NO_ZEROES

# Limits the document sets or recommends.
MAX_STRING = 4096  # names, descriptions, meta context queries
MAX_OPTION_LENGTH = 1 << 20  # a server may refuse longer option payloads
MAX_BUFFER = 32 << 20  # largest read/write payload QEMU and libnbd use
EXPORT_NAME_MAX = 4096


class Opt(enum.IntEnum):
    """Option codes of the handshake phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_FLAG_ERROR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; the ``ERR_`` ones have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_FLAG_ERROR | 1
    ERR_POLICY = REP_FLAG_ERROR | 2
    ERR_INVALID = REP_FLAG_ERROR | 3
    ERR_PLATFORM = REP_FLAG_ERROR | 4
    ERR_TLS_REQD = REP_FLAG_ERROR | 5
    ERR_UNKNOWN = REP_FLAG_ERROR | 6
    ERR_SHUTDOWN = REP_FLAG_ERROR | 7
    ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
    ERR_TOO_BIG = REP_FLAG_ERROR | 9
    ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10


class Info(enum.IntEnum):
    """Information types of ``NBD_REP_INFO`` (and requests of ``OPT_INFO``/``OPT_GO``)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    """Per-export flags sent with ``NBD_INFO_EXPORT`` (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Cmd(enum.IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    """Command flags of a request (16 bits)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


REPLY_FLAG_DONE = 1 << 0


class Chunk(enum.IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Errno(enum.IntEnum):
    """Error values on the wire (they are Linux's numbers, but only these are allowed)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# base:allocation flags of a block status descriptor.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# qemu:dirty-bitmap:NAME flags.
STATE_DIRTY = 1 << 0

META_BASE_ALLOCATION = "base:allocation"
META_QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
META_QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
