"""fio: the command line for one run, and the figures taken from its JSON output.

Every target is measured with the *host's* fio binary so the client is identical whatever
serves the file. ``unified_rw_reporting=mixed`` folds reads and writes into one section (the
70/30 mix then has one IOPS and one p99), and ``lat_percentiles=1`` puts percentiles on the
total latency (submission + completion), which is what an application waits for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchlib.matrix import Job

FIO = "fio"


@dataclass(frozen=True)
class FioFigures:
    """What one fio run measured (over the time-based window, ramp excluded)."""

    iops: float
    mbps: float  # 10^6 bytes per second
    lat_mean_us: float
    lat_p99_us: float
    total_ios: int
    runtime_s: float
    fio_cpu_pct: float  # fio's own usr+sys CPU, summed over its jobs


def fio_command(job: Job, path: str, runtime: float, ramp: float, output: str) -> list[str]:
    """Build the fio argv for ``job`` on ``path``, writing JSON to ``output``.

    ``path`` is a file (read with O_DIRECT through io_uring), an NBD URI (fio's ``nbd``
    engine, libnbd, one connection per fio job) or ``rbd:POOL/IMAGE`` (fio's ``rbd`` engine,
    librbd, one image handle per fio job; the cluster from ``$CEPH_CONF``)."""
    if path.startswith("nbd"):
        where = ["--ioengine=nbd", f"--uri={path}"]  # engine options after the engine
    elif path.startswith("rbd:"):
        pool, image = path[len("rbd:") :].split("/", 1)
        where = ["--ioengine=rbd", "--clientname=admin", f"--pool={pool}", f"--rbdname={image}"]
    else:
        where = [f"--filename={path}", "--direct=1", "--ioengine=io_uring"]
    argv = [
        FIO,
        f"--name={job.name}",
        *where,
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--numjobs={job.numjobs}",
        f"--ramp_time={ramp:g}",
        f"--runtime={runtime:g}",
        "--time_based",
        "--group_reporting",
        "--unified_rw_reporting=mixed",
        "--lat_percentiles=1",
        "--norandommap",
        "--randrepeat=0",
        # The file exists at its final size: fio must neither lay it out nor fallocate it
        # (a FUSE export refuses mode-0 fallocate, and null-co has nothing to extend).
        "--fallocate=none",
        "--allow_file_create=0",
        "--output-format=json",
        f"--output={output}",
    ]
    if job.mix is not None:
        argv.append(f"--rwmixread={job.mix}")
    return argv


def run_fio(
    argv: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    started: Callable[[int], object] | None = None,
) -> subprocess.CompletedProcess:
    """Run fio in its own process group, so an interrupt kills its forked job workers too;
    ``env`` is added to the environment (``CEPH_CONF`` for the rbd engine); ``started`` is
    called with fio's pid once it runs (to sample its CPU when it is the client itself)."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **env} if env else None,
    )
    if started is not None:
        started(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def parse_fio_json(data: dict) -> FioFigures:
    """Extract the figures from fio's JSON (one group-reported job, ``mixed`` section)."""
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job failed with error {job['error']}")
    mixed = job["mixed"]
    lat = mixed["lat_ns"]
    percentiles = lat.get("percentile", {})
    p99 = percentiles.get("99.000000")
    runtime_ms = mixed.get("runtime") or job.get("job_runtime") or 0
    return FioFigures(
        iops=float(mixed["iops"]),
        mbps=float(mixed["bw_bytes"]) / 1e6,
        lat_mean_us=float(lat["mean"]) / 1e3,
        lat_p99_us=float(p99) / 1e3 if p99 is not None else float("nan"),
        total_ios=int(mixed["total_ios"]),
        runtime_s=float(runtime_ms) / 1e3,
        fio_cpu_pct=float(job.get("usr_cpu", 0.0)) + float(job.get("sys_cpu", 0.0)),
    )


def load_fio_json(path: str | Path) -> dict:
    """Read fio's JSON output; fio may prefix it with warnings, so skip to the first brace."""
    text = Path(path).read_text()
    start = text.find("{")
    if start < 0:
        raise RuntimeError(f"no JSON in fio output {path}")
    return json.loads(text[start:])


def fio_version() -> str:
    """``fio-3.33`` or similar; recorded in the results so runs can be compared."""
    out = subprocess.run([FIO, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()
