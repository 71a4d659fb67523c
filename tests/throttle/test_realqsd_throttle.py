"""The throttle conversation held with QEMU 11.1's qemu-storage-daemon (opt-in: --real-qsd):
the replies conversation.py expects, and qsd-py gives, are QEMU's; and the throttle-group
and throttle driver options have QEMU's shape in query-qmp-schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from nbd_server.qmp_talk import Talk
from realqsd_support import real_daemon, shared_dir
from throttle.conversation import ARGS, STEPS

pytestmark = pytest.mark.realqsd


@pytest.fixture
def real() -> Iterator[Talk]:
    with shared_dir("throttle") as work, real_daemon(ARGS, work / "qmp.sock", timeout=20):
        client = Talk(str(work / "qmp.sock"))
        yield client
        client.close()


def test_conversation_with_qemu(real: Talk) -> None:
    for name, args, reply in STEPS:
        assert real.command(name, args)["reply"] == reply, (name, args)


def _members(answer: list[dict[str, Any]], name: str) -> list[tuple[str, str, bool]]:
    by_name = {e["name"]: e for e in answer}

    def resolve(type_name: str) -> Any:
        entry = by_name[type_name]
        return entry.get("json-type", entry["meta-type"])

    return sorted((m["name"], resolve(m["type"]), "default" in m) for m in by_name[name]["members"])


def _variant(answer: list[dict[str, Any]], command: str, case: str) -> str:
    by_name = {e["name"]: e for e in answer}
    union = by_name[by_name[command]["arg-type"]]
    return next(v["type"] for v in union["variants"] if v["case"] == case)


def test_options_are_qemus(real: Talk, qsd: Any) -> None:
    theirs = real.command("query-qmp-schema")["reply"]["return"]
    ours_client = Talk(str(qsd().qmp_path))
    try:
        ours = ours_client.command("query-qmp-schema")["reply"]["return"]
    finally:
        ours_client.close()
    for command, case in (("object-add", "throttle-group"), ("blockdev-add", "throttle")):
        assert _members(ours, _variant(ours, command, case)) == _members(
            theirs, _variant(theirs, command, case)
        ), case
