"""The NBD client engine (qsd_py/nbd/client.py) against raw bytes: no sockets."""

from __future__ import annotations

import errno
import struct

import pytest

from qsd_py.nbd import wire
from qsd_py.nbd.client import (
    NEED_DATA,
    START_TLS,
    ExportInfo,
    Handshake,
    Mode,
    OptionError,
    ProtocolError,
    Request,
    Transmission,
)
from qsd_py.nbd.constants import (
    CLISERV_MAGIC,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
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

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH


# --- server side bytes -----------------------------------------------------------------------
def greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    return wire.SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def reply(opt: int, rep: int, payload: bytes = b"") -> bytes:
    return wire.OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload


def info_export(size: int, flags: int = FLAGS) -> bytes:
    return reply(Opt.GO, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, size, flags))


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    payload = wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)
    return reply(Opt.GO, Rep.INFO, payload)


def options(data: bytes) -> list[tuple[int, bytes]]:
    """The options a client sent: (option, payload) in order."""
    found = []
    while data:
        magic, opt, length = wire.OPTION.unpack_from(data)
        assert magic == IHAVEOPT
        found.append((opt, data[16 : 16 + length]))
        data = data[16 + length :]
    return found


def step(hs: Handshake, server: bytes = b"") -> tuple[object, list[tuple[int, bytes]]]:
    """Feed ``server`` bytes; the next event and the options the client sent meanwhile."""
    if server:
        hs.receive_data(server)
    event = hs.next_event()
    return event, options(hs.data_to_send())


