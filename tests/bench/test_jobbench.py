"""scripts/bench-jobs' logic without daemons: the source images, the tables' medians and
ratios, and the command line (``scripts/bench-jobs`` itself measures, for minutes)."""

from __future__ import annotations

import os
from pathlib import Path

from benchlib.jobbench import CopySample, FioSample, copy_table, fio_table, make_source, parser

MIB = 1 << 20


def test_half_sparse_source_is_every_other_mib(tmp_path: Path) -> None:
    """Data in MiB 0, 2, 4..., holes between: the copy jobs meet both."""
    path = str(tmp_path / "src.img")
    make_source(path, "half-sparse", 8 * MIB)
    assert os.path.getsize(path) == 8 * MIB
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MIB
        assert os.lseek(fd, MIB, os.SEEK_DATA) == 2 * MIB
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        data = f.read()
    assert data[MIB : 2 * MIB] == bytes(MIB) and data[:MIB] != bytes(MIB)


def test_copy_table_medians_and_ratio_to_qemu() -> None:
    samples = [
        CopySample("tmpfs", "data", "mirror-raw", "qemu", r, s, s, 0.5)
        for r, s in enumerate((1, 2, 3))
    ]
    samples += [
        CopySample("tmpfs", "data", "mirror-raw", "qsd-py", r, s, s, 1.0)
        for r, s in enumerate((3, 4, 100))
    ]
    samples.append(CopySample("tmpfs", "data", "mirror-raw", "qsd-py", 3, 0.1, error="differs"))
    rows = {line.split()[3]: line.split() for line in copy_table(samples).splitlines()[1:]}
    assert rows["qemu"][5] == "2.00" and rows["qemu"][-1] == "1.00"
    assert rows["qsd-py"][4] == "3"  # the failed sample is not counted
    assert rows["qsd-py"][5] == "4.00" and rows["qsd-py"][-1] == "2.00"


def test_fio_table_ratio_to_the_same_daemon_alone() -> None:
    samples = [FioSample("tmpfs", "randwrite-qd16", "qemu", 0, False, 0, 1000.0)]
    samples.append(FioSample("tmpfs", "randwrite-qd16", "qemu", 0, True, 0, 250.0, passes=3))
    samples.append(FioSample("tmpfs", "randwrite-qd16", "qemu", 0, True, 100 * MIB, 800.0))
    lines = fio_table(samples).splitlines()[1:]
    by_speed = {line.split()[3]: line.split() for line in lines}
    assert by_speed["-"][6] == "1.00"
    assert by_speed["unlimited"][6] == "0.25" and by_speed["unlimited"][7] == "3.0"
    assert by_speed["100"][6] == "0.80"


def test_defaults_cover_the_issue() -> None:
    """Both daemons, tmpfs and disk, full and half-sparse images, mirror and backup to raw
    and qcow2, fio under an unlimited and a limited mirror."""
    args = parser().parse_args([])
    assert args.daemons.split(",") == ["qsd-py", "qemu"]
    assert args.backends.split(",") == ["tmpfs", "disk"]
    assert args.images.split(",") == ["data", "half-sparse"]
    assert set(args.copies.split(",")) == {
        "mirror-raw",
        "mirror-qcow2",
        "backup-raw",
        "backup-qcow2",
    }
    assert args.mirror_speeds.split(",")[0] == "0" and args.verify and args.rounds >= 3
