"""QEMU's iotest ``qsd-jobs`` the way it drives the daemon: QMP piped through
``--chardev stdio`` (a stream refused, an active commit still there at quit), and the stdio
monitor itself. The expected text is QEMU 11.1's, timestamps and the version's package left
out."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_mirror import qemu_img

STREAM_QMP = """{"execute": "qmp_capabilities"}
{"execute": "block-stream",
  "arguments": {"device": "fmt_overlay", "job-id": "job0"}}
{"execute": "quit"}
"""

# QEMU 11.1's output for STREAM_QMP (../shared/tools/real-qsd), filtered as below.
STREAM_OUT = """\
{"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, }, "capabilities": ["oob"]}}
{"return": {}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "job0"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "job0"}}
{"error": {"class": "GenericError", "desc": "Permission conflict on node 'fmt_base': \
permissions 'write' are both required by an unnamed block device (uses node 'fmt_base' as \
'root' child) and unshared by stream job 'job0' (uses node 'fmt_base' as 'intermediate node' \
child)."}}
{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "export1"}}
{"return": {}}
"""


COMMIT_QMP = """{"execute":"qmp_capabilities"}
{"execute": "block-commit", "arguments": {"device": "fmt0", "job-id": "job0"}}
{"execute": "quit"}
"""

_COMMIT_HEAD = """\
{"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, }, "capabilities": ["oob"]}}
{"return": {}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "job0"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "job0"}}
"""
_COMMIT_TAIL = """\
{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "job0"}}
{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "job0", "len": 0, "offset": 0, \
"speed": 0, "type": "commit"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "job0"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "job0"}}
{"return": {}}
"""
_COMMIT_READY = """\
{"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "job0"}}
{"event": "BLOCK_JOB_READY", "data": {"device": "job0", "len": 0, "offset": 0, "speed": 0, \
"type": "commit"}}
"""
_RETURN = '{"return": {}}\n'
_PAUSED = """\
{"event": "JOB_STATUS_CHANGE", "data": {"status": "paused", "id": "job0"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "job0"}}
"""
_STANDBY = """\
{"event": "JOB_STATUS_CHANGE", "data": {"status": "standby", "id": "job0"}}
{"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "job0"}}
"""
# QEMU 11.1's output for COMMIT_QMP: the job runs on the main loop beside the monitor, so
# where it is when quit comes varies (each form seen in a dozen runs). It has not
# run yet (the commands were read at once): quit's drain finds it at its first pause point,
# and the cancel ends it there. This is qsd-py's form, every time ...
COMMIT_OUT = _COMMIT_HEAD + _RETURN + _PAUSED + _COMMIT_TAIL
# ... or it reached ready (nothing to commit) before or after block-commit's reply, and
# quit's drain finds it there.
COMMIT_OUT_FORMS = (
    COMMIT_OUT,
    _COMMIT_HEAD + _COMMIT_READY + _RETURN + _STANDBY + _COMMIT_TAIL,
    _COMMIT_HEAD + _RETURN + _COMMIT_READY + _STANDBY + _COMMIT_TAIL,
)


def _filter(out: str) -> str:
    """What the comparison leaves out: timestamps and the package (QEMU's _filter_qmp)."""
    out = re.sub(r'"timestamp": \{[^}]*\}, ', "", out)
    return re.sub(r'"package": "[^"]*"', "", out)


def _stream_argv(work: Path) -> list[str]:
    return [
        "--chardev", "stdio,id=stdio", "--monitor", "chardev=stdio",
        "--blockdev", "node-name=file_base,driver=file,filename=t.qcow2.base",
        "--blockdev", "node-name=fmt_base,driver=qcow2,file=file_base",
        "--blockdev", "node-name=file_overlay,driver=file,filename=t.qcow2",
        "--blockdev",
        "node-name=fmt_overlay,driver=qcow2,file=file_overlay,backing=fmt_base",
        "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
        "--export", "type=nbd,id=export1,node-name=fmt_base,writable=on,name=export1",
    ]  # fmt: skip


def _images(work: Path) -> None:
    base, top = work / "t.qcow2.base", work / "t.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(base), "128M").returncode == 0
    made = qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    assert made.returncode == 0, made.stderr


def _commit_argv(work: Path) -> list[str]:
    return [
        "--chardev", "stdio,id=stdio", "--monitor", "chardev=stdio",
        "--blockdev", "node-name=file0,driver=file,filename=t.qcow2",
        "--blockdev", "node-name=fmt0,driver=qcow2,file=file0",
    ]  # fmt: skip


def _run(prefix: list[str], work: Path, case: str = "stream") -> str:
    argv, qmp = (_stream_argv, STREAM_QMP) if case == "stream" else (_commit_argv, COMMIT_QMP)
    proc = subprocess.run(
        [*prefix, *argv(work)],
        input=qmp,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return _filter(proc.stdout)


def test_stream_refusal_over_stdio_is_qemus(tmp_path: Path) -> None:
    """A writable NBD export of the backing node: block-stream refuses (the job's
    intermediate node shares no write), with QEMU's text and events, over stdio."""
    _images(tmp_path)
    assert _run([sys.executable, "-m", "qsd_py"], tmp_path) == STREAM_OUT


@pytest.mark.realqsd
def test_stream_refusal_over_stdio_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    real_qsd = require_real_qsd()
    with shared_dir("qsd-jobs") as work:
        _images(work)
        prefix = [str(real_qsd), "run", "sh", "-c",
                  f'cd "{work}" && exec qemu-storage-daemon "$@"', "sh"]  # fmt: skip
        real = _run(prefix, work)
        (work / "nbd.sock").unlink(missing_ok=True)
        assert real == STREAM_OUT
        assert _run([sys.executable, "-m", "qsd_py"], work) == real


def test_commit_cancelled_at_quit_over_stdio_is_qemus(tmp_path: Path) -> None:
    """An active commit with nothing to commit, then quit at once: the job pauses at quit's
    drain and is cancelled before the quit's reply, which comes last, in QEMU's bytes (the
    events' members in QEMU's order too). The commands come in one read, so the job has not
    run when quit comes: QEMU's first form, every time."""
    _images(tmp_path)
    assert _run([sys.executable, "-m", "qsd_py"], tmp_path, "commit") == COMMIT_OUT
    info = qemu_img("info", "--output=json", str(tmp_path / "t.qcow2")).stdout
    assert '"backing-filename":' in info  # cancelled: the overlay keeps its backing file


@pytest.mark.realqsd
def test_commit_cancelled_at_quit_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    real_qsd = require_real_qsd()
    with shared_dir("qsd-jobs-commit") as work:
        _images(work)
        prefix = [str(real_qsd), "run", "sh", "-c",
                  f'cd "{work}" && exec qemu-storage-daemon "$@"', "sh"]  # fmt: skip
        assert _run(prefix, work, "commit") in COMMIT_OUT_FORMS
        assert _run([sys.executable, "-m", "qsd_py"], work, "commit") == COMMIT_OUT


def test_stdio_monitor_outlives_its_input(tmp_path: Path) -> None:
    """Commands piped in are answered on stdout (later options' nodes are there already);
    at the end of stdin the daemon goes on, as QEMU's does, until it is told to stop."""
    stdout = tmp_path / "out.txt"
    with stdout.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qsd_py", "--chardev", "stdio,id=m", "--monitor", "m",
             "--blockdev", "driver=null-co,node-name=late"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            query = '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}'
            proc.stdin.write('{"execute": "qmp_capabilities"}\n' + query + "\n")
            proc.stdin.close()
            deadline = time.monotonic() + 20
            while stdout.read_text().count("\n") < 3:
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, stdout.read_text()
                time.sleep(0.01)
            time.sleep(0.3)
            assert proc.poll() is None, "the daemon ended with its stdin"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = stdout.read_text().splitlines()
    assert lines[0].startswith('{"QMP": {"version": ') and lines[1] == '{"return": {}}'
    assert '"node-name": "late"' in lines[2]
