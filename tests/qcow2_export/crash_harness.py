"""Crash consistency of a qcow2 export: the daemon is killed (SIGKILL) while writers make
allocating writes through the export, and afterwards the image must hold every write that
was acknowledged before an fsync that returned, and nothing that no writer wrote.

Shared by the suite (tests/qcow2_export/test_qcow2_export_crash.py, a few rounds) and
scripts/qcow2-crash-loop (many rounds, root only).

Each writer is a process of its own (crash_writer.py) with a region of the image to itself;
its log says which writes it issued, which were acknowledged and up to which one an fsync
made them durable, and every block it writes says which write put it there.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from crash_writer import BLOCK, MAGIC, RECORD, record
from qcow2_export_support import ExportDaemon, MiB, check, convert_raw, create

WRITER = str(Path(__file__).with_name("crash_writer.py"))
DIRTY_BIT = 1  # qcow2 incompatible feature bit 0: refcounts may be wrong (lazy refcounts)


# --- what a writer's log says -------------------------------------------------------------------
@dataclass
class WriterLog:
    """One writer's log, read after the crash."""

    writer: int
    issued: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (offset, blocks)
    acked: int = 0  # writes acknowledged (all of 1..acked: a writer has one write at a time)
    durable: int = 0  # writes 1..durable were followed by an fsync that returned
    error: int | None = None

    @classmethod
    def parse(cls, writer: int, text: str) -> WriterLog:
        log = cls(writer)
        for line in text.splitlines():
            kind, *args = line.split()
            if kind == "i":
                seq, offset, n = map(int, args)
                log.issued[seq] = (offset, n)
            elif kind == "a":
                log.acked = int(args[0])
            elif kind == "f":
                log.durable = int(args[0])
            elif kind == "e":
                log.error = int(args[0])
        return log

    def versions(self) -> dict[int, list[int]]:
        """Block offset -> the writes (sequence numbers, ascending) that covered it."""
        out: dict[int, list[int]] = {}
        for seq in sorted(self.issued):
            offset, n = self.issued[seq]
            for i in range(n):
                out.setdefault(offset + i * BLOCK, []).append(seq)
        return out


def verify(raw: bytes, logs: list[WriterLog]) -> list[str]:
    """Every block written by a durable write reads back as that write or a later one;
    every other block of a region reads as zeroes or as a write issued to it. The problems
    found (empty: none)."""
    problems = []
    zero = bytes(BLOCK)
    for log in logs:
        for offset, seqs in sorted(log.versions().items()):
            block = raw[offset : offset + BLOCK]
            durable = [s for s in seqs if s <= log.durable]
            if block == zero:
                if durable:
                    problems.append(f"writer {log.writer}: {offset:#x} reads zeroes, but write "
                                    f"{durable[-1]} was durable")  # fmt: skip
                continue
            magic, writer, _, seq, at = RECORD.unpack_from(block)
            if magic != MAGIC or block != record(writer, seq, at):
                problems.append(f"writer {log.writer}: {offset:#x} holds bytes nobody wrote")
            elif (writer, at) != (log.writer, offset) or seq not in seqs:
                problems.append(f"writer {log.writer}: {offset:#x} holds write {seq} of "
                                f"writer {writer} meant for {at:#x}")  # fmt: skip
            elif durable and seq < durable[-1]:
                problems.append(f"writer {log.writer}: {offset:#x} holds write {seq}, but "
                                f"write {durable[-1]} was durable")  # fmt: skip
    return problems


def unwritten_blocks_are_zero(raw: bytes, logs: list[WriterLog], size: int) -> bool:
    """Blocks no writer ever issued a write to read as zeroes (a fresh image)."""
    written = set()
    for log in logs:
        written.update(log.versions())
    zero = bytes(BLOCK)
    return all(raw[pos : pos + BLOCK] == zero for pos in range(0, size, BLOCK)
               if pos not in written)  # fmt: skip


# --- one round --------------------------------------------------------------------------------
@dataclass
class RoundResult:
    acked: int  # writes acknowledged in all
    durable: int  # of which made durable by an fsync
    leaks: int  # clusters qemu-img check found leaked
    killed_after: float  # seconds of writing before the SIGKILL


def dirty(image: Path) -> bool:
    """The qcow2 header's dirty bit (incompatible features at byte 72)."""
    with open(image, "rb") as f:
        f.seek(72)
        return bool(struct.unpack(">Q", f.read(8))[0] & DIRTY_BIT)


def crash_round(workdir: Path, transport: str, rng: random.Random, *, lazy: bool = False,
                writers: int = 3, region: int = 16 * MiB, sync_every: int = 8,
                max_delay: float = 0.6) -> RoundResult:  # fmt: skip
    """Write through a fresh image's export, SIGKILL the daemon at a random moment, and
    check the image. With ``lazy`` (lazy_refcounts=on) the image is left dirty by the kill
    and must be repaired by the next read-write open in qsd-py. Raises AssertionError with
    what went wrong."""
    size = writers * region
    image = create(workdir / "crash.qcow2", size, **({"lazy_refcounts": "on"} if lazy else {}))
    mnt = workdir / "mnt"
    daemon = ExportDaemon(workdir, image, mnt, transport)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        daemon.start()
        log_paths = [workdir / f"writer{w}.log" for w in range(writers)]
        for w in range(writers):
            args = (mnt, w, w * region, region, rng.getrandbits(32), sync_every, log_paths[w])
            argv = [sys.executable, WRITER, *map(str, args)]
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        started = time.monotonic()
        _wait_first_sync(log_paths, procs, timeout=30)
        time.sleep(rng.uniform(0, max_delay))
        killed_after = time.monotonic() - started
        daemon.kill()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired as err:
                raise AssertionError("a writer still hangs after the daemon was killed") from err
        logs = [WriterLog.parse(w, p.read_text()) for w, p in enumerate(log_paths)]
        assert all(log.error is not None for log in logs), "a writer never saw the crash"
        if lazy:
            assert dirty(image), "lazy refcounts, yet the killed daemon left a clean image"
            daemon.start()  # a read-write open repairs the image
            daemon.stop()
            assert not dirty(image), f"still dirty after a read-write open:\n{daemon.log()}"
        report = check(image)
        raw = convert_raw(image, workdir / "after.raw").read_bytes()
        problems = verify(raw, logs)
        assert not problems, "\n".join(problems[:20])
        assert unwritten_blocks_are_zero(raw, logs, size), "data where nobody wrote"
        return RoundResult(
            acked=sum(log.acked for log in logs),
            durable=sum(log.durable for log in logs),
            leaks=report.get("leaks", 0),
            killed_after=killed_after,
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        daemon.kill()


def _wait_first_sync(logs: list[Path], procs: list[subprocess.Popen[bytes]],
                     timeout: float) -> None:  # fmt: skip
    """Until every writer made a write durable: the kill then lands among allocations."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() and b"\nf " in b"\n" + p.read_bytes() for p in logs):
        if any(proc.poll() is not None for proc in procs):
            texts = [p.read_text() if p.exists() else "" for p in logs]
            raise AssertionError(f"a writer ended before the crash: {[t[-200:] for t in texts]}")
        assert time.monotonic() < deadline, "the writers made no progress"
        time.sleep(0.005)


def cleanup_round(workdir: Path) -> None:
    """Remove a round's files (its image is 48 MiB of sparse data and a raw copy)."""
    for path in workdir.iterdir():
        if path.is_file() or path.is_socket():
            path.unlink()
