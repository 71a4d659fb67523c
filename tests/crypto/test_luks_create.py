"""blockdev-create of ``luks`` images: QEMU's layout and defaults (salts, key and UUID are
random, so the check is that qemu-img opens what qsd-py made, reads what was written with
the key and refuses a wrong one)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest

SECRET = "secret,id=s0,data=hunter2"


def _run_job(qmp, options: dict) -> list:
    qmp.cmd("blockdev-create", **{"job-id": "c0", "options": options})
    deadline = time.monotonic() + 30
    while True:
        (job,) = qmp.cmd("query-jobs")
        if job["status"] == "concluded":
            qmp.cmd("job-dismiss", id="c0")
            return job.get("error")
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize(
    "extra, spec",
    [
        ({}, ("aes-256", "xts", "plain64", None, "sha256", 2068480)),
        ({"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv",
          "hash-alg": "sha1"}, ("aes-128", "cbc", "essiv", "sha256", "sha1", 528384)),
    ],
    ids=["defaults", "aes-128-cbc-essiv"],
)  # fmt: skip
def test_create_opens_in_qemu_img(qsd, tmp_path: Path, extra: dict, spec: tuple) -> None:
    image = tmp_path / "new.luks"
    image.touch()
    daemon = qsd("--object", SECRET, "--blockdev",
                 f"driver=file,node-name=f0,filename={image}")  # fmt: skip
    qmp = daemon.qmp()
    try:
        options = {"driver": "luks", "file": "f0", "size": 1 << 20, "key-secret": "s0",
                   "iter-time": 50, **extra}  # fmt: skip
        assert _run_job(qmp, options) is None
        missing = {k: v for k, v in options.items() if k != "key-secret"}
        assert _run_job(qmp, missing) == "Parameter 'key-secret' is required for cipher"
    finally:
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(Exception):
            qmp.close()
        daemon.stop()
    alg, mode, ivgen, ivhash, hash_alg, payload = spec
    assert image.stat().st_size == payload + (1 << 20)
    opts = f"driver=luks,key-secret=s0,file.filename={image}"
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "--object", SECRET, "--image-opts", opts],
        check=True, capture_output=True, text=True).stdout)  # fmt: skip
    data = info["format-specific"]["data"]
    assert info["virtual-size"] == 1 << 20
    assert (data["cipher-alg"], data["cipher-mode"], data["ivgen-alg"], data.get("ivgen-hash-alg"),
            data["hash-alg"], data["payload-offset"]) == spec  # fmt: skip
    assert [s["active"] for s in data["slots"]] == [True] + [False] * 7
    io = subprocess.run(["qemu-io", "--object", SECRET, "--image-opts", opts,
                         "-c", "write -P 0x5c 512 70000", "-c", "read -P 0x5c 512 70000"],
                        capture_output=True, text=True)  # fmt: skip
    assert "read 70000/70000" in io.stdout, io.stdout + io.stderr
    wrong = subprocess.run(["qemu-io", "--object", "secret,id=s0,data=nope", "--image-opts",
                            opts, "-c", "read 0 512"], capture_output=True, text=True)  # fmt: skip
    assert "Invalid password, cannot unlock any keyslot" in wrong.stderr


def test_create_encrypted_qcow2(qsd, tmp_path: Path) -> None:
    image = tmp_path / "new.qcow2"
    image.touch()
    daemon = qsd("--object", SECRET, "--blockdev",
                 f"driver=file,node-name=f0,filename={image}")  # fmt: skip
    qmp = daemon.qmp()
    encrypt = {"format": "luks", "key-secret": "s0", "iter-time": 50}
    try:
        options = {"driver": "qcow2", "file": "f0", "size": 4 << 20, "encrypt": encrypt}
        no_key = {**options, "encrypt": {"format": "luks"}}
        assert _run_job(qmp, no_key) == "Parameter 'encrypt.key-secret' is required for cipher"
        assert _run_job(qmp, options) is None
    finally:
        with contextlib.suppress(Exception):
            qmp.cmd("quit")
        with contextlib.suppress(Exception):
            qmp.close()
        daemon.stop()
    opts = f"driver=qcow2,encrypt.key-secret=s0,file.filename={image}"
    check = subprocess.run(["qemu-img", "check", "--object", SECRET, "--image-opts", opts],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "--object", SECRET, "--image-opts", opts],
        check=True, capture_output=True, text=True).stdout)  # fmt: skip
    assert info["encrypted"] is True and info["virtual-size"] == 4 << 20
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
    io = subprocess.run(["qemu-io", "--object", SECRET, "--image-opts", opts,
                         "-c", "write -P 0x5c 512 70000", "-c", "read -P 0x5c 512 70000",
                         "-c", "read -P 0 80000 10000"],
                        capture_output=True, text=True)  # fmt: skip
    assert "read 70000/70000" in io.stdout and "read 10000/10000" in io.stdout, io.stdout
