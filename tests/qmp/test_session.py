"""QMP sessions in-process: the real Daemon behind a listening chardev, raw sockets in front.

Expected bytes and texts are QEMU 11.1.3's, read from its qemu-storage-daemon.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qsd_py.daemon import Daemon
from qsd_py.qmp.chardev import add_monitor, create_chardev
from qsd_py.qmp.protocol import QMPSession

NEGOTIATE = b'{"execute":"qmp_capabilities"}'


class Raw:
    """A raw QMP socket: send bytes, read ``\\r\\n``-terminated lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path, negotiate: bool = True) -> Raw:
        raw = cls(*await asyncio.open_unix_connection(str(path), limit=1 << 20))
        raw.greeting = await raw.line()
        if negotiate:
            await raw.send(NEGOTIATE)
            assert await raw.reply() == {"return": {}}
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self, timeout: float = 5.0) -> bytes:
        data = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
        return data

    async def reply(self) -> dict[str, Any]:
        return json.loads(await self.line())  # type: ignore[no-any-return]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Path]]:
    daemon = Daemon()
    path = tmp_path / "qmp.sock"
    opts = {"id": "m", "backend": "socket", "path": str(path), "server": True, "wait": False}
    chardev = await create_chardev(daemon, opts)
    await add_monitor(daemon, chardev, False)
    try:
        yield daemon, path
    finally:
        await daemon.close()


async def test_greeting_bytes(served: tuple[Daemon, Path]) -> None:
    raw = await Raw.connect(served[1], negotiate=False)
    assert raw.greeting == (
        b'{"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, '
        b'"package": "qsd-py 0.1.0"}, "capabilities": ["oob"]}}\r\n'
    )
    await raw.close()