def start(hs: Handshake, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> list:
    """The greeting: check the client's flags, return the options it sent after them."""
    assert hs.next_event() is NEED_DATA
    hs.receive_data(greeting(flags))
    event = hs.next_event()
    assert event is NEED_DATA
    out = hs.data_to_send()
    client_flags = struct.unpack(">I", out[:4])[0]
    assert client_flags == flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
    return options(out[4:])


def go_payload(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, Info.BLOCK_SIZE)


# --- handshake ------------------------------------------------------------------------------
def test_extended_headers_then_meta_context_then_go() -> None:
    hs = Handshake("disk", meta_contexts=["base:allocation"])
    assert start(hs) == [(Opt.EXTENDED_HEADERS, b"")]
    event, sent = step(hs, reply(Opt.EXTENDED_HEADERS, Rep.ACK))
    assert event is NEED_DATA
    assert sent == [(Opt.SET_META_CONTEXT, b"\0\0\0\4disk\0\0\0\1\0\0\0\x0fbase:allocation")]
    ctx = reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\7base:allocation")
    event, sent = step(hs, ctx + reply(Opt.SET_META_CONTEXT, Rep.ACK))
    assert sent == [(Opt.GO, go_payload("disk"))]
    server = info_block_size(512, 4096, 1 << 20) + info_export(1 << 30)
    event, sent = step(hs, server + reply(Opt.GO, Rep.ACK))
    assert isinstance(event, ExportInfo) and sent == []
    assert (event.size, event.flags, event.mode) == (1 << 30, FLAGS, Mode.EXTENDED)
    assert (event.min_block, event.pref_block, event.max_block) == (512, 4096, 1 << 20)
    assert event.contexts == {"base:allocation": 7}


def test_structured_replies_when_extended_headers_are_unknown() -> None:
    hs = Handshake("", meta_contexts=["base:allocation"])
    start(hs)
    event, sent = step(hs, reply(Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP, b"no"))
    assert sent == [(Opt.STRUCTURED_REPLY, b"")]
    event, sent = step(hs, reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert sent[0][0] == Opt.SET_META_CONTEXT
    # A server that selects no context: block status is not available, nothing fails.
    event, sent = step(hs, reply(Opt.SET_META_CONTEXT, Rep.ACK))
    assert sent == [(Opt.GO, go_payload(""))]
    event, _ = step(hs, info_export(4096) + reply(Opt.GO, Rep.ACK))
    assert isinstance(event, ExportInfo)
    assert event.mode == Mode.STRUCTURED and event.contexts == {}
    assert (event.min_block, event.pref_block, event.max_block) == (1, 4096, 32 << 20)


def test_simple_replies_and_export_name_fallback_with_zeroes() -> None:
    """A server that knows none of the newer options: LIST finds the export, then
    EXPORT_NAME, whose answer carries 124 zero bytes without NO_ZEROES."""
    hs = Handshake("a", meta_contexts=["base:allocation"])
    start(hs, FLAG_FIXED_NEWSTYLE)
    step(hs, reply(Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP))
    event, sent = step(hs, reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP))
    assert sent == [(Opt.GO, go_payload("a"))]  # no meta contexts without structured replies
    event, sent = step(hs, reply(Opt.GO, Rep.ERR_UNSUP))
    assert sent == [(Opt.LIST, b"")]
    listing = reply(Opt.LIST, Rep.SERVER, b"\0\0\0\1bdesc") + reply(
        Opt.LIST, Rep.SERVER, b"\0\0\0\1a"
    )
    hs.receive_data(listing + reply(Opt.LIST, Rep.ACK))
    assert hs.next_event() is NEED_DATA
    assert options(hs.data_to_send()) == [(Opt.EXPORT_NAME, b"a")]
    hs.receive_data(wire.EXPORT_NAME_REPLY.pack(8192, 3) + bytes(123))
    assert hs.next_event() is NEED_DATA  # one padding byte missing
    hs.receive_data(b"\0")
    event = hs.next_event()
    assert isinstance(event, ExportInfo) and (event.size, event.flags) == (8192, 3)
    assert event.mode == Mode.SIMPLE and hs.trailing_data() == b""


def test_export_missing_from_list() -> None:
    hs = Handshake("b", extended_headers=False, structured_replies=False)
    start(hs)
    step(hs, reply(Opt.GO, Rep.ERR_UNSUP))
    hs.receive_data(reply(Opt.LIST, Rep.SERVER, b"\0\0\0\1a") + reply(Opt.LIST, Rep.ACK))
    with pytest.raises(ProtocolError, match="^No export with name 'b' available$"):
        hs.next_event()
    assert options(hs.data_to_send()) == [(Opt.ABORT, b"")]


def test_unknown_export_is_an_option_error_and_aborts() -> None:
    hs = Handshake("nope", extended_headers=False, structured_replies=False)
    start(hs)
    hs.receive_data(reply(Opt.GO, Rep.ERR_UNKNOWN, b"export 'nope' not present"))
    with pytest.raises(OptionError) as info:
        hs.next_event()
    assert str(info.value) == "Requested export not available"
    assert info.value.message == "export 'nope' not present"
    assert options(hs.data_to_send()) == [(Opt.ABORT, b"")]
    with pytest.raises(OptionError):  # it stays failed
        hs.next_event()


def test_tls_required_fails_at_go_not_at_an_extension() -> None:
    """A server that wants TLS first refuses every option: the extensions are done
    without, and OPT_GO's refusal is the error (QEMU's order and text)."""
    hs = Handshake("x", meta_contexts=["base:allocation"])
    start(hs)
    event, sent = step(hs, reply(Opt.EXTENDED_HEADERS, Rep.ERR_TLS_REQD))
    assert sent == [(Opt.STRUCTURED_REPLY, b"")]
    event, sent = step(hs, reply(Opt.STRUCTURED_REPLY, Rep.ERR_TLS_REQD))
    assert sent == [(Opt.GO, go_payload("x"))]
    hs.receive_data(reply(Opt.GO, Rep.ERR_TLS_REQD))
    with pytest.raises(OptionError, match=r"^TLS negotiation required before option 7 \(go\)$"):
        hs.next_event()


def test_starttls_event_pauses_until_the_stream_is_upgraded() -> None:
    hs = Handshake("x", tls=True)
    assert start(hs) == [(Opt.STARTTLS, b"")]
    event, sent = step(hs, reply(Opt.STARTTLS, Rep.ACK))
    assert event is START_TLS and sent == []
    assert hs.next_event() is NEED_DATA  # nothing goes on before tls_started()
    hs.tls_started()
    event, sent = step(hs)
    assert event is NEED_DATA and sent == [(Opt.EXTENDED_HEADERS, b"")]


@pytest.mark.parametrize(
    ("server", "text"),
    [
        (reply(Opt.STARTTLS, Rep.ERR_POLICY), r"Denied by server for option 5 \(starttls\)"),
        (reply(Opt.STARTTLS, Rep.ERR_UNSUP), "Server rejected request to start TLS 80000001"),
        (reply(Opt.STARTTLS, Rep.ACK, b"x"), "Start TLS response was not zero 1"),
    ],
)
def test_starttls_refused(server: bytes, text: str) -> None:
    hs = Handshake("x", tls=True)
    start(hs)
    hs.receive_data(server)
    with pytest.raises(ProtocolError, match=f"^{text}$"):
        hs.next_event()


def test_starttls_needs_fixed_newstyle() -> None:
    hs = Handshake("x", tls=True)
    hs.receive_data(greeting(0))
    with pytest.raises(ProtocolError, match="^Server does not support STARTTLS$"):
        hs.next_event()
    assert hs.data_to_send() == b"\0\0\0\0"  # the flags went out; no abort without options


def test_oldstyle_server() -> None:
    hs = Handshake("")
    hs.receive_data(struct.pack(">QQQI", NBDMAGIC, CLISERV_MAGIC, 1 << 20, 0x10003))
    assert hs.next_event() is NEED_DATA
    hs.receive_data(bytes(124))
    event = hs.next_event()
    assert isinstance(event, ExportInfo) and (event.size, event.flags) == (1 << 20, 3)
    assert hs.data_to_send() == b""


@pytest.mark.parametrize(
    ("server", "text"),
    [
        (b"NBDMAGIX" + bytes(10), "Bad initial magic received: 0x4e42444d41474958"),
        (struct.pack(">QQ", NBDMAGIC, 1), "Bad server magic received: 0x1"),
        (
            b"NBDMAG",
            "Failed to read initial magic: Unexpected end-of-file before all data were read",
        ),
    ],
)
def test_bad_greeting(server: bytes, text: str) -> None:
    hs = Handshake("")
    hs.receive_data(server)
    hs.receive_data(b"")  # end of file
    with pytest.raises(ProtocolError, match=f"^{text}$"):
        hs.next_event()


@pytest.mark.parametrize(
    ("sizes", "text"),
    [
        ((3, 4096, 1 << 20), "server minimum block size 3 is not a power of two"),
        ((512, 1000, 1 << 20), "server preferred block size 1000 is not a power of two"),
        ((4096, 512, 1 << 20), "server preferred block size 512 less than minimum"),
        ((512, 4096, 1000), "server maximum block size 1000 is not a multiple"),
    ],
)
def test_bad_block_sizes(sizes: tuple[int, int, int], text: str) -> None:
    hs = Handshake("", extended_headers=False, structured_replies=False)
    start(hs)
    hs.receive_data(info_block_size(*sizes))
    with pytest.raises(ProtocolError, match=f"^{text}"):
        hs.next_event()


def test_go_without_export_info() -> None:
    hs = Handshake("", extended_headers=False, structured_replies=False)
    start(hs)
    hs.receive_data(reply(Opt.GO, Rep.ACK))
    with pytest.raises(ProtocolError, match="omitted NBD_INFO_EXPORT"):
        hs.next_event()


def test_reply_to_the_wrong_option() -> None:
    hs = Handshake("")
    start(hs)
    hs.receive_data(reply(Opt.GO, Rep.ACK))
    with pytest.raises(ProtocolError, match="^Unexpected option type 7"):
        hs.next_event()


def test_unasked_meta_context() -> None:
    hs = Handshake("", meta_contexts=["base:allocation"], extended_headers=False)
    start(hs)
    step(hs, reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    hs.receive_data(reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\1qemu:other"))
    with pytest.raises(ProtocolError, match="^Unexpected context name 'qemu:other'$"):
        hs.next_event()


def test_absurd_option_reply_length() -> None:
    hs = Handshake("")
    start(hs)
    hs.receive_data(wire.OPTION_REPLY.pack(OPT_REPLY_MAGIC, Opt.EXTENDED_HEADERS, 1, 1 << 30))
    with pytest.raises(ProtocolError, match="too long"):
        hs.next_event()


# --- transmission ---------------------------------------------------------------------------
def transmission(mode: int = Mode.STRUCTURED, contexts: dict | None = None) -> Transmission:
    info = ExportInfo("", size=1 << 20, flags=FLAGS, mode=mode, contexts=contexts or {})
    return Transmission(info)


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes, done: bool = True) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return wire.STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + (
        payload
    )


def ext_chunk(cookie: int, kind: int, payload: bytes, offset: int = 0, done: bool = True) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    header = wire.EXTENDED_REPLY.pack(
        EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, len(payload)
    )
    return header + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_DATA, struct.pack(">Q", offset) + data, done)


def hole_chunk(cookie: int, offset: int, size: int, done: bool = False) -> bytes:
    return chunk(cookie, Chunk.OFFSET_HOLE, struct.pack(">QI", offset, size), done)


def error_chunk(cookie: int, err: int, msg: bytes = b"", kind: int = Chunk.ERROR) -> bytes:
    payload = struct.pack(">IH", err, len(msg)) + msg
    if kind == Chunk.ERROR_OFFSET:
        payload += struct.pack(">Q", 4096)
    return chunk(cookie, kind, payload)


def events(t: Transmission) -> list[Request]:
    done = []
    while (ev := t.next_event()) is not NEED_DATA:
        done.append(ev)
    return done


def test_compact_and_extended_request_headers() -> None:
    t = transmission()
    req, header = t.request(Cmd.WRITE, 4096, 512, CmdFlag.FUA)
    assert header == struct.pack(">IHHQQI", REQUEST_MAGIC, 1, Cmd.WRITE, req.cookie, 4096, 512)
    with pytest.raises(ValueError):
        t.request(Cmd.TRIM, 0, 1 << 32)
    t = transmission(Mode.EXTENDED)
    req, header = t.request(Cmd.WRITE, 0, 512)
    flags = CmdFlag.PAYLOAD_LEN
    assert header == struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, 1, req.cookie, 0, 512)
    req, header = t.request(Cmd.WRITE_ZEROES, 0, 1 << 40, CmdFlag.NO_HOLE)
    assert struct.unpack(">IHHQQQ", header)[1:] == (2, 6, req.cookie, 0, 1 << 40)
    disc, _ = t.request(Cmd.DISC, 0, 0)
    assert disc.cookie not in t.pending  # no reply to wait for


