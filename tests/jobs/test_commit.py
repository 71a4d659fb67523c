"""block-commit and change-backing-file: QEMU 11.1's transcript (argument errors, what a
running commit blocks, pause/resume/cancel, intermediate and active commits, I/O errors on
the base under each on-error policy, the backing file names left in the images), and both
kinds of commit under NBD write load (no write lost, the images then stand as QEMU's)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import commit_script
import pytest
from conversation import Daemon
from test_mirror import Writer, model_after, qemu_img, read_export, wait_job
from test_stream import _chain

MIB = 1 << 20


def test_transcript_is_qemus(tmp_path: Path) -> None:
    want = json.loads(commit_script.DATA.read_text())
    assert commit_script.run_script(False, tmp_path) == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("commit-live") as work:
        real = commit_script.run_script(True, work)
        assert commit_script.run_script(False, work) == real


def _serve_top(d: Daemon, sock: Path) -> str:
    """base <- mid <- top as nodes, top exported writable over NBD; the export's URI."""
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        opts: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "filename": f"{name}.qcow2"},
        }
        if backing:
            opts["backing"] = backing
        assert d.cmd("blockdev-add", opts) == {"return": {}}
    addr = {"type": "unix", "data": {"path": str(sock)}}
    assert d.cmd("nbd-server-start", {"addr": addr}) == {"return": {}}
    export = {"type": "nbd", "id": "e", "node-name": "top", "name": "d", "writable": True}
    assert d.cmd("block-export-add", export) == {"return": {}}
    return f"nbd+unix:///d?socket={sock}"


def _explain(got: bytes, model: bytes, seed: int, writes: int) -> str:
    """Where the export differs from the model first, and the writes that covered it."""
    import test_mirror

    at = next(i for i in range(len(model)) if got[i] != model[i])
    rng = random.Random(seed)
    covering = []
    for n in range(writes):
        off, length, byte = test_mirror.pick(rng, len(model))  # type: ignore[attr-defined]
        if off <= at < off + length:
            covering.append((n + 1, off, length, byte))
    return f"first difference at {at}: {got[at]:#x} != {model[at]:#x}; writes there {covering}"


def _clean_and_equal(tmp_path: Path, model: bytes, image: str) -> None:
    check = qemu_img("check", str(tmp_path / image))
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "model.raw").write_bytes(model)
    same = qemu_img("compare", "-F", "qcow2", str(tmp_path / "model.raw"), str(tmp_path / image))
    assert same.returncode == 0, same.stdout + same.stderr


def _backing_of(path: Path) -> str | None:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)
    return info.get("backing-filename")


