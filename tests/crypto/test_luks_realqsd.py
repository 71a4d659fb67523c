"""Encrypted images side by side with QEMU 11.1's qemu-storage-daemon (optional:
``--real-qsd``): the same error text for each damaged LUKS header, wrong or missing key and
qcow2 encryption option, and the same query-named-block-nodes for luks and encrypted qcow2
nodes."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from realqsd_support import real_named_nodes, run_real, shared_dir
from support import run_qsd
from test_luks import FUZZ, SECRET, make_luks

pytestmark = pytest.mark.realqsd


@pytest.fixture(scope="module")
def share() -> Iterator[Path]:
    with shared_dir("luks") as path:
        make_luks(path / "base.luks")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "--object", SECRET, "-o",
             "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100",
             str(path / "enc.qcow2"), "1M"],
            check=True,
        )  # fmt: skip
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "plain.qcow2"),
                        "1M"], check=True)  # fmt: skip
        yield path


def _errors(text: str, program: str) -> list[str]:
    return [line.removeprefix(f"{program}: ") for line in text.splitlines() if line.strip()]


def _same_error(args: list[str]) -> None:
    real_code, real_err = run_real(args, timeout=30)
    ours = run_qsd(args, timeout=30)
    assert real_code == ours.returncode == 1, (real_err, ours.stderr)
    assert _errors(ours.stderr, "qsd-py") == _errors(real_err, "qemu-storage-daemon")


@pytest.mark.parametrize("case", FUZZ)
def test_damaged_headers_as_qemu(share: Path, case: str) -> None:
    damage, _text = FUZZ[case]
    bad = share / f"{case}.luks"
    bad.write_bytes(damage((share / "base.luks").read_bytes()))
    _same_error(["--object", SECRET, "--blockdev",
                 f"driver=luks,node-name=l0,key-secret=s0,file.driver=file,"
                 f"file.filename={bad}"])  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["--object", "secret,id=s0,data=wrong",
         "--blockdev", "driver=luks,node-name=l0,key-secret=s0,file.driver=file,"
         "file.filename={d}/base.luks"],
        ["--blockdev", "driver=luks,node-name=l0,file.driver=file,file.filename={d}/base.luks"],
        ["--blockdev", "driver=luks,node-name=l0,key-secret=s9,file.driver=file,"
         "file.filename={d}/base.luks"],
        ["--blockdev", "driver=qcow2,node-name=q0,file.driver=file,"
         "file.filename={d}/enc.qcow2"],
        ["--object", "secret,id=s0,data=wrong",
         "--blockdev", "driver=qcow2,node-name=q0,encrypt.format=luks,encrypt.key-secret=s0,"
         "file.driver=file,file.filename={d}/enc.qcow2"],
        ["--object", SECRET,
         "--blockdev", "driver=qcow2,node-name=q0,encrypt.format=aes,encrypt.key-secret=s0,"
         "file.driver=file,file.filename={d}/enc.qcow2"],
        ["--object", SECRET,
         "--blockdev", "driver=qcow2,node-name=q0,encrypt.format=luks,encrypt.key-secret=s0,"
         "file.driver=file,file.filename={d}/plain.qcow2"],
    ],
    ids=["wrong-password", "no-key", "no-secret", "qcow2-no-key", "qcow2-wrong-password",
         "qcow2-aes-format", "qcow2-not-encrypted"],
)  # fmt: skip
def test_key_errors_as_qemu(share: Path, args: list[str]) -> None:
    _same_error([arg.format(d=share) for arg in args])


@pytest.mark.parametrize(
    "blockdevs",
    [
        ["driver=file,node-name=f0,filename={d}/base.luks",
         "driver=luks,node-name=l0,file=f0,key-secret=s0"],
        ["driver=file,node-name=f0,filename={d}/enc.qcow2",
         "driver=qcow2,node-name=q0,file=f0,encrypt.format=luks,encrypt.key-secret=s0"],
    ],
    ids=["luks", "qcow2"],
)  # fmt: skip
def test_named_nodes_as_qemu(qsd, share: Path, blockdevs: list[str]) -> None:
    args = ["--object", SECRET]
    for blockdev in blockdevs:
        args += ["--blockdev", blockdev.format(d=share)]
    theirs = real_named_nodes(args, share)
    daemon = qsd(*args)
    client = daemon.qmp()
    try:
        ours = client.cmd("query-named-block-nodes")
    finally:
        with contextlib.suppress(OSError):
            client.close()
    daemon.kill()
    assert ours[0]["encrypted"] is True
    assert ours == theirs


def _create_with(qmp, options: dict) -> None:
    import time

    qmp.cmd("blockdev-create", **{"job-id": "c0", "options": options})
    deadline = time.monotonic() + 60
    while True:
        (job,) = qmp.cmd("query-jobs")
        if job["status"] == "concluded":
            qmp.cmd("job-dismiss", id="c0")
            assert job.get("error") is None, job
            return
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_created_layout_as_qemu(qsd, share: Path, fmt: str) -> None:
    """blockdev-create of both daemons: the same file, but for the LUKS header's random
    bytes (salts, master key, UUID, PBKDF2 counts); that qemu-img opens qsd-py's images
    with the key is test_luks_create.py's."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    from realqsd_support import real_daemon

    key = {"key-secret": "s0", "iter-time": 50}
    if fmt == "luks":
        options = {"driver": "luks", "size": 4 << 20, **key}
    else:
        options = {"driver": "qcow2", "size": 4 << 20, "encrypt": {"format": "luks", **key}}
    images = {}
    for who in ("theirs", "ours"):
        image = share / f"{who}.{fmt}"
        image.touch()
        args = ["--object", SECRET, "--blockdev", f"driver=file,node-name=f0,filename={image}"]
        if who == "theirs":
            qmp_path = share / "create-qmp.sock"
            with real_daemon(args, qmp_path):
                client = QEMUMonitorProtocol(str(qmp_path))
                client.connect()
                try:
                    _create_with(client, {**options, "file": "f0"})
                finally:
                    client.close()
        else:
            daemon = qsd(*args)
            client = daemon.qmp()
            try:
                _create_with(client, {**options, "file": "f0"})
            finally:
                with contextlib.suppress(OSError):
                    client.close()
            daemon.kill()
        images[who] = image.read_bytes()
    theirs, ours = images["theirs"], images["ours"]
    assert len(ours) == len(theirs)
    start = theirs.index(b"LUKS\xba\xbe")
    assert ours.index(b"LUKS\xba\xbe") == start
    # The header's fixed fields: cipher, mode, hash, payload offset, key length.
    assert ours[start : start + 112] == theirs[start : start + 112]
    slots_at = start + 208
    for i in range(8):  # placement and stripes of each slot, active or not
        a = ours[slots_at + 48 * i :][:48]
        b = theirs[slots_at + 48 * i :][:48]
        assert (a[:4], a[40:]) == (b[:4], b[40:])
    payload = int.from_bytes(theirs[start + 104 : start + 108], "big") * 512
    if fmt == "qcow2":  # everything outside the LUKS clusters is the same
        end = start + -(-payload // 65536) * 65536
        assert ours[:start] == theirs[:start] and ours[end:] == theirs[end:]