NEGOTIATION = [
    (b'{"execute":"query-version","id":1}',
     {"id": 1, "error": {"class": "CommandNotFound",
                         "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}),
    (b'{"execute":"nope"}',
     {"error": {"class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}),
    (b'{"exec":1,"id":2}',
     {"id": 2, "error": {"class": "GenericError",
                         "desc": "QMP input member 'exec' is unexpected"}}),
    (b'{"exec-oob":"query-version","id":1}',
     {"id": 1, "error": {"class": "GenericError",
                         "desc": "QMP input member 'exec-oob' is unexpected"}}),
    (b'{"execute":"qmp_capabilities","arguments":{"x":1},"id":3}',
     {"id": 3, "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}),
    (b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}',
     {"error": {"class": "GenericError",
                "desc": "Invalid parameter type for 'enable', expected: array"}}),
    (b'{"execute":"qmp_capabilities","id":5}', {"return": {}, "id": 5}),
    (b'{"execute":"qmp_capabilities","id":6}',
     {"id": 6, "error": {"class": "CommandNotFound",
                         "desc": "Capabilities negotiation is already complete, command ignored"}}),
    (b'{"execute":"qmp_capabilities","arguments":{"x":1},"id":4}',
     {"id": 4, "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}),
]  # fmt: skip


async def test_negotiation_sequence(served: tuple[Daemon, Path]) -> None:
    raw = await Raw.connect(served[1], negotiate=False)
    for request, expected in NEGOTIATION:
        await raw.send(request)
        assert await raw.reply() == expected, request
    await raw.close()


REQUEST_ERRORS = [
    (b"[1]", None, "QMP input must be a JSON object"),
    (b'"str"', None, "QMP input must be a JSON object"),
    (b"{}", None, "QMP input lacks member 'execute'"),
    (b'{"id":7}', 7, "QMP input lacks member 'execute'"),
    (b'{"exec":"quit"}', None, "QMP input member 'exec' is unexpected"),
    (b'{"execute":"query-version","id":1,"exec":2}', 1, "QMP input member 'exec' is unexpected"),
    (b'{"execute":1}', None, "QMP input member 'execute' must be a string"),
    (b'{"execute":"query-version","arguments":[]}', None,
     "QMP input member 'arguments' must be an object"),
    (b'{"execute":"query-version","arguments":null,"id":2}', 2,
     "QMP input member 'arguments' must be an object"),
    (b'{"execute":"query-version","control":{}}', None, "QMP input member 'control' is unexpected"),
    (b'{"execute":"query-version","arguments":{"x":1},"id":3}', 3, "Parameter 'x' is unexpected"),
    (b'{"execute":"quit","arguments":{"x":1},"id":4}', 4, "Parameter 'x' is unexpected"),
    (b"}", None, "1:31: JSON parse error, expecting value"),
    (b'{"a" 1}', None, "1:36: JSON parse error, expecting ':'"),
    (b"@", None, "1:31: JSON parse error, stray '@'"),
]  # fmt: skip


@pytest.mark.parametrize("request_, id_, desc", REQUEST_ERRORS)
async def test_request_errors(
    served: tuple[Daemon, Path], request_: bytes, id_: Any, desc: str
) -> None:
    raw = await Raw.connect(served[1])
    await raw.send(request_ + b'{"execute":"query-version","id":"after"}')
    expected: dict[str, Any] = {"error": {"class": "GenericError", "desc": desc}}
    if id_ is not None:
        expected["id"] = id_
    assert await raw.reply() == expected
    after = await raw.reply()
    assert after["id"] == "after" and "return" in after  # the connection goes on
    await raw.close()


async def test_unknown_command_class(served: tuple[Daemon, Path]) -> None:
    raw = await Raw.connect(served[1])
    await raw.send(b'{"execute":"no-such-command","id":"x"}')
    assert await raw.reply() == {
        "error": {
            "class": "CommandNotFound",
            "desc": "The command no-such-command has not been found",
        },
        "id": "x",
    }
    await raw.close()


async def test_oob(served: tuple[Daemon, Path]) -> None:
    raw = await Raw.connect(served[1], negotiate=False)
    await raw.send(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    assert await raw.reply() == {"return": {}}
    cases = [
        (b'{"exec-oob":"query-version","id":1}', 1, "GenericError",
         "The command query-version does not support OOB"),
        (b'{"exec-oob":"nope","id":2}', 2, "CommandNotFound",
         "The command nope has not been found"),
        (b'{"execute":"query-version","exec-oob":"query-version","id":3}', 3, "GenericError",
         "QMP input member 'execute' clashes with 'exec-oob'"),
        (b'{"exec-oob":7,"id":4}', 4, "GenericError",
         "QMP input member 'exec-oob' must be a string"),
    ]  # fmt: skip
    for request, id_, cls, desc in cases:
        await raw.send(request)
        assert await raw.reply() == {"error": {"class": cls, "desc": desc}, "id": id_}
    await raw.send(b'{"execute":"query-version","id":5}')
    assert (await raw.reply())["id"] == 5
    await raw.close()


ID_ECHO = [  # (sent, as QEMU 11.1 echoes it)
    (b"1", b"1"), (b"-5", b"-5"), (b"1.5", b"1.5"), (b"0.1", b"0.10000000000000001"),
    (b"1e5", b"100000"), (b'"s"', b'"s"'), (b"null", b"null"), (b"true", b"true"),
    (b"[]", b"[]"), (b"{}", b"{}"), (b'[1,{"a":[null]}]', b'[1, {"a": [null]}]'),
    (b"18446744073709551615", b"18446744073709551615"),
    (b'"\\u00e9\\u0001/\x7f"', b'"\\u00E9\\u0001/\\u007F"'),
    (b'"\\ud83d\\ude00"', b'"\\uD83D\\uDE00"'),
]  # fmt: skip


@pytest.mark.parametrize("sent, echoed", ID_ECHO)
async def test_id_echo(served: tuple[Daemon, Path], sent: bytes, echoed: bytes) -> None:
    raw = await Raw.connect(served[1])
    await raw.send(b'{"execute":"query-version","id":' + sent + b"}")
    assert (await raw.line()).endswith(b', "id": ' + echoed + b"}\r\n")
    await raw.send(b'{"execute":"nope","id":' + sent + b"}")
    assert (await raw.reply())["id"] == json.loads(echoed)
    await raw.close()


async def test_framing_no_newline_several_per_send_and_split(served: tuple[Daemon, Path]) -> None:
    raw = await Raw.connect(served[1])
    two = b'{"execute":"query-version","id":1}{"execute":"query-version","id":2}'
    await raw.send(two)
    assert [(await raw.reply())["id"] for _ in range(2)] == [1, 2]
    one = b"{'execute': 'query-version', 'id': 'bytes'}"
    for i in range(len(one)):
        await raw.send(one[i : i + 1])
    assert (await raw.reply())["id"] == "bytes"
    await raw.send(b'garbage{"execute":"query-version","id":3}')
    assert (await raw.reply())["error"]["desc"].endswith("invalid keyword 'garbage'")
    assert (await raw.reply())["id"] == 3
    await raw.close()


async def test_every_line_ends_in_crlf(served: tuple[Daemon, Path]) -> None:
    raw = await Raw.connect(served[1], negotiate=False)
    assert raw.greeting.endswith(b"}\r\n") and raw.greeting.count(b"\n") == 1
    await raw.send(NEGOTIATE + b'{"execute":"query-qmp-schema"}@')
    for _ in range(3):
        line = await raw.line()
        assert line.endswith(b"}\r\n") and line.count(b"\n") == 1
    await raw.close()


async def test_ten_megabyte_object(served: tuple[Daemon, Path]) -> None:
    raw = await Raw.connect(served[1])
    other = await _second_monitor(served)
    big = b'{"execute":"query-version","arguments":{"x":"' + b"A" * (10 << 20) + b'"},"id":9}'
    loop = asyncio.get_running_loop()
    start = loop.time()
    await raw.send(big + b'{"execute":"query-version","id":"after"}')
    assert await raw.reply() == {
        "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"},
        "id": 9,
    }
    assert (await raw.reply())["id"] == "after"
    assert loop.time() - start < 5
    await other.send(b'{"execute":"query-version","id":"other"}')
    assert (await other.reply())["id"] == "other"
    await raw.close()
    await other.close()


async def _second_monitor(served: tuple[Daemon, Path]) -> Raw:
    daemon, path = served
    path2 = path.with_name("qmp2.sock")
    opts = {"id": "m2", "backend": "socket", "path": str(path2), "server": True, "wait": False}
    await add_monitor(daemon, await create_chardev(daemon, opts), False)
    return await Raw.connect(path2)


async def test_events_only_to_negotiated_sessions(served: tuple[Daemon, Path]) -> None:
    daemon, path = served
    negotiated = await Raw.connect(path)
    other = await _second_monitor(served)
    waiting = Raw(*await asyncio.open_unix_connection(str(path.with_name("qmp2.sock"))))
    daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": "e0"})
    event = await negotiated.reply()
    assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"] == {"id": "e0"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert isinstance(event["timestamp"]["seconds"], int)
    assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
    assert (await other.reply())["event"] == "BLOCK_EXPORT_DELETED"
    with pytest.raises(asyncio.TimeoutError):
        await waiting.line(timeout=0.3)  # not even greeted while the first client stays
    for raw in (negotiated, other, waiting):
        await raw.close()


async def test_second_client_waits_for_the_first(served: tuple[Daemon, Path]) -> None:
    path = served[1]
    first = await Raw.connect(path)
    second_task = asyncio.ensure_future(Raw.connect(path, negotiate=False))
    await asyncio.sleep(0.3)
    assert not second_task.done()
    await first.close()
    second = await asyncio.wait_for(second_task, 5)
    assert b'"QMP"' in second.greeting
    await second.close()


async def test_registered_while_connected(served: tuple[Daemon, Path]) -> None:
    daemon, path = served
    assert not daemon.monitors
    raw = await Raw.connect(path)
    assert len(daemon.monitors) == 1
    await raw.close()
    for _ in range(100):
        if not daemon.monitors:
            break
        await asyncio.sleep(0.01)
    assert not daemon.monitors


async def test_socket_file_mode_and_removal(tmp_path: Path) -> None:
    daemon = Daemon()
    path = tmp_path / "q.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a stale socket file, as a crashed daemon leaves it
    opts = {"id": "m", "backend": "socket", "path": str(path), "server": True, "wait": False}
    await create_chardev(daemon, opts)
    assert path.stat().st_mode & 0o777 == 0o600
    await daemon.close()
    assert not path.exists()


# --- a stand-in executor, for commands that take their time ---------------------------------
class SlowExecutor:
    """Just what a session needs from a daemon; ``sleep`` takes as long as asked."""

    def __init__(self) -> None:
        self.monitors: set[Any] = set()
        self.log: list[str] = []
        self.finished: list[str] = []
        self.started = asyncio.Event()  # the command line is done
        self.started.set()

    async def execute(self, name: str, args: dict[str, Any] | None) -> Any:
        self.log.append(name)
        if name == "sleep":
            await asyncio.sleep((args or {}).get("seconds", 0.2))
        self.finished.append(name)
        if name == "unsendable":  # a handler's bug: a value JSON cannot carry
            return {"name": object()}
        return {"name": name}


@pytest.fixture
async def slow_pair() -> AsyncIterator[tuple[SlowExecutor, Raw, QMPSession, asyncio.Task[None]]]:
    executor = SlowExecutor()
    ours, theirs = socket.socketpair()
    session = QMPSession(executor, *await asyncio.open_connection(sock=ours))
    task = asyncio.create_task(session.serve())
    raw = Raw(*await asyncio.open_connection(sock=theirs))
    raw.greeting = await raw.line()
    await raw.send(NEGOTIATE)
    assert await raw.reply() == {"return": {}}
    try:
        yield executor, raw, session, task
    finally:
        await session.close()
        await asyncio.wait_for(task, 5)
        await raw.close()


async def test_commands_run_in_order(slow_pair: Any) -> None:
    executor, raw, _, _ = slow_pair
    await raw.send(
        b'{"execute":"sleep","arguments":{"seconds":0.2},"id":1}{"execute":"fast","id":2}'
    )
    assert (await raw.reply())["id"] == 1
    assert (await raw.reply())["id"] == 2
    assert executor.finished == ["sleep", "fast"]


async def test_unsendable_reply_is_an_error_and_the_session_goes_on(slow_pair: Any) -> None:
    """A reply that cannot be sent (once a blkdebug node's rules took BlockNode.active's
    name) becomes an error reply with its id; the next command is answered."""
    _, raw, _, _ = slow_pair
    await raw.send(b'{"execute":"unsendable","id":1}{"execute":"fast","id":2}')
    first = await raw.reply()
    assert first["id"] == 1 and first["error"]["class"] == "GenericError"
    assert "cannot send object over QMP" in first["error"]["desc"]
    assert await raw.reply() == {"return": {"name": "fast"}, "id": 2}


async def test_no_command_runs_before_the_command_line_is_done() -> None:
    """A client that connects while the daemon still opens its --blockdev nodes gets the
    greeting, but its commands wait for the command line, as in QEMU."""
    executor = SlowExecutor()
    executor.started.clear()
    ours, theirs = socket.socketpair()
    session = QMPSession(executor, *await asyncio.open_connection(sock=ours))
    task = asyncio.create_task(session.serve())
    raw = Raw(*await asyncio.open_connection(sock=theirs))
    try:
        assert "QMP" in json.loads(await raw.line())
        await raw.send(NEGOTIATE + b'{"execute":"early","id":1}')
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(raw.reply(), 0.3)
        assert executor.log == []
        executor.started.set()
        assert await raw.reply() == {"return": {}}
        assert (await raw.reply())["id"] == 1 and executor.log == ["early"]
    finally:
        await session.close()
        await asyncio.wait_for(task, 5)
        await raw.close()


async def test_disconnect_mid_command(slow_pair: Any) -> None:
    executor, raw, session, task = slow_pair
    await raw.send(b'{"execute":"sleep","arguments":{"seconds":0.3}}{"execute":"queued","id":2}')
    await asyncio.sleep(0.1)
    await raw.close()
    await asyncio.wait_for(task, 5)
    assert executor.finished == ["sleep"]  # the running command completed ...
    assert "queued" not in executor.log  # ... what was queued behind it was dropped
    assert session not in executor.monitors


async def test_client_that_stops_reading_is_dropped(
    slow_pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qsd_py.qmp.protocol as protocol

    executor, raw, session, task = slow_pair
    monkeypatch.setattr(protocol, "MAX_PENDING_OUTPUT", 1 << 20)
    pad = {"pad": "A" * 4096}
    event = {"timestamp": {"seconds": 0, "microseconds": 0}, "event": "X", "data": pad}
    for _ in range(2000):  # ~8 MB that nobody reads
        session.send_event(event)
    assert session.closed
    assert session not in executor.monitors
    await asyncio.wait_for(task, 5)


async def test_shutdown_with_clients_connected_does_not_hang(tmp_path: Path) -> None:
    daemon = Daemon()
    path = tmp_path / "q.sock"
    opts = {"id": "m", "backend": "socket", "path": str(path), "server": True, "wait": False}
    await add_monitor(daemon, await create_chardev(daemon, opts), False)
    active = await Raw.connect(path)
    queued = Raw(*await asyncio.open_unix_connection(str(path)))
    await active.send(b'{"execute":"query-version","id":1}')
    assert (await active.reply())["id"] == 1
    await asyncio.wait_for(daemon.close(), 10)
    assert not path.exists()
    assert await active.reader.read() == b""  # closed by the daemon
    await active.close()
    await queued.close()
