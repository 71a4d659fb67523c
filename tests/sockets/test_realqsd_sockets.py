"""Socket addresses refused with QEMU 11.1's words (optional: ``--real-qsd``).

QEMU's daemon gets ``--nbd-server addr...``; qsd_py.sockets gets the same address as a start-up
option would pass it, and must give the text QEMU prints after the option.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest
from realqsd_support import SHARE, run_real

from qsd_py import sockets
from qsd_py.errors import QMPError

pytestmark = pytest.mark.realqsd


def cases() -> list[str]:
    where = f"{SHARE}/sockets-{uuid.uuid4().hex[:8]}"
    return [
        f"addr.type=unix,addr.path={where}/nodir/x.sock",
        f"addr.type=unix,addr.path={SHARE}/{'x' * 110}",
        "addr.type=inet,addr.host=127.0.0.1,addr.port=abc",
        "addr.type=inet,addr.host=no-such-host.invalid,addr.port=1",
        "addr.type=inet,addr.host=,addr.port=1,addr.ipv4=off,addr.ipv6=off",
        "addr.type=fd,addr.str=abc",
        "addr.type=fd,addr.str=99999999999",
        "addr.type=fd,addr.str=77",
        "addr.type=vsock,addr.cid=x,addr.port=1",
    ]


def address(arg: str) -> dict[str, Any]:
    """The SocketAddress ``addr.k=v,...`` stands for (booleans as on/off)."""
    addr: dict[str, Any] = {}
    for item in arg.split(","):
        key, _, value = item.partition("=")
        addr[key.removeprefix("addr.")] = {"on": True, "off": False}.get(value, value)
    return addr


@pytest.mark.parametrize("arg", cases())
def test_same_error_as_qemu(arg: str) -> None:
    code, err = run_real(["--nbd-server", arg])
    assert code == 1
    prefix = f"qemu-storage-daemon: --nbd-server {arg}: "
    assert err.startswith(prefix)
    with pytest.raises(QMPError) as ours:
        sockets.listen(address(arg), 1, cli=True)
    hint = f"\n{ours.value.hint}" if ours.value.hint else ""  # printed on a line of its own
    assert ours.value.desc + hint == err.removeprefix(prefix).rstrip("\n")


def test_port_in_use_as_qemu() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        arg = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
        code, err = run_real(["--nbd-server", arg])
        with pytest.raises(QMPError) as ours:
            sockets.listen({"type": "inet", "host": "127.0.0.1", "port": port}, 1)
    assert code == 1
    assert err.strip() == f"qemu-storage-daemon: --nbd-server {arg}: {ours.value.desc}"
