"""The chardev conversation held with QEMU 11.1's qemu-storage-daemon (opt-in: --real-qsd):
the replies conversation.py expects, and so qsd-py gives, are QEMU's; and ringbuf's
encodings fuzzed against QEMU."""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from chardev.conversation import STEPS, expected, fill, normalize
from nbd_server.qmp_talk import Talk
from realqsd_support import real_daemon, shared_dir

from qsd_py.encodings import decode_base64, decode_utf8

pytestmark = pytest.mark.realqsd


@pytest.fixture
def real() -> Iterator[tuple[Talk, Path]]:
    """A fresh real daemon with a monitor on ``qmp.sock`` in a scratch directory."""
    with shared_dir("chardev") as work, real_daemon([], work / "qmp.sock", timeout=20):
        client = Talk(str(work / "qmp.sock"))
        yield client, work
        client.close()


def test_conversation_with_qemu(real: tuple[Talk, Path]) -> None:
    client, work = real
    d = str(work)
    for (name, args), reply in STEPS:
        got = normalize(client.command(name, fill(args, d))["reply"], str(work / "qmp.sock"))
        assert got == expected(reply, d), (name, args)


def _add_ring(client: Talk) -> None:
    backend = {"type": "ringbuf", "data": {"size": 64}}
    assert client.command("chardev-add", {"id": "r", "backend": backend})["reply"] == {"return": {}}


def _utf8ish(rng: random.Random) -> bytes:
    """Bytes that are often almost UTF-8: leads, continuations, ASCII, NULs, overlongs."""
    pool = [0x41, 0x00, 0x80, 0xBF, 0xC0, 0xC1, 0xC3, 0xA9, 0xE0, 0xED, 0xEF, 0xF0, 0xF4]
    pool += [0xF5, 0xF8, 0xFC, 0xFE, 0xFF, 0xB7, 0x9F, 0x8F, 0xA0, 0xBE]
    return bytes(rng.choice(pool) if rng.random() < 0.8 else rng.randrange(256) for _ in range(8))


def test_utf8_reads_decode_as_qemus(real: tuple[Talk, Path]) -> None:
    """Random near-UTF-8 bytes written as base64 and read back as utf8 from QEMU's ringbuf:
    qsd-py's decoder (NUL ends the string, QEMU's modified UTF-8 rules) gives the same
    (Python's own 'replace' decoding differs for about 4 in 10 of these)."""
    client, _ = real
    _add_ring(client)
    rng = random.Random(11)
    for _ in range(300):
        blob = _utf8ish(rng)
        data = base64.b64encode(blob).decode()
        client.command("ringbuf-write", {"device": "r", "data": data, "format": "base64"})
        got = client.command("ringbuf-read", {"device": "r", "size": 64})["reply"]
        assert got == {"return": decode_utf8(blob)}, blob.hex()


def test_base64_writes_decode_as_qemus(real: tuple[Talk, Path]) -> None:
    """Random strings of base64's alphabet, ``=`` and newlines: the bytes QEMU stores are
    those qsd-py's lenient decoder makes."""
    client, _ = real
    _add_ring(client)
    rng = random.Random(12)
    for _ in range(300):
        text = "".join(rng.choice("QUJD+/a0=\n=") for _ in range(rng.randrange(0, 14)))
        reply = client.command("ringbuf-write", {"device": "r", "data": text, "format": "base64"})
        assert reply["reply"] == {"return": {}}
        got = client.command("ringbuf-read", {"device": "r", "size": 64, "format": "base64"})
        assert base64.b64decode(got["reply"]["return"]) == decode_base64(text), repr(text)
