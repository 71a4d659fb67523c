"""A monitor on ``--chardev stdio`` and a later option that fails: the daemon greets at once,
reports the option's error and exits 1, as QEMU 11.1's does (QEMU's shell iotests pipe QMP
into such a daemon; one that stayed up hung the test for good)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ARGV = ["--chardev", "stdio,id=s", "--monitor", "chardev=s",
        "--blockdev", "file,node-name=x,filename=/nonexistent/qsd-py-test"]  # fmt: skip
QMP_IN = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


def _run(prefix: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *ARGV], input=QMP_IN, capture_output=True, text=True, timeout=30, check=False
    )


def _greeting_only(stdout: str) -> dict:
    """The one line on stdout, the greeting; its package (which names the daemon) dropped."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    greeting = json.loads(lines[0])
    del greeting["QMP"]["version"]["package"]
    return greeting


def test_a_failing_option_after_a_stdio_monitor_ends_the_daemon() -> None:
    done = _run([sys.executable, "-m", "qsd_py"])
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "qsd-py: --blockdev file,node-name=x,filename=/nonexistent/qsd-py-test: "
        "Could not open '/nonexistent/qsd-py-test': No such file or directory"
    )
    greeting = _greeting_only(done.stdout)
    assert greeting["QMP"]["capabilities"] == ["oob"]


@pytest.mark.realqsd
def test_the_same_as_qemus(tmp_path: Path) -> None:
    from realqsd_support import require_real_qsd

    real = _run([str(require_real_qsd()), "run", "qemu-storage-daemon"])
    ours = _run([sys.executable, "-m", "qsd_py"])
    assert real.returncode == ours.returncode == 1
    assert _greeting_only(real.stdout) == _greeting_only(ours.stdout)
    assert real.stderr.split(":", 1)[1] == ours.stderr.split(":", 1)[1]
