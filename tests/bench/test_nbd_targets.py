"""The benchmark's NBD targets: command lines, URIs, which jobs run where, whose ratio.

No daemon here (``scripts/bench --targets qsd-py-nbd-unix,qemu-nbd-unix`` measures); what is
checked is what would silently measure the wrong thing: the export each daemon gets, where
fio and nbdcopy connect, and that an NBD export is compared with QEMU's NBD export.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from benchlib import matrix
from benchlib.fio import fio_command
from benchlib.nbdcopy import make_source, nbdcopy_command, size_bytes
from benchlib.procstat import CpuSampler
from benchlib.results import Sample, ratios, summarise
from benchlib.schedule import FIO, steps
from benchlib.targets import daemon_args, nbd_accepts, nbd_uri

T = matrix.TARGETS


def test_daemon_args_nbd_unix_and_tcp() -> None:
    tmpfs = matrix.BACKENDS["tmpfs"]
    args = daemon_args(T["qsd-py-nbd-unix"], tmpfs, "/i.img", "/run/s.sock", "/p")
    assert args[args.index("--nbd-server") + 1] == "addr.type=unix,addr.path=/run/s.sock"
    assert args[args.index("--export") + 1] == "type=nbd,id=e0,node-name=d0,writable=on"
    args = daemon_args(T["qemu-nbd-tcp"], tmpfs, "/i.img", "127.0.0.1:10862", "/p")
    assert args[args.index("--nbd-server") + 1] == (
        "addr.type=inet,addr.host=127.0.0.1,addr.port=10862"
    )
    assert "mountpoint" not in " ".join(args)


def test_uris_and_fio_engine() -> None:
    assert nbd_uri(T["qemu-nbd-unix"], "/r/s.sock") == "nbd+unix:///d0?socket=/r/s.sock"
    assert nbd_uri(T["qsd-py-nbd-tcp"], "127.0.0.1:1") == "nbd://127.0.0.1:1/d0"
    argv = fio_command(matrix.JOBS["randread-qd16x2"], "nbd://127.0.0.1:1/d0", 1, 1, "o")
    engine = argv.index("--ioengine=nbd")
    assert argv.index("--uri=nbd://127.0.0.1:1/d0") > engine  # fio wants the engine first
    assert not any(a.startswith(("--filename", "--direct")) for a in argv)


def test_nbdcopy_runs_only_on_nbd_targets() -> None:
    jobs = [matrix.JOBS["randread-qd1"], matrix.JOBS["nbdcopy-read"]]
    targets = [T["qsd-py-uring"], T["qsd-py-nbd-unix"]]
    schedule = steps(matrix.BACKENDS["tmpfs"], targets, jobs, 1)
    fio_runs = [(s.target, s.job) for s in schedule if s.action == FIO]
    assert ("qsd-py-nbd-unix", "nbdcopy-read") in fio_runs
    assert ("qsd-py-uring", "nbdcopy-read") not in fio_runs
    assert ("qsd-py-uring", "randread-qd1") in fio_runs
    assert "nbdcopy-read" not in matrix.DEFAULT_JOBS


def test_nbd_ratio_is_against_qemus_nbd_export() -> None:
    def s(target: str, iops: float) -> Sample:
        return Sample("tmpfs", "randread-qd16x2", target, 0, iops=iops)

    summary = summarise(
        [s("qemu", 10.0), s("qemu-nbd-unix", 20.0), s("qsd-py-nbd-unix", 50.0), s("qsd-py", 30.0)]
    )
    got = {r["target"]: (r["reference"], r["iops_ratio"]) for r in
           ratios(summary, "qemu", matrix.versus())}  # fmt: skip
    assert got["qsd-py-nbd-unix"] == ("qemu-nbd-unix", 2.5)
    assert got["qsd-py"] == ("qemu", 3.0)
    assert "qemu-nbd-unix" not in got  # a reference has no ratio of its own


def test_nbdcopy_command_and_source(tmp_path: Path) -> None:
    read = nbdcopy_command(matrix.JOBS["nbdcopy-read"], "nbd://h/d0", "/src")
    assert read[-2:] == ["nbd://h/d0", "null:"] and "--request-size=262144" in read
    write = nbdcopy_command(matrix.JOBS["nbdcopy-write"], "nbd://h/d0", "/src")
    assert write[-2:] == ["/src", "nbd://h/d0"] and "--requests=64" in write
    assert size_bytes("1M") == 1 << 20 and size_bytes("512") == 512
    src = tmp_path / "src"
    make_source(src, 4 << 20)
    data = src.read_bytes()
    assert len(data) == 4 << 20
    blocks = [data[i : i + 512] for i in range(0, len(data), 512)]
    assert all(any(b) for b in blocks)  # nbdcopy would turn a zero block into write-zeroes


def test_nbd_accepts_only_a_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    assert not nbd_accepts(path)
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen()
        assert nbd_accepts(path)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        assert not nbd_accepts(f"127.0.0.1:{port}")
        srv.listen()
        assert nbd_accepts(f"127.0.0.1:{port}")


def test_cpu_window_until_finish() -> None:
    """A window of unknown length (a whole copy) lasts until finish()."""
    stop = threading.Event()
    sampler = CpuSampler(os.getpid(), 0.0, None).start()
    threading.Timer(0.2, stop.set).start()
    stop.wait()
    spin_until = time.process_time() + 0.1  # CPU to see (the kernel counts in 10 ms ticks)
    while time.process_time() < spin_until:
        pass
    window = sampler.finish()
    assert window.wall_s >= 0.2 and window.cpu_s > 0
