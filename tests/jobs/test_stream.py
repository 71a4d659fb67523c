"""block-stream: QEMU 11.1's transcript, and a stream under NBD write load (no guest write
lost to the copy-on-read, the image then stands alone or on its new base)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import stream_script
from conversation import Daemon
from test_mirror import Writer, model_after, qemu_img, read_export, wait_job

MIB = 1 << 20


def test_transcript_is_qemus(tmp_path: Path) -> None:
    want = json.loads(stream_script.DATA.read_text())
    assert stream_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("stream-live") as work:
        real = stream_script.run_script(True, work)
        assert stream_script.run_script(False, work) == real


def _chain(tmp_path: Path, size: int) -> bytes:
    """base (random data) <- mid (random data in its second quarter) <- top (empty); the
    bytes the chain shows."""
    base = random.Random(11).randbytes(size)
    (tmp_path / "base.raw").write_bytes(base)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=tmp_path)  # noqa: E731
    run("qemu-img", "convert", "-O", "qcow2", "base.raw", "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    quarter = size // 4
    mid = random.Random(12).randbytes(quarter)
    (tmp_path / "mid.part").write_bytes(mid)
    run("qemu-io", "-c", f"write -P 7 {quarter} {quarter}", "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    return base[:quarter] + bytes([7]) * quarter + base[2 * quarter :]


@pytest.mark.parametrize("base", [None, "base"])
def test_stream_under_nbd_load(tmp_path: Path, base: str | None) -> None:
    """Writes (each read back) through a writable NBD export of the top while it streams:
    the export equals the model, the image has the new backing file (or none), qemu-img
    compare against the model and qemu-img check are clean."""
    size = 8 * MIB
    initial = _chain(tmp_path, size)
    sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, real=False)
    writer = None
    try:
        assert d.cmd(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top",
                "file": {"driver": "file", "filename": "top.qcow2"},
            },
        ) == {"return": {}}
        addr = {"type": "unix", "data": {"path": str(sock)}}
        assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
        export = {"type": "nbd", "id": "e", "node-name": "top", "name": "d", "writable": True}
        assert d.cmd("block-export-add", export) == {"return": {}}
        uri = f"nbd+unix:///d?socket={sock}"
        writer = Writer(uri, 21, tmp_path / "stop")
        writer.wait_for(20)
        args = {"job-id": "s", "device": "top", "speed": 16 * MIB}
        if base is not None:
            args["base"] = "base.qcow2"
        assert d.cmd("block-stream", args) == {"return": {}}
        writer.wait_for(40)
        wait_job(d, "s", None)
        written = writer.finish()
        done = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done and "error" not in done[0]
        model = model_after(initial, 21, written)
        assert read_export(uri, size) == model
    finally:
        if writer is not None and writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.wait()
        d.close()
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "top.qcow2")).stdout)
    assert info.get("backing-filename") == (None if base is None else "base.qcow2")
    check = qemu_img("check", str(tmp_path / "top.qcow2"))
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "model.raw").write_bytes(model)
    same = qemu_img(
        "compare", "-F", "qcow2", str(tmp_path / "model.raw"), str(tmp_path / "top.qcow2")
    )
    assert same.returncode == 0, same.stdout + same.stderr


def test_block_job_change_is_refused(tmp_path: Path) -> None:
    """QEMU 11.1's stream driver has no change: either type's options are refused so."""
    stream_script.make_chain(tmp_path)
    d = Daemon(tmp_path, real=False)
    try:
        for cmd in stream_script.SCRIPT[:3]:
            assert d.cmd(*cmd) == {"return": {}}
        assert d.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 1}) == {"return": {}}
        for opts in ({"type": "stream"}, {"type": "mirror", "copy-mode": "write-blocking"}):
            reply = d.cmd("block-job-change", {"id": "s", **opts})
            assert reply["error"]["desc"] == "Job type does not support change"
        assert d.cmd("block-job-cancel", {"device": "s"}) == {"return": {}}
        wait_job(d, "s", None)
    finally:
        d.close()
