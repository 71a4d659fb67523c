"""Start-up: what a daemon loads before its first export is mounted, and how long it takes.

Harnesses start the daemon and use the file at once, so nothing slow may come before the
mount. Timings depend on the machine and are only printed (``pytest -s``); what is asserted
is what keeps them short: the modules that must stay unloaded until something needs them.
scripts/startup-time measures properly (many runs, medians, QEMU's daemon alongside).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO, fuse_mounts_under, umount_all_under

# Runs the real entry point; when the pidfile is written (after the mount), records which
# modules are loaded and whether the export is mounted at that moment.
DRIVER = """
import json, sys
import qsd_py.main as main
from support import fuse_mounts_under

report, mnt = sys.argv[1], sys.argv[2]
write_pidfile = main.write_pidfile

def spy(path):
    write_pidfile(path)
    with open(report, "w") as f:
        json.dump({"modules": sorted(sys.modules), "mounts": fuse_mounts_under(mnt)}, f)

main.write_pidfile = spy
raise SystemExit(main.main(sys.argv[3:]))
"""

# Loaded on demand only: io_uring (io_uring=on, aio=io_uring), the QMP protocol (a monitor),
# jsonschema (QMP argument checks; warmed up after the mount), ctypes.util (ldconfig).
NOT_BEFORE_MOUNT = [
    "qsd_py.uring.aio",
    "qsd_py.uring.ring",
    "qsd_py.export.fuse.uring",
    "qsd_py.export.fuse.uring_checks",
    "qsd_py.block.uring_aio",
    "qsd_py.qmp.protocol",
    "qsd_py.qmp.jsonstream",
    "jsonschema",
    "ctypes.util",
]


def daemon_args(tmp_path: Path) -> tuple[list[str], Path]:
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    mnt.touch()
    return [
        "--blockdev",
        f"file,node-name=f0,filename={img}",
        "--export",
        f"type=fuse,id=e0,node-name=f0,mountpoint={mnt},writable=on",
        "--pidfile",
        str(tmp_path / "pid"),
    ], mnt


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"daemon exited with {proc.returncode}: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, f"no {path.name}"
        time.sleep(0.0005)


def test_nothing_needless_is_loaded_before_the_mount(tmp_path: Path) -> None:
    args, mnt = daemon_args(tmp_path)
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    argv = [sys.executable, "-c", DRIVER, str(report), str(mnt), *args]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_for(report, proc)
        time.sleep(0.05)  # the report is written right after the pidfile
        seen = json.loads(report.read_text())
    finally:
        proc.terminate()
        proc.wait(20)
        umount_all_under(tmp_path)
    assert seen["mounts"] == [str(mnt)]  # the pidfile comes after the mount
    loaded = set(seen["modules"])
    assert "qsd_py.export.fuse.export" in loaded  # the spy saw a real start-up
    assert sorted(m for m in NOT_BEFORE_MOUNT if m in loaded) == []


def test_time_to_mount_is_printed(tmp_path: Path) -> None:
    """Process start to mounted export, five runs (printed with ``pytest -s``)."""
    args, mnt = daemon_args(tmp_path)
    pidfile = tmp_path / "pid"
    times = []
    for _ in range(5):
        dev0 = os.stat(mnt).st_dev
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "qsd_py", *args], stderr=subprocess.PIPE, text=True
        )
        try:
            while os.stat(mnt).st_dev == dev0:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.perf_counter() - t0 < 20, "no mount"
                time.sleep(0.0005)
            times.append((time.perf_counter() - t0) * 1e3)
            wait_for(pidfile, proc)
            assert fuse_mounts_under(tmp_path) == [str(mnt)]
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
            umount_all_under(tmp_path)
        assert not pidfile.exists()
    print(
        f"\nstart-up to mounted export: median {statistics.median(times):.1f} ms, "
        f"min {min(times):.1f}, max {max(times):.1f} (5 runs; scripts/startup-time for more)"
    )