def test_simple_read_byte_by_byte() -> None:
    t = transmission(Mode.SIMPLE)
    buf = bytearray(8)
    req, _ = t.request(Cmd.READ, 0, 8, buf=memoryview(buf))
    for byte in simple(req.cookie, 0, b"abcdefgh"):
        assert t.next_event() is NEED_DATA
        t.receive_data(bytes([byte]))
    assert events(t) == [req] and req.error == 0 and buf == b"abcdefgh"
    assert t.pending == {}


def test_simple_error_maps_errno() -> None:
    t = transmission(Mode.SIMPLE)
    reqs = [t.request(Cmd.FLUSH, 0, 0)[0] for _ in range(3)]
    t.receive_data(
        simple(reqs[2].cookie, Errno.ENOSPC)
        + simple(reqs[0].cookie, 0)
        + simple(reqs[1].cookie, 1234)
    )
    assert events(t) == [reqs[2], reqs[0], reqs[1]]
    assert [r.error for r in reqs] == [0, errno.EINVAL, errno.ENOSPC]


def test_structured_read_chunks_out_of_order_and_interleaved() -> None:
    t = transmission()
    a, b = bytearray(12288), bytearray(4096)
    ra, _ = t.request(Cmd.READ, 4096, 12288, buf=memoryview(a))
    rb, _ = t.request(Cmd.READ, 0, 4096, buf=memoryview(b))
    a[:] = b"\xff" * 12288  # the hole must overwrite what was there
    t.receive_data(
        data_chunk(ra.cookie, 12288, b"C" * 4096)
        + data_chunk(rb.cookie, 0, b"B" * 4096, done=True)
        + hole_chunk(ra.cookie, 8192, 4096)
        + data_chunk(ra.cookie, 4096, b"A" * 4096)
        + chunk(ra.cookie, Chunk.NONE, b"")
    )
    assert events(t) == [rb, ra]
    assert b == b"B" * 4096
    assert a == b"A" * 4096 + bytes(4096) + b"C" * 4096
    assert ra.error == rb.error == 0


