"""Reading a dirty bitmap the way users do: ``nbdinfo --map=qemu:dirty-bitmap:NAME``."""

from __future__ import annotations

import random
import subprocess
import time


def dirty_runs(url: str | list[str], name: str) -> list[tuple[int, int]]:
    """The dirty extents an NBD server reports for bitmap ``name`` (``url``, or a server
    command in nbdinfo's ``[ ... ]`` form as a list)."""
    target = url if isinstance(url, str) else ["--", *url]
    argv = ["nbdinfo", f"--map=qemu:dirty-bitmap:{name}"]
    argv += [target] if isinstance(target, str) else target
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout
    runs = []
    for line in out.splitlines():
        start, length, flag = line.split()[:3]
        if flag == "1":
            runs.append((int(start), int(length)))
    return runs


def wait_exports_gone(qmp, only: str | None = None, timeout: float = 10.0) -> None:
    """Until no export (or none with id ``only``) is left: block-export-del returns first."""
    deadline = time.monotonic() + timeout
    while [e for e in qmp.cmd("query-block-exports") if only in (None, e["id"])]:
        assert time.monotonic() < deadline, "exports not gone"
        time.sleep(0.02)


def random_extent(rng: random.Random, size: int, longest: int) -> tuple[int, int]:
    """A guest write's place in a disk of ``size``: half aligned 4 KiB blocks, half any
    offset and length up to ``longest`` (partial chunks at both ends)."""
    if rng.random() < 0.5:
        return rng.randrange(size // 4096) * 4096, 4096
    offset = rng.randrange(size - 4096)
    return offset, min(rng.randint(1, longest), size - offset)
