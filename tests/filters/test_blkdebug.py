"""blkdebug: the errors it injects, as a client of an NBD export over a qcow2 image on a
blkdebug node sees them (qemu-io), and its options refused with QEMU's texts. The expected
outputs are what QEMU 11.1's daemon gives for the same scenarios (test_realqsd_filters.py
compares them live): a failed read hangs up the client, so the reads after it fail too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from filters_support import EXPECTED, blkdebug_qcow2, make_images, run_scenario
from nbd_server.qmp_talk import Talk


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_injection(served: tuple[Talk, Path], tmp_path: Path, name: str) -> None:
    talk, sock = served
    assert run_scenario(talk, sock, tmp_path, name) == EXPECTED[name]


def test_once_then_clean(served: tuple[Talk, Path], tmp_path: Path) -> None:
    """A ``once`` rule fails one request with its errno; the next connection reads fine."""
    from filters_support import qemu_io

    talk, sock = served
    make_images(tmp_path)
    rule = {"event": "read_aio", "errno": 28, "once": True}
    node = blkdebug_qcow2(tmp_path, "n", "base.qcow2", False, **{"inject-error": [rule]})
    assert "return" in talk.command("blockdev-add", node)["reply"]
    talk.command("block-export-add", {"type": "nbd", "id": "n", "node-name": "n"})
    # QEMU's server hangs up after a failed read: the client sees EIO, not ENOSPC.
    assert qemu_io(sock, "n", ["read 0 4k"]) == ["read failed: Input/output error"]
    assert qemu_io(sock, "n", ["read -P 0xab 0 4k"]) == ["read 4096/4096 bytes at offset 0"]


def errors_for(talk: Talk, tmp_path: Path, options: list[dict[str, Any]]) -> list[str]:
    image = {"driver": "file", "filename": str(tmp_path / "base.qcow2")}
    out = []
    for extra in options:
        args = {"driver": "blkdebug", "node-name": "x", "image": image, **extra}
        reply = talk.command("blockdev-add", args)["reply"]
        out.append(reply["error"]["desc"] if "error" in reply else "ok")
        if "return" in reply:
            talk.command("blockdev-del", {"node-name": "x"})
    return out


CONFIGS = {
    "bad-event.cfg": '[inject-error]\nevent = "nope"\n',
    "bad-group.cfg": '[foo]\nevent = "read_aio"\n',
    "no-group.cfg": 'event = "read_aio"\n',
    "no-value.cfg": "[inject-error]\nevent read_aio\n",
    "bad-key.cfg": '[inject-error]\nevent = "read_aio"\nfoo = "1"\n',
    "no-event.cfg": '[inject-error]\nerrno = "5"\n',
    "bad-errno.cfg": '[inject-error]\nevent = "read_aio"\nerrno = "x"\n',
    "bad-once.cfg": '[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
    "bad-iotype.cfg": '[inject-error]\nevent = "read_aio"\niotype = "foo"\n',
    "good.cfg": '# rules\n[set-state]\nevent = "l2_load"\nnew_state = "3"\n',
}
#: QEMU 11.1's replies to the options of ERROR_OPTIONS (seen with its daemon).
ERROR_TEXTS = [
    "Could not open '/nonexistent.cfg': No such file or directory",
    "Cannot meet constraints with align 3",
    "Cannot meet constraints with max-transfer 1000",
    "Cannot meet constraints with max-write-zero 1000",
    "Value '-1' is out of range for parameter 'max-discard'",
    "Parameter 'inject-error[0].event' does not accept value 'bogus'",
    "invalid parameter value: nope",
    "There is no option group 'foo'",
    "no group defined",
    "invalid parameter value: ",
    "Invalid parameter 'foo'",
    "Missing event name for rule",
    "Parameter 'errno' expects a number",
    "Parameter 'once' expects 'on' or 'off'",
    "invalid parameter value: foo",
    "ok",
]


def error_options(workdir: Path) -> list[dict[str, Any]]:
    for name, text in CONFIGS.items():
        (workdir / name).write_text(text)
    return [
        {"config": "/nonexistent.cfg"},
        {"align": 3},
        {"max-transfer": 1000, "align": 512},
        {"max-write-zero": 1000, "opt-write-zero": 512},
        {"max-discard": -1},
        {"inject-error": [{"event": "bogus"}]},
        *({"config": str(workdir / name)} for name in CONFIGS),
    ]


def test_option_errors(served: tuple[Talk, Path], tmp_path: Path) -> None:
    talk, _ = served
    make_images(tmp_path)
    got = errors_for(talk, tmp_path, error_options(tmp_path))
    # QAPI's own check names the member by its path (QEMU's visitor text).
    assert got[5].startswith("Parameter '") and "does not accept value 'bogus'" in got[5]
    got[5] = ERROR_TEXTS[5]
    assert got == ERROR_TEXTS


def test_query_shows_filter(served: tuple[Talk, Path], tmp_path: Path) -> None:
    """Named as QEMU names it: ``blkdebug:CONFIG:FILE`` with only those options, else a
    ``json:`` filename with the options flattened; no actual-size, no fast path."""
    talk, _ = served
    make_images(tmp_path)
    path = str(tmp_path / "base.qcow2")
    image = {"driver": "file", "node-name": "f", "filename": path}
    talk.command("blockdev-add", {"driver": "blkdebug", "node-name": "d1", "image": image})
    rules = {"inject-error": [{"event": "read_aio"}]}
    image2 = {**image, "node-name": "f2", "read-only": True}
    talk.command(
        "blockdev-add",
        {"driver": "blkdebug", "node-name": "d2", "read-only": True, "image": image2, **rules},
    )
    nodes = {n["node-name"]: n for n in talk.command("query-named-block-nodes")["reply"]["return"]}
    assert nodes["d1"]["file"] == f"blkdebug::{path}"
    assert nodes["d1"]["drv"] == "blkdebug"
    assert nodes["d1"]["children"] == [{"child": "image", "node-name": "f"}]
    assert "actual-size" not in nodes["d1"]["image"]
    assert nodes["d2"]["file"] == (
        'json:{"image": {"driver": "file", "filename": "' + path + '"}, '
        '"driver": "blkdebug", "inject-error.0.event": "read_aio"}'
    )
