"""Serve one raw image over FUSE (``/dev/fuse``, or io_uring with ``uring``) in this process
until SIGTERM, with a test-only bug in the READ/WRITE fast path: deciding a request at
offset 0 raises (test helper).

    python fault_export.py IMAGE MOUNTPOINT READY_FILE devfuse|uring

The bug is put into both transports' modules before the export starts, so the io_uring
queue workers forked from this process carry it too.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export_host import HostDaemon  # noqa: E402

from qsd_py.export.fuse import devfuse, proto, uring  # noqa: E402


def _with_bug(decide: Any) -> Any:
    def buggy(engine: Any, plan: Any, arg: Any, avail: int, writing: bool) -> Any:
        if proto.IO_EXTENT.unpack_from(arg)[0] == 0:
            raise RuntimeError("a fast-path bug (test)")
        return decide(engine, plan, arg, avail, writing)

    return buggy


async def main(image: str, mountpoint: str, ready: str, transport: str) -> int:
    devfuse._decide = _with_bug(devfuse._decide)
    uring._decide = _with_bug(uring._decide)
    daemon = HostDaemon()
    await daemon.graph.add(
        {"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": image}}
    )
    opts = {"type": "fuse", "id": "e0", "node-name": "d0", "mountpoint": mountpoint}
    await daemon.exports.add({**opts, "writable": True, "io_uring": transport == "uring"})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    Path(ready).touch()
    await stop.wait()
    await daemon.exports.delete_all()
    await daemon.graph.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:5])))