def test_large_read_lands_directly_in_the_callers_buffer() -> None:
    """Past the header, a long payload is received into the caller's memory itself."""
    t = transmission()
    size = 1 << 20
    buf = bytearray(size)
    req, _ = t.request(Cmd.READ, 0, size, buf=memoryview(buf))
    payload = bytes(range(256)) * (size // 256)
    stream = data_chunk(req.cookie, 0, payload, done=True)
    pos, direct = 0, 0
    while pos < len(stream):
        target = t.get_buffer()
        n = min(len(target), len(stream) - pos, 65536)
        target[:n] = stream[pos : pos + n]
        if target.obj is buf:
            direct += n
        t.buffer_updated(n)
        pos += n
    assert events(t) == [req] and buf == payload
    assert direct > size // 2


def test_short_structured_read_fails_with_eio() -> None:
    t = transmission()
    req, _ = t.request(Cmd.READ, 0, 8192, buf=memoryview(bytearray(8192)))
    t.receive_data(data_chunk(req.cookie, 0, b"x" * 4096, done=True))
    assert events(t) == [req] and req.error == errno.EIO
    assert "covered 4096 of 8192" in req.message


def test_error_chunks_keep_the_first_error_and_message() -> None:
    t = transmission()
    r1, _ = t.request(Cmd.READ, 0, 8192, buf=memoryview(bytearray(8192)))
    r2, _ = t.request(Cmd.WRITE, 4096, 4096)
    r3, _ = t.request(Cmd.TRIM, 0, 4096)
    t.receive_data(
        chunk(r1.cookie, Chunk.ERROR, struct.pack(">IH", Errno.EIO, 4) + b"disk", done=False)
        + chunk(r1.cookie, Chunk.ERROR, struct.pack(">IH", Errno.ENOSPC, 0), done=True)
        + error_chunk(r2.cookie, Errno.EPERM, b"ro", Chunk.ERROR_OFFSET)
        + error_chunk(r3.cookie, Errno.ENOTSUP, b"", kind=(1 << 15) | 77)  # unknown error type
    )
    assert events(t) == [r1, r2, r3]
    assert (r1.error, r1.message) == (errno.EIO, "disk")
    assert (r2.error, r2.message) == (errno.EPERM, "ro")
    assert r3.error == errno.ENOTSUP


def test_simple_error_reply_with_structured_replies() -> None:
    t = transmission()
    req, _ = t.request(Cmd.READ, 0, 512, buf=memoryview(bytearray(512)))
    t.receive_data(simple(req.cookie, Errno.EINVAL))
    assert events(t) == [req] and req.error == errno.EINVAL


def test_block_status_compact_and_extended() -> None:
    t = transmission(contexts={"base:allocation": 3})
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 1 << 20, CmdFlag.REQ_ONE)
    t.receive_data(chunk(req.cookie, Chunk.BLOCK_STATUS, struct.pack(">III", 3, 65536, 3)))
    assert events(t) == [req] and req.extents == {"base:allocation": [(65536, 3)]}

    t = transmission(Mode.EXTENDED, contexts={"base:allocation": 9})
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 1 << 40)
    payload = struct.pack(">IIQQQQ", 9, 2, 1 << 33, 0, 4096, 1)
    t.receive_data(ext_chunk(req.cookie, Chunk.BLOCK_STATUS_EXT, payload))
    assert events(t) == [req] and req.extents == {"base:allocation": [(1 << 33, 0), (4096, 1)]}


