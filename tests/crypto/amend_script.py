"""LUKS key slot changes through x-blockdev-amend, held against QEMU 11.1 (test_luks_amend.py):
one conversation per image kind (a ``luks`` node, a qcow2 node with ``encrypt``) that adds
and erases key slots and tries each refusal QEMU has, with the job's events and error after
each amend, and the slots' states as query-named-block-nodes shows them; afterwards which
passphrases open the image. ``python amend_script.py`` records QEMU 11.1's transcript into
data/amend_events.json (needs real-qsd); the images are made by the host's qemu-img with
small iteration counts (the conversation's own amends ask for 10 ms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from host_qemu_img import create_encrypted

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "amend_events.json"
PASSWORDS = {"s0": "alpha", "s1": "bravo", "s2": "charlie"}
OBJECTS = [f"secret,id={k},data={v}" for k, v in PASSWORDS.items()]
KINDS = ("luks", "qcow2")

# (state, other options, force): each one amend, in order.
STEPS: list[tuple[str, dict[str, Any], bool]] = [
    ("active", {"new-secret": "s1"}, False),
    ("active", {"new-secret": "s2", "keyslot": 1}, False),
    ("active", {"new-secret": "s2", "keyslot": 8}, False),
    ("active", {"new-secret": "s2", "keyslot": -1}, False),
    ("active", {}, False),
    ("active", {"new-secret": "s2", "old-secret": "s0"}, False),
    ("active", {"new-secret": "s2", "secret": "s2"}, False),
    ("active", {"new-secret": "s9"}, False),
    ("inactive", {"keyslot": 5}, False),
    ("inactive", {}, False),
    ("inactive", {"keyslot": 9}, False),
    ("inactive", {"new-secret": "s1"}, False),
    ("inactive", {"iter-time": 10}, False),
    ("inactive", {"secret": "s0"}, False),
    ("inactive", {"old-secret": "s2"}, False),
    ("inactive", {"old-secret": "s9"}, False),
    ("inactive", {"old-secret": "s1", "keyslot": 0}, False),
    ("inactive", {"old-secret": "s0"}, False),
    ("inactive", {"keyslot": 1}, False),
    ("inactive", {"old-secret": "s1"}, False),
    ("active", {"new-secret": "s2"}, False),
    ("active", {"new-secret": "s2", "secret": "s1", "keyslot": 7}, False),
    ("inactive", {"keyslot": 3}, True),
    ("active", {"new-secret": "s0", "secret": "s2", "keyslot": 7}, True),
    ("inactive", {"old-secret": "s1"}, False),
]


def make_image(path: Path, kind: str) -> None:
    """An image of the host's qemu-img with key slot 0 for s0 and known data."""
    opts = "key-secret=s0,iter-time=10" if kind == "luks" else (
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10")  # fmt: skip
    create_encrypted(path, kind, OBJECTS[0], opts, "1M")


def node_options(kind: str, path: Path) -> dict[str, Any]:
    file = {"driver": "file", "filename": str(path)}
    if kind == "luks":
        return {"driver": "luks", "node-name": "n0", "key-secret": "s0", "file": file}
    return {"driver": "qcow2", "node-name": "n0", "file": file,
            "encrypt": {"format": "luks", "key-secret": "s0"}}  # fmt: skip


def amend_options(kind: str, state: str, extra: dict[str, Any]) -> dict[str, Any]:
    luks = {"state": state, **extra}
    if state == "active" and "iter-time" not in luks:
        luks["iter-time"] = 10
    if kind == "luks":
        return {"driver": "luks", **luks}
    return {"driver": "qcow2", "encrypt": {"format": "luks", **luks}}


def _slots(d: Any) -> Any:
    nodes = d.cmd("query-named-block-nodes")["return"]
    (node,) = [n for n in nodes if n["node-name"] == "n0"]
    data = node["image"]["format-specific"]["data"]
    data = data.get("encrypt", data)
    return [s["active"] for s in data["slots"]]


def run_kind(workdir: Path, real: bool, kind: str) -> list[Any]:
    from conversation import Daemon

    path = workdir / f"amend.{kind}"
    make_image(path, kind)
    d = Daemon(workdir, real, [a for o in OBJECTS for a in ("--object", o)])
    out: list[Any] = [{"kind": kind}]
    try:
        reply = d.cmd("blockdev-add", node_options(kind, path))
        out.append({"cmd": "blockdev-add", "reply": reply})
        if kind == "qcow2":
            bad = {"driver": "qcow2", "encrypt": {"format": "qcow"}}
            out += _amend(d, bad, False)
        for state, extra, force in STEPS:
            out += _amend(d, amend_options(kind, state, extra), force)
            out.append({"slots": _slots(d)})
    finally:
        d.close()
    out.append({"opens": {sid: opens(path, kind, sid) for sid in PASSWORDS}})
    return out + _read_only(workdir, real, kind, path)


def _read_only(workdir: Path, real: bool, kind: str, path: Path) -> list[Any]:
    """An amend of a read-only node: the luks driver refuses the command (its job created
    and gone), qcow2's job fails at its first write."""
    from conversation import Daemon

    d = Daemon(workdir, real, [a for o in OBJECTS for a in ("--object", o)])
    out: list[Any] = [{"read-only": kind}]
    try:
        node = {**node_options(kind, path), "read-only": True}
        out.append({"cmd": "blockdev-add", "reply": d.cmd("blockdev-add", node)})
        options = amend_options(kind, "active", {"new-secret": "s1"})
        args = {"job-id": "a0", "node-name": "n0", "options": options}
        out.append({"amend": options, "reply": d.cmd("x-blockdev-amend", args)})
        out.append({"events": d.settle("a0")})
        out.append({"jobs": d.cmd("query-jobs")["return"]})
    finally:
        d.close()
    return out


def _amend(d: Any, options: dict[str, Any], force: bool) -> list[Any]:
    args: dict[str, Any] = {"job-id": "a0", "node-name": "n0", "options": options}
    if force:
        args["force"] = True
    out: list[Any] = [{"amend": options, "force": force, "reply": d.cmd("x-blockdev-amend", args)}]
    out.append({"events": d.settle("a0")})
    (job,) = d.cmd("query-jobs")["return"]
    out.append({"error": job.get("error")})
    out.append({"dismiss": d.cmd("job-dismiss", {"id": "a0"})})
    return out


def opens(path: Path, kind: str, sid: str) -> bool:
    """Whether the host's qemu-img opens ``path`` with secret ``sid``'s passphrase."""
    key = "key-secret" if kind == "luks" else "encrypt.key-secret"
    done = subprocess.run(
        ["qemu-io", "-r", "--object", f"secret,id=k,data={PASSWORDS[sid]}", "--image-opts",
         f"driver={kind},{key}=k,file.filename={path}", "-c", "read 0 512"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 or "Invalid password" in done.stderr, done.stderr
    return done.returncode == 0


def run_script(real: bool, workdir: Path) -> list[Any]:
    return [entry for kind in KINDS for entry in run_kind(workdir, real, kind)]


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "jobs")]
    work = Path("/tmp/qsd-cmp/amend-record")
    os.makedirs(work, exist_ok=True)
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(run_script(True, work), indent=1) + "\n")
    print(f"wrote {DATA}")
