"""Reading a dirty bitmap the way users do: ``nbdinfo --map=qemu:dirty-bitmap:NAME``."""

from __future__ import annotations

import subprocess


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
