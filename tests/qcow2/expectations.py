"""What QEMU 11.1 does with each damaged image, asked of the real tools through real-qsd.

For every damage in ``damage.DAMAGES`` the image is made in a directory under /tmp/qsd-cmp (seen
by the chroot) and opened by QEMU's qemu-storage-daemon with QMP ``blockdev-add`` (driver qcow2
over a file node), read-write and read-only, on fresh copies. The outcome is ``"ok"`` or the
error's ``desc``; a read-write open that changed the header (QEMU repairs dirty images, clears
unknown autoclear bits, drops stale bitmap extensions) records the SHA-256 of the header cluster
QEMU wrote, and the feature bits after it when they changed.
Runtime damages add the output of QEMU's qemu-io running each of the damage's commands, and the
incompatible feature bits after it (bit 1 = QEMU marked the image corrupt).

Never imported by the regular tests: it needs ../shared/tools/real-qsd.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import damage

SHARE = Path("/tmp/qsd-cmp")
OPEN_TIMEOUT = 10  # seconds: QEMU loops (and grows) forever on a backing file loop
JSON_PATH = Path(__file__).with_name("data") / "qemu-11.1-open.json"
REPO = Path(__file__).resolve().parents[2]
TOOL_CANDIDATES = [Path("/work/shared/tools/real-qsd"), REPO.parent / "shared/tools/real-qsd"]


def real_qsd_tool() -> Path:
    for tool in TOOL_CANDIDATES:
        if tool.exists():
            return tool
    raise RuntimeError("real-qsd (../shared/tools/real-qsd) is not there")


def qemu_version(tool: Path) -> str:
    out = subprocess.run(
        [str(tool), "run", "qemu-storage-daemon", "--version"], capture_output=True, text=True
    ).stdout
    return out.splitlines()[0].removeprefix("qemu-storage-daemon version ")


def open_with_qsd(
    tool: Path, img: Path, read_only: bool, options: dict[str, Any]
) -> tuple[str, list[str]]:
    """blockdev-add qcow2 over ``img`` in QEMU's daemon: ("ok" or the error desc, stderr lines).

    ``options`` are more arguments, with "$DIR" standing for the image's directory."""
    args = {
        "driver": "qcow2",
        "node-name": "q",
        "read-only": read_only,
        "file": {"driver": "file", "filename": str(img)},
        **json.loads(json.dumps(options).replace("$DIR", str(img.parent))),
    }
    commands = [
        {"execute": "qmp_capabilities"},
        {"execute": "blockdev-add", "arguments": args, "id": "add"},
        {"execute": "quit"},
    ]
    stdin = "".join(json.dumps(c) + "\n" for c in commands)
    argv = [str(tool), "run", "qemu-storage-daemon", "--chardev", "stdio,id=c", "--monitor", "c"]
    code, stdout, stderr = run_bounded(argv, stdin)
    if code is None:
        return HANG, stderr.splitlines()
    for line in stdout.splitlines():
        reply = json.loads(line)
        if reply.get("id") == "add":
            outcome = reply["error"]["desc"] if "error" in reply else "ok"
            return outcome, stderr.splitlines()
    raise RuntimeError(f"no blockdev-add reply: {stdout!r} {stderr!r}")


HANG = f"no reply within {OPEN_TIMEOUT} s"


def run_bounded(argv: list[str], stdin: str = "") -> tuple[int | None, str, str]:
    """Run a tool (real-qsd execs it: the child is the tool); kill it (SIGKILL: a daemon busy
    opening does not see SIGTERM) when it runs longer than OPEN_TIMEOUT. (exit code or None,
    stdout, stderr)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(stdin, timeout=OPEN_TIMEOUT)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out, err


def run_qemu_io(tool: Path, img: Path, command: str, read_only: bool) -> list[str]:
    """QEMU's qemu-io running one command; its output without the timing lines."""
    argv = [str(tool), "run", "qemu-io", "-f", "qcow2", *(["-r"] if read_only else [])]
    code, out, err = run_bounded([*argv, "-c", command, str(img)])
    lines = (out + err).splitlines() + ([HANG] if code is None else [])
    return [line for line in lines if " ops; " not in line]


def feature_bits(img: Path) -> dict[str, int]:
    if not img.exists() or img.stat().st_size < 96 or damage.get(img, "version") != 3:
        return {}
    return {
        "incompatible": damage.get(img, "incompatible_features"),
        "autoclear": damage.get(img, "autoclear_features"),
    }


def first_cluster(img: Path) -> bytes:
    """The header cluster (the first 2 MiB when its size is invalid)."""
    if not img.exists():
        return b""
    bits = damage.get(img, "cluster_bits") if img.stat().st_size >= 24 else 0
    with open(img, "rb") as f:
        return f.read(1 << bits if 9 <= bits <= 21 else 2 << 20)


def gather_one(tool: Path, dmg: damage.Damage, workdir: Path) -> dict[str, Any]:
    """The expectation record of one damage."""
    record: dict[str, Any] = {"kind": dmg.kind}
    for mode, read_only in (("read-write", False), ("read-only", True)):
        img = fresh(dmg, workdir)
        before = feature_bits(img)
        header_before = first_cluster(img)
        outcome, stderr = open_with_qsd(tool, img, read_only, dmg.options)
        record[mode] = normalize(outcome, workdir)
        warnings = [normalize(line, workdir) for line in stderr if line.strip()]
        if warnings:
            record[f"{mode} stderr"] = warnings
        header_after = first_cluster(img)
        if header_after != header_before:
            record[f"{mode} rewrote header"] = hashlib.sha256(header_after).hexdigest()
        after = feature_bits(img)
        if after != before:
            record[f"{mode} features after"] = after
    for command in dmg.io:
        modes = (("", False), (" -r", True)) if command.startswith("read") else (("", False),)
        for suffix, read_only in modes:
            img = fresh(dmg, workdir)
            out = run_qemu_io(tool, img, command, read_only)
            record[f"qemu-io{suffix} {command}"] = {
                "output": [normalize(line, workdir) for line in out],
                "incompatible after": feature_bits(img).get("incompatible"),
            }
    return record


def fresh(dmg: damage.Damage, workdir: Path) -> Path:
    """The damaged image made anew in an empty ``workdir``."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return dmg.make(workdir)


def normalize(text: str, workdir: Path) -> str:
    return text.replace(str(workdir), "$DIR")


def gather_all(ids: list[str] | None = None) -> dict[str, Any]:
    """Expectations for every damage (or those in ``ids``), with the QEMU version."""
    tool = real_qsd_tool()
    SHARE.mkdir(exist_ok=True)
    workdir = SHARE / f"qcow2-corpus-{uuid.uuid4().hex[:8]}"
    try:
        damages = {
            did: gather_one(tool, dmg, workdir)
            for did, dmg in damage.DAMAGES.items()
            if ids is None or did in ids
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"qemu": qemu_version(tool), "damages": damages}


def load() -> dict[str, Any]:
    return json.loads(JSON_PATH.read_text())


def dump(expectations: dict[str, Any]) -> str:
    return json.dumps(expectations, indent=1, sort_keys=False) + "\n"
