"""throttle-group and driver=throttle against qsd-py: QEMU's replies (conversation.py), and
the limiter itself: reads through an NBD export of a throttle node take at least the time
the group's rate implies (a lower bound with slack, never an upper one), limits set by
qom-set at run time take effect, and two nodes of one group share its rate."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nbd_server.qmp_talk import Talk
from support import Qsd
from throttle.conversation import ARGS, STEPS

MIB = 1024 * 1024
RATE = 2 * MIB  # bytes per second: the group's bps-total in the timed tests


def test_conversation_has_qemus_replies(qsd: Callable[..., Qsd]) -> None:
    client = Talk(str(qsd(*ARGS).qmp_path))
    try:
        for name, args, reply in STEPS:
            assert client.command(name, args)["reply"] == reply, (name, args)
    finally:
        client.close()


def _daemon(qsd: Callable[..., Qsd], tmp_path: Path, group: str, nodes: int) -> tuple[Qsd, Path]:
    """Throttle nodes t0.. over files of 2 MiB of data each (zeroes would be sent as holes
    from block status, without a read), exported over NBD."""
    sock = tmp_path / "nbd.sock"
    args = ["--object", f"throttle-group,id=g0,{group}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}"]  # fmt: skip
    for i in range(nodes):
        img = tmp_path / f"d{i}.raw"
        img.write_bytes(b"\x01" * 2 * MIB)
        args += [
            "--blockdev", f"file,node-name=n{i},filename={img}",
            "--blockdev", f"throttle,node-name=t{i},throttle-group=g0,file=n{i}",
            "--export", f"type=nbd,id=e{i},node-name=t{i}",
        ]  # fmt: skip
    return qsd(*args), sock


def _timed_reads(sock: Path, exports: list[str], length: int) -> float:
    """Read ``length`` bytes of each export in 64 KiB requests, all exports at once."""
    failures: list[BaseException] = []

    def read(export: str) -> None:
        try:
            _read_chunks(sock, export, length)
        except BaseException as err:  # reported in the test's thread
            failures.append(err)

    start = time.monotonic()
    threads = [threading.Thread(target=read, args=(e,)) for e in exports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert not failures, failures
    return elapsed


def _read_chunks(sock: Path, export: str, length: int) -> None:
    chunk = 64 * 1024
    cmds = [a for off in range(0, length, chunk) for a in ("-c", f"read -q {off} {chunk}")]
    subprocess.run(
        ["qemu-io", "-r", "-f", "raw", *cmds, f"nbd+unix:///{export}?socket={sock}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def _least(nbytes: int) -> float:
    """The time a leaky bucket of RATE needs for ``nbytes`` in 64 KiB requests: all but
    a tenth of a second's worth (the bucket's size) and one request wait; half of it as
    slack."""
    return 0.5 * (nbytes - RATE / 10 - 64 * 1024) / RATE


def test_reads_take_the_time_the_limit_implies(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    _, sock = _daemon(qsd, tmp_path, f"x-bps-total={RATE}", 1)
    assert _timed_reads(sock, ["t0"], 2 * MIB) >= _least(2 * MIB)


def test_limits_set_at_run_time_take_effect(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    """An unlimited group gets a rate by qom-set; the next reads wait for it."""
    daemon, sock = _daemon(qsd, tmp_path, "limits.iops-total=0", 1)
    client = Talk(str(daemon.qmp_path))
    try:
        reply = client.command(
            "qom-set", {"path": "/objects/g0", "property": "limits", "value": {"bps-read": RATE}}
        )["reply"]
        assert reply == {"return": {}}
        got = client.command("qom-get", {"path": "g0", "property": "x-bps-read"})["reply"]
        assert got == {"return": RATE}
    finally:
        client.close()
    assert _timed_reads(sock, ["t0"], 2 * MIB) >= _least(2 * MIB)


def test_two_nodes_share_the_group(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    """Two nodes reading 1 MiB each at once get the group's rate together, not each."""
    _, sock = _daemon(qsd, tmp_path, f"x-bps-total={RATE}", 2)
    assert _timed_reads(sock, ["t0", "t1"], MIB) >= _least(2 * MIB)


def test_writes_wait_and_land(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    """Writes through a throttle node over a file reach the file (data unchanged)."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MIB))
    sock = tmp_path / "nbd.sock"
    qsd(
        "--object", f"throttle-group,id=g0,x-bps-write={RATE}",
        "--blockdev", f"file,node-name=f0,filename={img}",
        "--blockdev", "throttle,node-name=t0,throttle-group=g0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=t0,writable=on",
    )  # fmt: skip
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -q -P 0x5a 4096 65536",
         f"nbd+unix:///t0?socket={sock}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    data = img.read_bytes()
    assert data[4096 : 4096 + 65536] == b"\x5a" * 65536 and data[:4096] == bytes(4096)