def test_intermediate_commit_under_nbd_load(tmp_path: Path) -> None:
    """Writes (each read back) through a writable NBD export of top while mid is committed
    into base: the export equals the model, top's image then names base.qcow2, base holds
    what the chain showed before the writes, and top over base holds every write."""
    size = 8 * MIB
    initial = _chain(tmp_path, size)
    d = Daemon(tmp_path, real=False)
    writer = None
    try:
        uri = _serve_top(d, tmp_path / "nbd.sock")
        writer = Writer(uri, 31, tmp_path / "stop")
        writer.wait_for(20)
        args = {"job-id": "c", "device": "top", "top-node": "mid", "speed": 4 * MIB}
        assert d.cmd("block-commit", args) == {"return": {}}
        writer.wait_for(40)
        wait_job(d, "c", None)
        writer.wait_for(10)
        written = writer.finish()
        events = d.events()
        done = [e["data"] for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done and "error" not in done[0] and done[0]["type"] == "commit"
        assert "BLOCK_JOB_READY" not in [e["event"] for e in events]
        model = model_after(initial, 31, written)
        got = read_export(uri, size)
        assert got == model, _explain(got, model, 31, written)
    finally:
        if writer is not None and writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.wait()
        d.close()
    assert _backing_of(tmp_path / "top.qcow2") == "base.qcow2"
    _clean_and_equal(tmp_path, model, "top.qcow2")
    _clean_and_equal(tmp_path, initial, "base.qcow2")


def test_active_commit_under_nbd_load_pivots_to_base(tmp_path: Path) -> None:
    """Writes through the export of top before, during and after an active commit of the
    whole chain: ready, then complete moves the export to base, which alone (no backing
    file) holds every acknowledged write."""
    size = 8 * MIB
    initial = _chain(tmp_path, size)
    d = Daemon(tmp_path, real=False)
    writer = None
    try:
        uri = _serve_top(d, tmp_path / "nbd.sock")
        writer = Writer(uri, 32, tmp_path / "stop")
        writer.wait_for(20)
        args = {"job-id": "a", "device": "top", "speed": 64 * MIB}
        assert d.cmd("block-commit", args) == {"return": {}}
        wait_job(d, "a", "ready")
        writer.wait_for(30)  # dirtied again while ready
        before = writer.count
        assert d.cmd("job-complete", {"id": "a"}) == {"return": {}}
        wait_job(d, "a", None)
        writer.wait_for(30)  # now landing on base
        written = writer.finish()
        assert written >= before + 30
        names = [e["event"] for e in d.events()]
        assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED")
        model = model_after(initial, 32, written)
        got = read_export(uri, size)
        assert got == model, _explain(got, model, 32, written)
        assert d.cmd("query-block-exports")["return"][0]["node-name"] == "base"
    finally:
        if writer is not None and writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.wait()
        d.close()
    assert _backing_of(tmp_path / "base.qcow2") is None
    _clean_and_equal(tmp_path, model, "base.qcow2")


def test_commit_grows_a_shorter_base(tmp_path: Path) -> None:
    """A 1 MiB base under a 2 MiB top with data in its second MiB: both kinds of commit
    grow the base to the top's length first (QEMU's commit_run and mirror_run)."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=tmp_path)  # noqa: E731
    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    run("qemu-io", "-c", "write -P 5 0 1M", "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    run("qemu-img", "resize", "-q", "top.qcow2", "2M")
    run("qemu-io", "-c", "write -P 6 1536k 64k", "top.qcow2")
    model = bytes([5]) * MIB + bytes(MIB // 2) + bytes([6]) * 65536 + bytes(MIB // 2 - 65536)
    d = Daemon(tmp_path, real=False)
    try:
        for name, backing in (("base", None), ("top", "base")):
            opts: dict[str, Any] = {
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": f"{name}.qcow2"},
            }
            if backing:
                opts["backing"] = backing
            assert d.cmd("blockdev-add", opts) == {"return": {}}
        assert d.cmd("block-commit", {"job-id": "a", "device": "top"}) == {"return": {}}
        wait_job(d, "a", "ready")
        assert d.cmd("job-complete", {"id": "a"}) == {"return": {}}
        wait_job(d, "a", None)
        done = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done and "error" not in done[0]
    finally:
        d.close()
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "base.qcow2")).stdout)
    assert info["virtual-size"] == 2 * MIB
    _clean_and_equal(tmp_path, model, "base.qcow2")


def test_change_backing_file_writes_qemus_header(tmp_path: Path) -> None:
    """change-backing-file to a name and to '' writes the header QEMU writes: an empty name
    is recorded (offset set, length 0) with the image's own format kept as backing format."""
    _chain(tmp_path, MIB)
    d = Daemon(tmp_path, real=False)
    try:
        for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
            opts: dict[str, Any] = {
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": f"{name}.qcow2"},
            }
            if backing:
                opts["backing"] = backing
            assert d.cmd("blockdev-add", opts) == {"return": {}}
        args = {"device": "top", "image-node-name": "top", "backing-file": "other.qcow2"}
        assert d.cmd("change-backing-file", args) == {"return": {}}
        args = {"device": "top", "image-node-name": "mid", "backing-file": ""}
        assert d.cmd("change-backing-file", args) == {"return": {}}
    finally:
        d.close()
    head = (tmp_path / "top.qcow2").read_bytes()[:4096]
    off, n = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
    assert head[off : off + n] == b"other.qcow2"
    head = (tmp_path / "mid.qcow2").read_bytes()[:4096]
    off, n = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
    assert off != 0 and n == 0
    assert _backing_of(tmp_path / "mid.qcow2") is None
    assert b"\xe2\x79\x2a\xca\x00\x00\x00\x05qcow2" in head  # backing format extension


def test_fuse_exports_with_both_commits(tmp_path: Path) -> None:
    """A writable FUSE export of top holds the resize permission the active commit's filter
    node does not share: refused with QEMU's text (created, then null); an intermediate
    commit takes no such permission and runs while the file is written. A read-only FUSE
    export then follows an active commit's pivot to base."""
    size = 2 * MIB
    initial = _chain(tmp_path, size)
    mnt = tmp_path / "mnt"
    mnt.touch()
    d = Daemon(tmp_path, real=False)
    try:
        for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
            opts: dict[str, Any] = {
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": f"{name}.qcow2"},
            }
            if backing:
                opts["backing"] = backing
            assert d.cmd("blockdev-add", opts) == {"return": {}}
        export = {"type": "fuse", "id": "f", "node-name": "top", "mountpoint": str(mnt)}
        assert d.cmd("block-export-add", {**export, "writable": True}) == {"return": {}}
        desc = d.cmd("block-commit", {"job-id": "a", "device": "top"})["error"]["desc"]
        pattern = (
            r"Permission conflict on node '(#block\d+)': permissions 'resize' are both "
            r"required by an unnamed block device \(uses node '\1' as 'root' child\) and "
            r"unshared by commit job 'a' \(uses node '\1' as 'main node' child\)\."
        )
        assert re.fullmatch(pattern, desc), desc
        assert [e["data"]["status"] for e in d.events()] == ["created", "null"]
        args = {"job-id": "c", "device": "top", "top-node": "mid", "speed": 2 * MIB}
        assert d.cmd("block-commit", args) == {"return": {}}
        model = bytearray(initial)
        with open(mnt, "r+b") as f:
            for i in range(16):
                off = (i * 131072 + 4096) % size
                f.seek(off)
                f.write(bytes([0x40 + i]) * 4096)
                model[off : off + 4096] = bytes([0x40 + i]) * 4096
                f.flush()
                os.fsync(f.fileno())
        wait_job(d, "c", None)
        assert mnt.read_bytes() == model
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
        wait_export_gone(d, "f")
        assert d.cmd("block-export-add", export) == {"return": {}}
        assert d.cmd("block-commit", {"job-id": "a", "device": "top"}) == {"return": {}}
        wait_job(d, "a", "ready")
        assert d.cmd("job-complete", {"id": "a"}) == {"return": {}}
        wait_job(d, "a", None)
        assert d.cmd("query-block-exports")["return"][0]["node-name"] == "base"
        assert mnt.read_bytes() == model
        done = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert len(done) == 2 and not any("error" in x for x in done)
        assert d.cmd("block-export-del", {"id": "f"}) == {"return": {}}
        wait_export_gone(d, "f")
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    assert _backing_of(tmp_path / "top.qcow2") == "base.qcow2"
    _clean_and_equal(tmp_path, bytes(model), "base.qcow2")


def wait_export_gone(d: Daemon, export: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(e["id"] == export for e in d.cmd("query-block-exports")["return"]):
        assert time.monotonic() < deadline, f"export {export} still there"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["intermediate", "active"])
def test_quit_while_a_commit_runs(tmp_path: Path, kind: str) -> None:
    """``quit`` while a speed-limited commit runs: the daemon exits cleanly, every image
    checks clean, the chain still reads as before (base's new clusters are invisible under
    the images that hold those ranges) and top still names mid."""
    size = 4 * MIB
    initial = _chain(tmp_path, size)
    d = Daemon(tmp_path, real=False)
    try:
        for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
            opts: dict[str, Any] = {
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": f"{name}.qcow2"},
            }
            if backing:
                opts["backing"] = backing
            assert d.cmd("blockdev-add", opts) == {"return": {}}
        args: dict[str, Any] = {"job-id": "c", "device": "top", "speed": MIB}
        if kind == "intermediate":
            args["top-node"] = "mid"
        assert d.cmd("block-commit", args) == {"return": {}}
        wait_job(d, "c", "running")
        time.sleep(0.3)
        assert d.cmd("query-jobs")["return"][0]["status"] == "running"
        assert d.cmd("quit") == {"return": {}}
        assert d.proc.wait(20) == 0
    finally:
        d.close()
    for name in ("base", "mid", "top"):
        check = qemu_img("check", str(tmp_path / f"{name}.qcow2"))
        assert check.returncode == 0, check.stdout + check.stderr
    assert _backing_of(tmp_path / "top.qcow2") == "mid.qcow2"
    _clean_and_equal(tmp_path, initial, "top.qcow2")


def test_full_base_file_system(tmp_path: Path, tiny_tmpfs: Any) -> None:
    """A raw base on a 1 MiB tmpfs under 3 MiB of mid's data: on-error enospc stops the
    intermediate commit (BLOCK_JOB_ERROR, io-status nospace), a resume once there is room
    finishes it (base holds the chain's data, top names base); report fails a job with the
    error and leaves top naming mid."""
    mnt = tiny_tmpfs.path
    d = None
    size = 4 * MIB
    base = mnt / "base.raw"
    data = random.Random(3).randbytes(3 * MIB)
    model = data + bytes(size - len(data))
    (tmp_path / "mid.raw").write_bytes(model)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=tmp_path)  # noqa: E731
    try:
        for attempt in ("report", "enospc"):
            with open(base, "wb") as f:  # empty and sparse, and no room
                f.truncate(size)
            tiny_tmpfs.resize("1m")
            for img in ("mid.qcow2", "top.qcow2"):
                (tmp_path / img).unlink(missing_ok=True)
            run("qemu-img", "convert", "-O", "qcow2", "mid.raw", "mid.qcow2")
            run("qemu-img", "rebase", "-u", "-b", str(base), "-F", "raw", "mid.qcow2")
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                "top.qcow2")  # fmt: skip
            d = Daemon(tmp_path, real=False)
            nodes = (
                {"driver": "raw", "node-name": "base",
                 "file": {"driver": "file", "filename": str(base)}},
                {"driver": "qcow2", "node-name": "mid", "backing": "base",
                 "file": {"driver": "file", "filename": "mid.qcow2"}},
                {"driver": "qcow2", "node-name": "top", "backing": "mid",
                 "file": {"driver": "file", "filename": "top.qcow2"}},
            )  # fmt: skip
            for opts in nodes:
                assert d.cmd("blockdev-add", opts) == {"return": {}}
            args = {"job-id": "c", "device": "top", "top-node": "mid", "on-error": attempt}
            assert d.cmd("block-commit", args) == {"return": {}}
            if attempt == "report":
                wait_job(d, "c", None)
                ends = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
                assert ends[-1]["error"] == os.strerror(28)
                d.close()
                d = None
                assert _backing_of(tmp_path / "top.qcow2") == "mid.qcow2"
                continue
            wait_job(d, "c", "paused")
            info = d.cmd("query-block-jobs")["return"][0]
            assert info["io-status"] == "nospace" and info["paused"] is True
            errors = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_ERROR"]
            assert errors[0] == {"device": "c", "operation": "write", "action": "stop"}
            tiny_tmpfs.resize("8m")
            assert d.cmd("block-job-resume", {"device": "c"}) == {"return": {}}
            wait_job(d, "c", None)
            ends = [e["data"] for e in d.events() if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert ends and "error" not in ends[-1]
            d.close()
            d = None
        assert _backing_of(tmp_path / "top.qcow2") == str(base)
        check = qemu_img("check", str(tmp_path / "top.qcow2"))
        assert check.returncode == 0, check.stdout + check.stderr
        same = qemu_img("compare", "-f", "raw", "-F", "raw", str(tmp_path / "mid.raw"), str(base))
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        if d is not None:
            d.close()
