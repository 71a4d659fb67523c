"""The daemon killed (SIGKILL) at random moments while three writers make allocating writes
to a fresh qcow2 image through its export: afterwards ``qemu-img check`` finds leaks at
worst, and every write acknowledged before an fsync returned reads back (crash_harness.py;
scripts/qcow2-crash-loop runs the same rounds 50 times)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from crash_harness import cleanup_round, crash_round
from support import fuse_mounts_under

ROUNDS = 5


def _rounds(tmp_path: Path, transport: str, rounds: int, lazy: bool) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    workdir = tmp_path / "round"
    workdir.mkdir()
    for n in range(rounds):
        try:
            crash_round(workdir, transport, rng, lazy=lazy)
        except AssertionError as err:
            log = workdir / "qsd.log"
            text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"round {n} (seed {seed}): {err}\ndaemon log:\n{text}") from err
        assert not fuse_mounts_under(workdir)
        cleanup_round(workdir)


def test_sigkill_during_allocating_writes(tmp_path: Path, transport: str):
    _rounds(tmp_path, transport, ROUNDS, lazy=False)


def test_sigkill_with_lazy_refcounts_repaired_on_open(tmp_path: Path, transport: str):
    """Lazy refcounts leave the image dirty after the kill; the next read-write open in
    qsd-py must rebuild the refcounts (then check is clean and the data are there)."""
    _rounds(tmp_path, transport, 2, lazy=True)
