"""Backups started and completed again and again under an NBD export served by an iothread,
while clients keep reads in flight: the job's filter is put in and taken away under the
connections. Each of them must follow (a drain holds its requests while the graph changes)
and every request gets its reply: a read that reached the closed filter once raised in the
daemon and was never answered, and the client hung."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from pathlib import Path

from conversation import Daemon

MIB = 1 << 20
SIZE = 2 * MIB
READ = 4096
BATCH = 16  # reads sent before their replies are read: requests are always waiting
ROUNDS = 25


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def nbd_open(path: Path, name: str, timeout: float) -> socket.socket:
    """Fixed newstyle, no zeroes, NBD_OPT_GO: a connection with simple replies."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    assert _recv_exactly(sock, 18)[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3))
    payload = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(payload)) + payload)
    while True:
        _, _, rep, length = struct.unpack(">QIII", _recv_exactly(sock, 20))
        _recv_exactly(sock, length)
        if rep == 1:
            return sock
        assert rep == 3, hex(rep)


class Reader(threading.Thread):
    """Batches of 4 KiB reads at random offsets until stopped; every reply must come
    (a socket timeout is a hang) and carry the image's bytes."""

    def __init__(self, path: Path, image: bytes, seed: int) -> None:
        super().__init__(daemon=True)
        self.sock = nbd_open(path, "d", timeout=10)
        self.image = image
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.done = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self._batch()
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.error = f"after {self.done} reads: {err!r}"
        finally:
            self.sock.close()

    def _batch(self) -> None:
        offsets = {}
        out = bytearray()
        for cookie in range(1, BATCH + 1):
            off = self.rng.randrange(SIZE // READ) * READ
            offsets[cookie] = off
            out += struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, off, READ)
        self.sock.sendall(out)
        for _ in range(BATCH):
            magic, error, cookie = struct.unpack(">IIQ", _recv_exactly(self.sock, 16))
            assert magic == 0x67446698 and error == 0, (hex(magic), error)
            off = offsets.pop(cookie)
            assert _recv_exactly(self.sock, READ) == self.image[off : off + READ]
            self.done += 1


def test_backups_under_iothread_nbd_reads_answer_every_read(tmp_path: Path) -> None:
    """``ROUNDS`` backups, each started and run to completion (the filter in, then out)
    while four clients of an iothread's export keep reads in flight: no read is left
    unanswered or fails, every job completes, and the export ends on the source."""
    image = random.Random(3).randbytes(SIZE)
    (tmp_path / "src.img").write_bytes(image)
    (tmp_path / "tgt.img").write_bytes(bytes(SIZE))
    d = Daemon(tmp_path, real=False)
    readers: list[Reader] = []
    try:
        for name in ("src", "tgt"):
            args = {"driver": "file", "filename": f"{name}.img", "node-name": name}
            assert d.cmd("blockdev-add", args) == {"return": {}}
        assert d.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {"return": {}}
        sock = tmp_path / "nbd.sock"
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        export = {"type": "nbd", "id": "d", "name": "d", "node-name": "src", "iothread": "io0"}
        assert d.cmd("block-export-add", export) == {"return": {}}
        readers = [Reader(sock, image, seed) for seed in range(4)]
        for reader in readers:
            reader.start()
        completed = 0
        for n in range(ROUNDS):
            backup = {"job-id": f"b{n}", "device": "src", "target": "tgt", "sync": "full"}
            assert d.cmd("blockdev-backup", backup) == {"return": {}}
            deadline = time.monotonic() + 20
            while d.cmd("query-jobs")["return"]:
                assert time.monotonic() < deadline, "the backup did not end"
                time.sleep(0.002)
            events = [e for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert all("error" not in e["data"] for e in events), events
            completed += len(events)
            assert all(r.error is None for r in readers), [r.error for r in readers]
        assert completed == ROUNDS
        assert d.cmd("query-block-exports")["return"][0]["node-name"] == "src"
    finally:
        for reader in readers:
            reader.stop.set()
        for reader in readers:
            reader.join(15)
        d.close()
    assert [r.error for r in readers] == [None] * len(readers)
    assert all(r.done for r in readers)
    assert (tmp_path / "tgt.img").read_bytes() == image
