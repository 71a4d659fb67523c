"""The server engine's negotiation, byte for byte: options in, replies and events out."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from nbd_bytes import OptReply, meta_payload, name_payload, option, parse_replies

from qsd_py.nbd.constants import Info, Opt, Rep, TransmissionFlag
from qsd_py.nbd.server import Closed, Handshake, Mode, Ready, StartTLS

FIXED = 1
NO_ZEROES = 2
BASE_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_CACHE
)


@dataclass
class Export:
    name: str
    description: str | None = None
    size: int = 1 << 20
    flags: int = int(BASE_FLAGS | TransmissionFlag.READ_ONLY)
    min_block: int = 1
    max_block: int = 1 << 30
    allocation_depth: bool = False
    bitmaps: list[str] = field(default_factory=list)


class Catalog:
    def __init__(self, *exports: Export) -> None:
        self.exports = list(exports)

    def find(self, name: str) -> Export | None:
        return next((e for e in self.exports if e.name == name), None)

    def listing(self) -> list[Export]:
        return self.exports


def start(catalog: Catalog, flags: int = FIXED | NO_ZEROES, tls: bool = False) -> Handshake:
    hs = Handshake(catalog, tls=tls)
    greeting = bytes(hs.out)
    hs.out.clear()
    assert greeting == b"NBDMAGIC" + bytes.fromhex("49484156454f5054") + b"\x00\x03"
    hs.receive_data(struct.pack(">I", flags))
    return hs


def send(hs: Handshake, data: bytes) -> list[OptReply]:
    hs.receive_data(data)
    out = bytes(hs.out)
    hs.out.clear()
    return parse_replies(out)


def events(hs: Handshake) -> list[object]:
    found = []
    while (event := hs.next_event()) is not None:
        found.append(event)
    return found


def test_go_with_structured_replies_and_base_allocation() -> None:
    export = Export("disk", description="a disk", min_block=512)
    hs = start(Catalog(export))
    assert [(r.opt, r.rep) for r in send(hs, option(Opt.STRUCTURED_REPLY))] == [
        (Opt.STRUCTURED_REPLY, Rep.ACK)
    ]
    replies = send(hs, option(Opt.SET_META_CONTEXT, meta_payload(b"disk", [b"base:allocation"])))
    assert [(r.rep, r.payload) for r in replies] == [
        (Rep.META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
        (Rep.ACK, b""),
    ]
    replies = send(hs, option(Opt.GO, name_payload(b"disk", (Info.NAME, Info.BLOCK_SIZE))))
    assert [r.rep for r in replies] == [Rep.INFO] * 4 + [Rep.ACK]
    assert replies[0].payload == struct.pack(">H", Info.NAME) + b"disk"
    assert replies[1].payload == struct.pack(">H", Info.DESCRIPTION) + b"a disk"
    # The client asked for block sizes: the minimum is the node's alignment.
    assert replies[2].payload == struct.pack(">HIII", Info.BLOCK_SIZE, 512, 4096, 32 << 20)
    flags = export.flags | TransmissionFlag.SEND_DF
    assert replies[3].payload == struct.pack(">HQH", Info.EXPORT, 1 << 20, flags)
    (ready,) = events(hs)
    assert isinstance(ready, Ready) and ready.export is export
    assert ready.transmission.mode == Mode.STRUCTURED
    assert ready.transmission.contexts == (0,)
    assert ready.transmission.check_align == 512
    assert hs.finished


def test_go_without_block_size_request_announces_minimum_1() -> None:
    hs = start(Catalog(Export("d", min_block=4096)))
    replies = send(hs, option(Opt.GO, name_payload(b"d")))
    assert replies[0].payload == struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 32 << 20)
    flags = Export("d").flags  # simple replies: no DF flag
    assert replies[1].payload == struct.pack(">HQH", Info.EXPORT, 1 << 20, flags)
    (ready,) = events(hs)
    assert ready.transmission.check_align == 0  # type: ignore[attr-defined]


def test_info_needs_block_size_request_when_alignment_matters() -> None:
    hs = start(Catalog(Export("d", min_block=512)))
    replies = send(hs, option(Opt.INFO, name_payload(b"d")))
    assert [r.rep for r in replies] == [Rep.INFO, Rep.INFO, Rep.ERR_BLOCK_SIZE_REQD]
    assert replies[-1].payload == b"request NBD_INFO_BLOCK_SIZE to use this export"
    assert events(hs) == [] and not hs.finished


def test_bytes_one_at_a_time_give_the_same_answers() -> None:
    catalog = Catalog(Export("disk"))
    stream = (
        option(Opt.LIST)
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.LIST_META_CONTEXT, meta_payload(b"disk", []))
        + option(Opt.GO, name_payload(b"disk", (Info.NAME,)))
    )
    whole = start(catalog)
    expected = send(whole, stream)
    drip = start(catalog)
    for i in range(len(stream)):
        drip.receive_data(stream[i : i + 1])
    assert parse_replies(bytes(drip.out)) == expected
    assert isinstance(events(drip)[0], Ready)


def test_list_names_every_export_with_description() -> None:
    hs = start(Catalog(Export("a", description="first"), Export("b")))
    replies = send(hs, option(Opt.LIST))
    assert [(r.rep, r.payload) for r in replies] == [
        (Rep.SERVER, struct.pack(">I", 1) + b"a" + b"first"),
        (Rep.SERVER, struct.pack(">I", 1) + b"b"),
        (Rep.ACK, b""),
    ]


def test_list_with_payload_is_invalid_and_negotiation_goes_on() -> None:
    hs = start(Catalog(Export("a")))
    (reply,) = send(hs, option(Opt.LIST, b"xyz"))
    assert (reply.rep, reply.payload) == (Rep.ERR_INVALID, b"option 'list' has unexpected length")
    assert [r.rep for r in send(hs, option(Opt.LIST))] == [Rep.SERVER, Rep.ACK]


def test_unknown_export_and_long_names_are_cut_in_the_message() -> None:
    hs = start(Catalog(Export("a")))
    (reply,) = send(hs, option(Opt.INFO, name_payload(b"nope")))
    assert (reply.rep, reply.payload) == (Rep.ERR_UNKNOWN, b"export 'nope' not present")
    long = b"x" * 100
    (reply,) = send(hs, option(Opt.GO, name_payload(long)))
    assert reply.payload == b"export '" + b"x" * 80 + b"...' not present"


def test_name_length_and_payload_mismatches() -> None:
    hs = start(Catalog(Export("a")))
    short = struct.pack(">I", 10) + b"abc"  # says 10 bytes, carries 3
    (reply,) = send(hs, option(Opt.INFO, short))
    assert (reply.rep, reply.payload) == (Rep.ERR_INVALID, b"Inconsistent lengths in option info")
    (reply,) = send(hs, option(Opt.GO, struct.pack(">I", 5000) + b"q" * 10))
    assert (reply.rep, reply.payload) == (Rep.ERR_INVALID, b"Invalid name length: 5000")
    (reply,) = send(hs, option(Opt.GO, name_payload(b"a\0b")))
    assert reply.payload == b"Unexpected embedded NUL in option go"
    (reply,) = send(hs, option(Opt.GO, name_payload(b"a") + b"extra"))
    assert reply.payload == b"option 'go' has unexpected length"
    assert not hs.finished


def test_unknown_option_with_huge_payload_is_dropped_in_bounded_memory() -> None:
    hs = start(Catalog(Export("a")))
    payload_len = 8 << 20
    hs.receive_data(struct.pack(">QII", 0x49484156454F5054, 77, payload_len))
    chunk = b"\xaa" * 65536
    for _ in range(payload_len // len(chunk)):
        hs.receive_data(chunk)
        assert len(hs._in) == 0  # skipped as it arrives, never buffered
    (reply,) = parse_replies(bytes(hs.out))
    assert (reply.opt, reply.rep, reply.payload) == (
        77,
        Rep.ERR_UNSUP,
        b"Unsupported option 77 (<unknown>)",
    )


def test_fatal_errors_close() -> None:
    hs = start(Catalog(), flags=FIXED | 0x80)
    (closed,) = events(hs)
    assert closed == Closed("option negotiation failed: Unknown client flags 0x80 received")
    hs = start(Catalog())
    hs.receive_data(struct.pack(">QII", 0x1234, Opt.LIST, 0))
    assert events(hs) == [Closed("option negotiation failed: Bad magic received")]
    hs = start(Catalog())
    hs.receive_data(struct.pack(">QII", 0x49484156454F5054, Opt.GO, (32 << 20) + 1))
    assert events(hs) == [
        Closed("option negotiation failed: len (33554433) is larger than max len (33554432)")
    ]


def test_abort_acks_and_closes_cleanly() -> None:
    hs = start(Catalog())
    (reply,) = send(hs, option(Opt.ABORT))
    assert reply.rep == Rep.ACK
    assert events(hs) == [Closed(None)]
    assert hs.aborted
    hs.receive_data(b"ignored after the end")
    assert hs.out == b""


def test_export_name_reply_with_and_without_zeroes() -> None:
    export = Export("d", size=4 << 20)
    for flags, padding in ((FIXED | NO_ZEROES, 0), (FIXED, 124), (0, 124)):
        hs = start(Catalog(export), flags=flags)
        hs.receive_data(option(Opt.EXPORT_NAME, b"d"))
        assert bytes(hs.out) == struct.pack(">QH", 4 << 20, export.flags) + bytes(padding)
        (ready,) = events(hs)
        assert isinstance(ready, Ready)
        assert ready.transmission.mode == (Mode.SIMPLE if flags else Mode.EXPORT_NAME)


def test_export_name_failures_close() -> None:
    hs = start(Catalog(Export("d")))
    hs.receive_data(option(Opt.EXPORT_NAME, b"other"))
    assert events(hs) == [Closed("option negotiation failed: export not found")]
    hs = start(Catalog(Export("d")))
    send(hs, option(Opt.EXTENDED_HEADERS))
    hs.receive_data(option(Opt.EXPORT_NAME, b"d"))
    assert events(hs) == [Closed("option negotiation failed: Extended headers already negotiated")]


def test_old_newstyle_client_may_only_ask_for_export_name() -> None:
    hs = start(Catalog(Export("d")), flags=0)
    hs.receive_data(option(Opt.LIST))
    assert events(hs) == [Closed("option negotiation failed: Unsupported option 3 (list)")]
    assert hs.out == b""


def test_structured_and_extended_replies_negotiate_once() -> None:
    hs = start(Catalog(Export("d")))
    assert send(hs, option(Opt.STRUCTURED_REPLY))[0].rep == Rep.ACK
    (reply,) = send(hs, option(Opt.STRUCTURED_REPLY))
    assert (reply.rep, reply.payload) == (Rep.ERR_INVALID, b"structured reply already negotiated")
    assert send(hs, option(Opt.EXTENDED_HEADERS))[0].rep == Rep.ACK
    (reply,) = send(hs, option(Opt.EXTENDED_HEADERS))
    assert (reply.rep, reply.payload) == (Rep.ERR_INVALID, b"extended headers already negotiated")
    (reply,) = send(hs, option(Opt.STRUCTURED_REPLY))
    assert reply.rep == Rep.ERR_EXT_HEADER_REQD
    (reply,) = send(hs, option(Opt.EXTENDED_HEADERS, b"x"))
    assert reply.payload == b"option 'extended headers' has unexpected length"


def test_block_status_payload_flag_with_extended_headers() -> None:
    export = Export("d")
    hs = start(Catalog(export))
    send(hs, option(Opt.EXTENDED_HEADERS))
    info = send(hs, option(Opt.INFO, name_payload(b"d")))
    flags = export.flags | TransmissionFlag.SEND_DF | TransmissionFlag.BLOCK_STAT_PAYLOAD
    assert info[1].payload == struct.pack(">HQH", Info.EXPORT, 1 << 20, flags)
    # GO without contexts: no payload flag.
    go = send(hs, option(Opt.GO, name_payload(b"d")))
    flags = export.flags | TransmissionFlag.SEND_DF
    assert go[1].payload == struct.pack(">HQH", Info.EXPORT, 1 << 20, flags)
    (ready,) = events(hs)
    assert ready.transmission.extended and ready.transmission.header_size == 32  # type: ignore[attr-defined]


def test_meta_contexts_listing_and_selection() -> None:
    export = Export("d", allocation_depth=True, bitmaps=["b0", "b1"])
    hs = start(Catalog(export))
    replies = send(hs, option(Opt.LIST_META_CONTEXT, meta_payload(b"d", [])))
    assert [(r.rep, r.payload) for r in replies] == [
        (Rep.META_CONTEXT, b"\0\0\0\0base:allocation"),
        (Rep.META_CONTEXT, b"\0\0\0\0qemu:allocation-depth"),
        (Rep.META_CONTEXT, b"\0\0\0\0qemu:dirty-bitmap:b0"),
        (Rep.META_CONTEXT, b"\0\0\0\0qemu:dirty-bitmap:b1"),
        (Rep.ACK, b""),
    ]
    replies = send(hs, option(Opt.LIST_META_CONTEXT, meta_payload(b"d", [b"qemu:dirty-bitmap:"])))
    assert [r.payload[4:] for r in replies[:-1]] == [
        b"qemu:dirty-bitmap:b0",
        b"qemu:dirty-bitmap:b1",
    ]
    (reply,) = send(hs, option(Opt.SET_META_CONTEXT, meta_payload(b"d", [b"base:allocation"])))
    assert (
        reply.payload
        == b"request option 'set meta context' when structured reply is not negotiated"
    )
    send(hs, option(Opt.STRUCTURED_REPLY))
    queries = [b"qemu:dirty-bitmap:b1", b"base:", b"nope:x", b"qemu:allocation-depth", b"x" * 5000]
    replies = send(hs, option(Opt.SET_META_CONTEXT, meta_payload(b"d", queries)))
    assert [(r.rep, r.payload) for r in replies] == [
        (Rep.META_CONTEXT, struct.pack(">I", 1) + b"qemu:allocation-depth"),
        (Rep.META_CONTEXT, struct.pack(">I", 3) + b"qemu:dirty-bitmap:b1"),
        (Rep.ACK, b""),
    ]
    send(hs, option(Opt.GO, name_payload(b"d")))
    (ready,) = events(hs)
    assert ready.transmission.contexts == (1, 3)  # type: ignore[attr-defined]


def test_meta_context_errors() -> None:
    hs = start(Catalog(Export("d")))
    send(hs, option(Opt.STRUCTURED_REPLY))
    (reply,) = send(hs, option(Opt.SET_META_CONTEXT, meta_payload(b"zz", [b"base:allocation"])))
    assert (reply.rep, reply.payload) == (Rep.ERR_UNKNOWN, b"export 'zz' not present")
    trailing = meta_payload(b"d", [b"base:allocation"]) + b"junk"
    (reply,) = send(hs, option(Opt.SET_META_CONTEXT, trailing))
    assert (reply.rep, reply.payload) == (
        Rep.ERR_INVALID,
        b"option 'set meta context' has unexpected length",
    )
    # a query longer than a string may be is skipped, unless it overruns the option
    overrun = meta_payload(b"d", [])[:-4] + struct.pack(">I", 1) + struct.pack(">I", 9000)
    (reply,) = send(hs, option(Opt.LIST_META_CONTEXT, overrun))
    assert reply.payload == b"Inconsistent lengths in option list meta context"


def test_contexts_of_another_export_do_not_carry_over() -> None:
    hs = start(Catalog(Export("a"), Export("b")))
    send(hs, option(Opt.STRUCTURED_REPLY))
    send(hs, option(Opt.SET_META_CONTEXT, meta_payload(b"a", [b"base:allocation"])))
    send(hs, option(Opt.GO, name_payload(b"b")))
    (ready,) = events(hs)
    assert ready.transmission.contexts == ()  # type: ignore[attr-defined]


def test_starttls_without_tls_configured_is_refused() -> None:
    hs = start(Catalog(Export("a")))
    (reply,) = send(hs, option(Opt.STARTTLS))
    assert (reply.rep, reply.payload) == (Rep.ERR_POLICY, b"TLS not configured")


class TestWithTLS:
    def test_options_before_starttls_are_refused(self) -> None:
        hs = start(Catalog(Export("a")), tls=True)
        (reply,) = send(hs, option(Opt.GO, name_payload(b"a")))
        assert (reply.rep, reply.payload) == (
            Rep.ERR_TLS_REQD,
            b"Option 0x7 not permitted before TLS",
        )
        (reply,) = send(hs, option(Opt.LIST))
        assert reply.rep == Rep.ERR_TLS_REQD
        assert events(hs) == []
        hs.receive_data(option(Opt.EXPORT_NAME, b"a"))
        assert events(hs) == [
            Closed("option negotiation failed: Option 0x1 not permitted before TLS")
        ]

    def test_abort_before_tls(self) -> None:
        hs = start(Catalog(), tls=True)
        (reply,) = send(hs, option(Opt.ABORT))
        assert reply.rep == Rep.ERR_TLS_REQD
        assert events(hs) == [Closed(None)]

    def test_old_style_client_is_closed(self) -> None:
        hs = start(Catalog(), flags=0, tls=True)
        hs.receive_data(option(Opt.STARTTLS))
        assert events(hs) == [Closed("option negotiation failed: Unsupported option 0x5")]

    def test_starttls_pauses_until_the_stream_is_encrypted(self) -> None:
        hs = start(Catalog(Export("a")), tls=True)
        client_hello = b"\x16\x03\x01 not parsed as an option"
        (reply,) = send(hs, option(Opt.STARTTLS) + client_hello)
        assert (reply.opt, reply.rep) == (Opt.STARTTLS, Rep.ACK)
        assert events(hs) == [StartTLS()]
        assert hs.take_unread() == client_hello
        hs.tls_started()
        (reply,) = send(hs, option(Opt.STARTTLS))
        assert (reply.rep, reply.payload) == (Rep.ERR_INVALID, b"TLS already enabled")
        send(hs, option(Opt.GO, name_payload(b"a")))
        assert isinstance(events(hs)[0], Ready)

    def test_starttls_with_payload_closes(self) -> None:
        hs = start(Catalog(), tls=True)
        (reply,) = send(hs, option(Opt.STARTTLS, b"x"))
        assert reply.rep == Rep.ERR_INVALID
        assert events(hs) == [
            Closed("option negotiation failed: option 'starttls' has unexpected length")
        ]


@pytest.mark.parametrize("opt", [Opt.PEEK_EXPORT, 12, 0xFFFFFFFF])
def test_unsupported_options(opt: int) -> None:
    hs = start(Catalog())
    (reply,) = send(hs, option(opt, b"payload"))
    assert reply.rep == Rep.ERR_UNSUP
    name = "<unknown>"
    assert reply.payload == f"Unsupported option {opt} ({name})".encode()
