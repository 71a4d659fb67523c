"""The server engine's transmission phase: request checks and reply bytes."""

from __future__ import annotations

import errno
import struct

import pytest
from nbd_bytes import ext_request, request
from test_nbd_engine_handshake import BASE_FLAGS, Export

from qsd_py.nbd.constants import Cmd, CmdFlag, TransmissionFlag
from qsd_py.nbd.server import (
    MAX_BLOCK_STATUS_EXTENTS,
    Extents,
    MetaContexts,
    Mode,
    RequestError,
    Transmission,
    nbd_errno,
)

SIZE = 1 << 20
WRITABLE = int(
    BASE_FLAGS
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)


def transmission(
    mode: Mode = Mode.STRUCTURED, writable: bool = True, contexts: tuple[int, ...] = ()
) -> Transmission:
    export = Export("d", size=SIZE, flags=WRITABLE if writable else Export("d").flags)
    meta = MetaContexts(export=export, count=len(contexts))
    meta.base_allocation = 0 in contexts
    meta.allocation_depth = 1 in contexts
    return Transmission(export, mode, meta)


def test_parse_headers() -> None:
    t = transmission(Mode.SIMPLE)
    raw = request(Cmd.WRITE, 4096, 512, cookie=0xDEAD, flags=CmdFlag.FUA)
    assert t.header_size == 28
    assert t.parse_header(raw) == (CmdFlag.FUA, Cmd.WRITE, 0xDEAD, 4096, 512)
    assert t.parse_header(b"\0" * 28) is None
    t = transmission(Mode.EXTENDED)
    raw = ext_request(Cmd.READ, 1 << 40, 1 << 33, cookie=7)
    assert t.header_size == 32
    assert t.parse_header(b"xx" + raw, 2) == (0, Cmd.READ, 7, 1 << 40, 1 << 33)
    assert t.parse_header(request(Cmd.READ, 0, 1) + b"\0" * 4) is None  # compact magic


def test_checks_in_qemus_order() -> None:
    t = transmission(Mode.SIMPLE, writable=False)
    # read-only first, even past the end
    assert t.check(0, Cmd.WRITE, SIZE, 4096) == RequestError(errno.EROFS, "Export is read-only")
    assert t.check(0, Cmd.TRIM, 0, 1).errno == errno.EROFS  # type: ignore[union-attr]
    assert t.check(0, Cmd.READ, SIZE - 512, 1024) == RequestError(
        errno.EINVAL, f"operation past EOF; From: {SIZE - 512}, Len: 1024, Size: {SIZE}"
    )
    assert t.check(0, Cmd.READ, SIZE, 0) is None  # at the end, zero bytes: fine
    assert t.check(CmdFlag.DF, Cmd.READ, 0, 512) == RequestError(
        errno.EINVAL, "unsupported flags for command read (got 0x4)"
    )
    t = transmission(Mode.SIMPLE)
    assert t.check(0, Cmd.WRITE_ZEROES, SIZE, 1).errno == errno.ENOSPC  # type: ignore[union-attr]
    assert t.check(0, Cmd.WRITE, 1 << 62, 1).errno == errno.ENOSPC  # type: ignore[union-attr]
    flags = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO
    assert t.check(flags, Cmd.WRITE_ZEROES, 0, 4096) is None
    assert t.check(CmdFlag.NO_HOLE, Cmd.WRITE, 0, 4096) == RequestError(
        errno.EINVAL, "unsupported flags for command write (got 0x2)"
    )
    assert t.check(CmdFlag.REQ_ONE, Cmd.BLOCK_STATUS, 0, 4096) is None
    assert t.check(0, 99, 0, 0) is None  # unknown commands fail when they are handled
    assert t.check(CmdFlag.REQ_ONE, 99, 0, 0).message == (  # type: ignore[union-attr]
        "unsupported flags for command <unknown> (got 0x8)"
    )


