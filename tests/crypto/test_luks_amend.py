"""x-blockdev-amend of LUKS key slots (amend_script.py): qsd-py's transcript (job events,
errors, slot states, which passphrases open the image afterwards in qemu-io) equals QEMU
11.1's recorded one; with ``--real-qsd`` QEMU's daemon runs the same conversation, and each
tool opens the image the other amended."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "jobs")]

import amend_script  # noqa: E402


@pytest.mark.parametrize("kind", amend_script.KINDS)
def test_amend_as_qemu_recorded(tmp_path: Path, kind: str) -> None:
    recorded = json.loads(amend_script.DATA.read_text())
    start = recorded.index({"kind": kind})
    end = next((i for i in range(start + 1, len(recorded)) if "kind" in recorded[i]),
               len(recorded))  # fmt: skip
    assert amend_script.run_kind(tmp_path, False, kind) == recorded[start:end]


def test_erased_slot_material_is_gone(tmp_path: Path) -> None:
    """An erased slot's key material is overwritten: the bytes qemu-img wrote there are
    not in the file any more, and the header says disabled, salt zeroed."""
    from qsd_py.block.crypto import luks

    path = tmp_path / "a.luks"
    amend_script.make_image(path, "luks")
    before = luks.parse_header(path.read_bytes())
    off = before.slots[0].key_offset * 512
    material = path.read_bytes()[off : off + 4096]
    from conversation import Daemon

    d = Daemon(tmp_path, False, [a for o in amend_script.OBJECTS for a in ("--object", o)])
    try:
        d.cmd("blockdev-add", amend_script.node_options("luks", path))
        amend_script._amend(d, amend_script.amend_options("luks", "active",
                                                          {"new-secret": "s1"}), False)  # fmt: skip
        out = amend_script._amend(d, amend_script.amend_options("luks", "inactive",
                                                                {"keyslot": 0}), False)  # fmt: skip
        assert {"error": None} in out
    finally:
        d.close()
    data = path.read_bytes()
    after = luks.parse_header(data)
    assert data[off : off + 4096] != material
    assert (after.slots[0].active, after.slots[0].iterations, after.slots[0].salt) == (
        luks.SLOT_DISABLED,
        0,
        bytes(32),
    )
    assert after.slots[1].active == luks.SLOT_ACTIVE and after.slots[1].iterations >= 1000


@pytest.mark.realqsd
@pytest.mark.parametrize("kind", amend_script.KINDS)
def test_amend_as_qemu_live(kind: str) -> None:
    """Both daemons, same conversation; then each opens the other's result with the one
    passphrase left (QEMU 11.1's qemu-io for qsd-py's image, qsd-py for QEMU's)."""
    from realqsd_support import shared_dir

    with shared_dir("amend") as share:
        (share / "py").mkdir()
        (share / "real").mkdir()
        ours = amend_script.run_kind(share / "py", False, kind)
        theirs = amend_script.run_kind(share / "real", True, kind)
        assert ours == theirs
        key = "key-secret" if kind == "luks" else "encrypt.key-secret"
        for sid, pw in amend_script.PASSWORDS.items():
            obj = f"secret,id=k,data={pw}"
            real = subprocess.run(
                [*_real_tool(), "qemu-io", "-r", "--object", obj, "--image-opts",
                 f"driver={kind},{key}=k,file.filename={share}/py/amend.{kind}",
                 "-c", "read 0 512"], capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert (real.returncode == 0) == (sid == "s0"), real.stderr
        assert _qsd_py_opens(share / "real", kind) == {"s0"}


def _real_tool() -> list[str]:
    from realqsd_support import require_real_qsd

    return [str(require_real_qsd()), "run"]


def _qsd_py_opens(workdir: Path, kind: str) -> set[str]:
    """The secrets whose passphrase opens ``amend.<kind>`` in qsd-py (blockdev-add)."""
    from conversation import Daemon

    path = workdir / f"amend.{kind}"
    d = Daemon(workdir, False, [a for o in amend_script.OBJECTS for a in ("--object", o)])
    good = set()
    try:
        for i, sid in enumerate(amend_script.PASSWORDS):
            opts = amend_script.node_options(kind, path)
            opts["node-name"], opts["read-only"] = f"n{i}", True
            if kind == "luks":
                opts["key-secret"] = sid
            else:
                opts["encrypt"]["key-secret"] = sid
            reply = d.cmd("blockdev-add", opts)
            if "return" in reply:
                good.add(sid)
            else:
                assert reply["error"]["desc"] == "Invalid password, cannot unlock any keyslot"
    finally:
        d.close()
    return good