def test_extended_replies() -> None:
    t = transmission(Mode.EXTENDED)
    buf = bytearray(1024)
    req, _ = t.request(Cmd.READ, 512, 1024, buf=memoryview(buf))
    w, _ = t.request(Cmd.WRITE, 0, 512)
    t.receive_data(
        ext_chunk(w.cookie, Chunk.NONE, b"")
        + ext_chunk(req.cookie, Chunk.OFFSET_DATA, struct.pack(">Q", 512) + b"d" * 1024, 512)
    )
    assert events(t) == [w, req] and buf == b"d" * 1024


def test_abandoned_read_no_longer_writes_the_buffer() -> None:
    t = transmission()
    buf = bytearray(b"keep" * 1024)
    req, _ = t.request(Cmd.READ, 0, 4096, buf=memoryview(buf))
    stream = data_chunk(req.cookie, 0, b"x" * 4096, done=True)
    t.receive_data(stream[:28])  # the chunk's header and offset
    t.abandon(req)
    t.receive_data(stream[28:])
    assert events(t) == [req] and buf == b"keep" * 1024


@pytest.mark.parametrize(
    ("mode", "stream", "text"),
    [
        (Mode.STRUCTURED, simple(99), "cookie 0x63 in reply matches no request"),
        (Mode.STRUCTURED, b"\xde\xad\xbe\xef" + bytes(16), "invalid magic 0xdeadbeef"),
        (Mode.SIMPLE, chunk(1, Chunk.NONE, b""), "does not fit the negotiated headers"),
        (Mode.EXTENDED, simple(1) + bytes(16), "does not fit the negotiated headers"),
        (Mode.STRUCTURED, simple(1, 0, b"x" * 512), "simple reply with data to a read"),
        (Mode.STRUCTURED, data_chunk(1, 1024, b"x"), "exceeding requested region"),
        (Mode.STRUCTURED, hole_chunk(1, 0, 513), "exceeding requested region"),
        (Mode.STRUCTURED, chunk(1, Chunk.NONE, b"", done=False), "invalid NBD_REPLY_TYPE_NONE"),
        (Mode.STRUCTURED, chunk(1, 42, b"abc"), "unexpected reply chunk type 42"),
        (Mode.STRUCTURED, chunk(1, Chunk.ERROR, struct.pack(">IH", 0, 0)), "error value 0"),
        (Mode.STRUCTURED, chunk(1, Chunk.ERROR, struct.pack(">IH", 5, 9)), "inconsistent"),
        (Mode.STRUCTURED, chunk(1, Chunk.BLOCK_STATUS, bytes(12)), "unexpected block status"),
        (Mode.STRUCTURED, chunk(1, Chunk.ERROR, bytes(1 << 16)), "too long"),
    ],
)
def test_protocol_errors(mode: int, stream: bytes, text: str) -> None:
    t = transmission(mode)
    t.request(Cmd.READ, 0, 512, buf=memoryview(bytearray(512)))
    with pytest.raises(ProtocolError, match=text):
        t.receive_data(stream)


def test_block_status_of_an_unknown_context() -> None:
    t = transmission(contexts={"base:allocation": 1})
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError, match="unknown meta context id 2"):
        t.receive_data(chunk(req.cookie, Chunk.BLOCK_STATUS, struct.pack(">III", 2, 512, 0)))


def test_long_block_status_reply_grows_the_stage() -> None:
    t = transmission(contexts={"base:allocation": 1})
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 1 << 30)
    n = 100_000  # 800 KB of descriptors, more than the receive stage holds
    payload = struct.pack(">I", 1) + struct.pack(">II", 512, 1) * n
    t.receive_data(chunk(req.cookie, Chunk.BLOCK_STATUS, payload))
    assert events(t) == [req] and len(req.extents["base:allocation"]) == n