def test_df_and_payload_flags_depend_on_the_mode() -> None:
    assert transmission(Mode.STRUCTURED).check(CmdFlag.DF, Cmd.READ, 0, 512) is None
    ext = transmission(Mode.EXTENDED)
    assert ext.check(CmdFlag.PAYLOAD_LEN, Cmd.WRITE, 0, 512) is None
    assert ext.check(CmdFlag.PAYLOAD_LEN, Cmd.BLOCK_STATUS, 0, 512) is None
    assert ext.check(CmdFlag.PAYLOAD_LEN, Cmd.FLUSH, 0, 0) is not None
    assert ext.payload_length(CmdFlag.PAYLOAD_LEN, Cmd.TRIM, 100) == 100
    assert ext.payload_length(0, Cmd.TRIM, 100) == 0
    assert ext.payload_length(0, Cmd.WRITE, 100) == 100
    simple = transmission(Mode.SIMPLE)
    assert simple.payload_length(CmdFlag.PAYLOAD_LEN, Cmd.TRIM, 100) == 0


def test_length_limit_before_the_payload() -> None:
    t = transmission(Mode.EXTENDED)
    too_big = (32 << 20) + 1
    expected = RequestError(errno.EINVAL, f"len ({too_big}) is larger than max len (33554432)")
    assert t.check_length(0, Cmd.READ, too_big) == expected
    assert t.check_length(0, Cmd.WRITE, too_big) == expected
    assert t.check_length(CmdFlag.PAYLOAD_LEN, Cmd.BLOCK_STATUS, too_big) == expected
    assert t.check_length(0, Cmd.BLOCK_STATUS, 1 << 40) is None  # no payload, just a range
    assert t.check_length(0, Cmd.TRIM, 1 << 40) is None


def test_plain_requests_are_those_every_check_passes() -> None:
    """Transmission.plain is the connection's shortcut past check_length and check: True
    only where both find nothing, for READ and WRITE without flags."""
    t = transmission(Mode.STRUCTURED)
    assert t.plain(0, Cmd.READ, SIZE - 4096, 4096)
    assert t.plain(0, Cmd.WRITE, 0, 4096)
    assert not t.plain(0, Cmd.READ, SIZE - 4096, 4097)  # past the end
    assert not t.plain(CmdFlag.FUA, Cmd.WRITE, 0, 4096)  # a flag to honour
    assert not t.plain(CmdFlag.DF, Cmd.READ, 0, 4096)
    assert not t.plain(0, Cmd.TRIM, 0, 4096)  # other commands take the checks
    assert not transmission(Mode.STRUCTURED, writable=False).plain(0, Cmd.WRITE, 0, 4096)
    assert transmission(Mode.STRUCTURED, writable=False).plain(0, Cmd.READ, 0, 4096)
    big = transmission(Mode.STRUCTURED)
    big.size = 1 << 40
    assert big.plain(0, Cmd.READ, 0, 32 << 20)
    assert not big.plain(0, Cmd.READ, 0, (32 << 20) + 1)  # check_length's limit
    for flags, cmd, offset, length in [(0, Cmd.READ, 0, 512), (0, Cmd.WRITE, SIZE, 1)]:
        passes = t.check_length(flags, cmd, length) is None
        passes = passes and t.check(flags, cmd, offset, length) is None
        assert t.plain(flags, cmd, offset, length) == passes


@pytest.mark.parametrize("mode", [Mode.SIMPLE, Mode.STRUCTURED, Mode.EXTENDED])
def test_data_header_is_the_read_header_of_a_whole_read(mode: Mode) -> None:
    t = transmission(mode)
    header = t.data_header(9, 4096, 512)
    assert isinstance(header, bytes)
    assert header == t.read_header(9, 4096, 4096, 512)
    assert len(header) == t.read_header_size


def test_simple_replies() -> None:
    t = transmission(Mode.SIMPLE)
    assert t.reply_ok(5, 0) == struct.pack(">IIQ", 0x67446698, 0, 5)
    assert t.reply_error(5, 0, errno.EROFS, "Export is read-only") == struct.pack(
        ">IIQ", 0x67446698, 1, 5
    )
    header = t.read_header(9, 4096, 4096, 512)
    assert header == struct.pack(">IIQ", 0x67446698, 0, 9)


