"""Serve one raw image over FUSE-over-io_uring in this process until SIGTERM (test helper).

    python serve_export.py IMAGE MOUNTPOINT READY_FILE

Stands in for the daemon in signal tests until they can use ``qsd``: builds the node and
the export the way the daemon does, touches READY_FILE once serving, and on SIGTERM deletes
the export (hard, as the daemon's shutdown does) and exits 0; exit 1 if teardown failed.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export_host import HostDaemon  # noqa: E402


async def main(image: str, mountpoint: str, ready: str) -> int:
    daemon = HostDaemon()
    await daemon.graph.add(
        {"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": image}}
    )
    opts = {"type": "fuse", "id": "e0", "node-name": "d0", "mountpoint": mountpoint}
    await daemon.exports.add({**opts, "writable": True, "io_uring": True})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    Path(ready).touch()
    await stop.wait()
    await daemon.exports.delete_all()
    await daemon.graph.close_all()
    return 0 if daemon.events == [("BLOCK_EXPORT_DELETED", {"id": "e0"})] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:4])))
