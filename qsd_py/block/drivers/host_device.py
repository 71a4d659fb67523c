"""``host_device``: a host block or character device (a loop device, a disk, /dev/null), with
the ``file`` driver's I/O and QEMU's rules for devices: only devices are taken, a device
cannot grow or be preallocated, and ``image.limits`` carries the queue limits the kernel
publishes for a block device (``/sys/dev/block/MAJ:MIN/queue``)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from qsd_py.block.drivers.file import FileNode
from qsd_py.errors import QMPError


class HostDeviceNode(FileNode):
    driver = "host_device"
    format_name = "host_device"

    def check_kind(self, mode: int) -> None:
        """QEMU's ``host_device`` takes block and character devices only."""
        if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            raise QMPError(
                f"'{self.driver}' driver requires '{self.path}' to be either "
                "a character or block device"
            )

    async def do_truncate(self, length: int, prealloc: str) -> None:
        """A device keeps its size: preallocation and growing are refused with QEMU's texts;
        a smaller or equal size is accepted and changes nothing (QEMU's inexact resize)."""
        if prealloc != "off":
            raise OSError(
                errno.ENOTSUP,
                f"Preallocation mode '{prealloc}' unsupported for this non-regular file",
            )
        if length > self.exact_length():
            raise OSError(errno.EINVAL, "Cannot grow device files")

    def exact_length(self) -> int:
        """A device's length is where its end is (fstat gives 0 for a block device)."""
        return os.lseek(self.fd, 0, os.SEEK_END)

    def limits(self) -> dict[str, int]:
        """The file driver's, with a block device's queue limits in QEMU's key order."""
        base = super().limits()
        queue = self._queue_limits()
        if not queue:
            return base
        ordered = {"write-zeroes-alignment": queue.pop("write-zeroes-alignment")}
        ordered["request-alignment"] = base.pop("request-alignment")
        ordered["min-mem-alignment"] = base.pop("min-mem-alignment")
        ordered["max-hw-transfer"] = queue.pop("max-hw-transfer")
        ordered["discard-alignment"] = queue.pop("discard-alignment")
        ordered.update(base)
        ordered.update(queue)
        return ordered

    def _queue_limits(self) -> dict[str, int]:
        """``/sys/dev/block/MAJ:MIN/queue``'s limits of an open block device, or nothing
        (a character device, or no sysfs)."""
        if self.fd < 0:
            return {}
        st = os.fstat(self.fd)
        if not stat.S_ISBLK(st.st_mode):
            return {}
        queue = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/queue")

        def read(name: str) -> int:
            return int((queue / name).read_text())

        try:
            return {
                "write-zeroes-alignment": read("logical_block_size"),
                "max-hw-transfer": read("max_sectors_kb") * 1024,
                "discard-alignment": read("discard_granularity"),
                "max-hw-iov": read("max_segments"),
            }
        except (OSError, ValueError):
            return {}


NODE = HostDeviceNode