def test_structured_replies() -> None:
    t = transmission(Mode.STRUCTURED)
    assert t.reply_ok(5, 0) == struct.pack(">IIQ", 0x67446698, 0, 5)  # still simple on success
    message = b"operation past EOF"
    assert t.reply_error(5, 0, errno.EINVAL, message.decode()) == (
        struct.pack(">IHHQI", 0x668E33EF, 1, 0x8001, 5, 6 + len(message))
        + struct.pack(">IH", 22, len(message))
        + message
    )
    assert t.read_header(9, 4096, 8192, 512, final=False) == struct.pack(
        ">IHHQIQ", 0x668E33EF, 0, 1, 9, 520, 8192
    )
    assert t.hole_chunk(9, 4096, 8192, 1024, final=True) == struct.pack(
        ">IHHQIQI", 0x668E33EF, 1, 2, 9, 12, 8192, 1024
    )
    assert t.reply_done(9, 0) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 9, 0)
    chunk = t.block_status_chunk(3, 0, 0, [(4096, 0), (8192, 3)], final=True)
    assert chunk == struct.pack(">IHHQI", 0x668E33EF, 1, 5, 3, 20) + struct.pack(
        ">IIIII", 0, 4096, 0, 8192, 3
    )


def test_extended_replies() -> None:
    t = transmission(Mode.EXTENDED)
    assert t.reply_ok(5, 4096) == struct.pack(">IHHQQQ", 0x6E8A278C, 1, 0, 5, 4096, 0)
    buf = bytearray(t.read_header_size + 512)
    assert t.pack_read_header(buf, 9, 4096, 4096, 512) == 40
    assert bytes(buf[:40]) == struct.pack(">IHHQQQQ", 0x6E8A278C, 1, 1, 9, 4096, 520, 4096)
    chunk = t.block_status_chunk(3, 0, 1, [(1 << 33, 2)], final=False)
    assert chunk == struct.pack(">IHHQQQ", 0x6E8A278C, 0, 6, 3, 0, 24) + struct.pack(
        ">IIQQ", 1, 1, 1 << 33, 2
    )


def test_errno_mapping() -> None:
    assert nbd_errno(errno.EROFS) == 1
    assert nbd_errno(errno.EFBIG) == 28
    assert nbd_errno(errno.EOPNOTSUPP) == 95
    assert nbd_errno(errno.ECONNRESET) == 22  # anything else is EINVAL


def test_extents_merge_and_limits() -> None:
    ext = Extents(3, wide=False)
    assert ext.add(4096, 0) and ext.add(4096, 0) and ext.add(0, 3)
    assert ext.add(512, 3) and ext.add(512, 1)
    assert not ext.add(512, 0)  # a fourth kind does not fit
    assert ext.add(512, 1)  # but merging into the last one still does
    assert ext.pairs() == [(8192, 0), (512, 3), (1024, 1)]
    assert ext.total == 8192 + 512 + 1024
    narrow = Extents(2, wide=False)
    assert narrow.add(0xFFFFFFFF - 10, 0) and narrow.add(100, 0)  # would overflow 32 bits
    assert narrow.pairs() == [(0xFFFFFFFF - 10, 0), (100, 0)]
    wide = Extents(1, wide=True)
    assert wide.add(0xFFFFFFFF, 0) and wide.add(100, 0)
    assert wide.pairs() == [(0xFFFFFFFF + 100, 0)]
    t = transmission()
    assert t.new_extents(req_one=True).limit == 1
    assert t.new_extents(req_one=False).limit == MAX_BLOCK_STATUS_EXTENTS


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (struct.pack(">QII", 4096, 1, 0), (4096, (0, 1))),  # replies keep the contexts' order
        (struct.pack(">QI", 4096, 1), (4096, (1,))),
        (struct.pack(">Q", 4096), (4096, ())),
        (struct.pack(">QII", 4096, 0, 0), (0, ())),  # twice the same
        (struct.pack(">QI", 4096, 7), (0, ())),  # not negotiated
        (struct.pack(">QIII", 4096, 0, 1, 0), (0, ())),  # more ids than contexts
        (b"\0" * 10, (0, ())),
    ],
)
def test_block_status_payload(payload: bytes, expected: tuple[int, tuple[int, ...]]) -> None:
    t = transmission(Mode.EXTENDED, contexts=(0, 1))
    assert t.contexts == (0, 1)
    assert tuple(t.parse_block_status_payload(payload)) == expected
