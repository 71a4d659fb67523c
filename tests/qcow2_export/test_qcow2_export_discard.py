"""Punched holes and rewrites under load, with ``discard=unmap``: a punched cluster is freed
and handed out again at once, while the fast path (the daemon's over /dev/fuse, the queue
workers' over io_uring) maps requests through its cluster table. The table's invalidation
(docs/design.rst, *Fast path*) must keep every request on the cluster it looked up: fio's
verified random writes in one region never see another region's data nor lose theirs to a
late write, and no block of the punched region reads as another place's data."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from churn import bad_block
from qcow2_export_support import (
    LEAK_LOG,
    ExportDaemon,
    MiB,
    check_clean,
    convert_raw,
    create,
    fio,
)

CHURN = str(Path(__file__).with_name("churn.py"))
FIO_REGION = 16 * MiB  # [0, 16M): fio
CHURN_START, CHURN_LENGTH = 32 * MiB, 8 * MiB  # [32M, 40M): punches, reads and writes
FIO_JOB = ("--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={FIO_REGION}",
           "--verify=crc32c", "--verify_fatal=1", "--loops=2")  # fmt: skip


def test_punch_holes_and_rewrite_while_fio_verifies(
    tmp_path: Path, export: Callable[..., ExportDaemon], transport: str
):
    image = create(tmp_path / "churn.qcow2", "64M")
    daemon = export(image, qcow2_opts="discard=unmap", file_opts="discard=unmap")
    stop = tmp_path / "stop"
    region = (CHURN_START, CHURN_LENGTH)
    churners = [
        subprocess.Popen(
            [sys.executable, CHURN, mode, str(daemon.mnt), *map(str, region), str(seed), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, mode in enumerate(("punch", "punch", "io", "io"))
    ]
    try:
        fio(daemon.mnt, *FIO_JOB, "--do_verify=1", "--verify_backlog=256")
    finally:
        stop.touch()
        results = [(p.wait(30), *p.communicate()) for p in churners]
    for rc, out, err in results:
        assert rc == 0 and int(out) > 0, (rc, out, err)
    uring = daemon.queues()["uring-queues"]
    assert sum(q["errors"] for q in uring) == 0
    daemon.stop()
    log = daemon.log()

    report = check_clean(image, log)
    raw = convert_raw(image, tmp_path / "after.raw")
    fio(raw, *FIO_JOB, "--verify_only", direct=False)
    data = raw.read_bytes()
    churned = memoryview(data)[CHURN_START : CHURN_START + CHURN_LENGTH]
    assert bad_block(churned, CHURN_START) is None
    assert not any(data[FIO_REGION:CHURN_START]) and not any(data[CHURN_START + CHURN_LENGTH :])
    if LEAK_LOG in log:  # allowed, but then the leaks are the clusters the log names
        assert report.get("leaks", 0) <= log.count(LEAK_LOG), (report, log)
