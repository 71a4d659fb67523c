"""nbdcopy (libnbd-bin): copying a whole NBD export, the other client the NBD issue names.

A read copies the export to ``null:``; a write copies a file of the export's size onto it.
The file holds data that is not zero (nbdcopy turns zero runs into write-zeroes requests,
which would measure something else). Figures come from the wall time of the copy: MB/s, and
"IOPS" as requests of the job's size per second, so the ratios read like fio's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from benchlib.fio import FioFigures, run_fio
from benchlib.matrix import IMAGE_SIZE, Job

NBDCOPY = "nbdcopy"
CHUNK = 1 << 20


def size_bytes(size: str) -> int:
    """``256k`` -> 262144 (fio's and nbdcopy's size suffixes, powers of two)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    unit = units.get(size[-1].lower(), 1)
    return int(size[:-1] if unit > 1 else size) * unit


def nbdcopy_command(job: Job, uri: str, source: str) -> list[str]:
    """The nbdcopy argv for ``job``: the export to ``null:``, or ``source`` onto the export."""
    argv = [NBDCOPY, f"--request-size={size_bytes(job.bs)}", f"--requests={job.iodepth}"]
    return argv + ([uri, "null:"] if job.rw == "read" else [source, uri])


def make_source(path: Path, size: int = IMAGE_SIZE) -> None:
    """A file of ``size`` bytes with no zero block in it (made once, reused)."""
    if path.exists() and path.stat().st_size == size:
        return
    block = bytes((i * 7 + 1) & 0xFF or 1 for i in range(CHUNK))
    with open(path, "wb") as f:
        for n in range(size // CHUNK):
            f.write(n.to_bytes(8, "little") + block[8:])


def run_nbdcopy(job: Job, uri: str, source: str, timeout: float) -> FioFigures:
    """Copy once and time it; raise RuntimeError if nbdcopy fails."""
    argv = nbdcopy_command(job, uri, source)
    t0 = time.perf_counter()
    proc = run_fio(argv, timeout)  # the same process-group handling as fio's
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"nbdcopy exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    requests = IMAGE_SIZE // size_bytes(job.bs)
    return FioFigures(
        iops=requests / elapsed,
        mbps=IMAGE_SIZE / elapsed / 1e6,
        lat_mean_us=float("nan"),
        lat_p99_us=float("nan"),
        total_ios=requests,
        runtime_s=elapsed,
        fio_cpu_pct=float("nan"),
    )


def nbdcopy_available() -> bool:
    return shutil.which(NBDCOPY) is not None
