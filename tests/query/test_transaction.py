"""transaction: QEMU's checks and texts, and the phases' order (all or nothing)."""

from __future__ import annotations

from typing import Any

import pytest
from querykit import new_daemon, reply

from qsd_py import transaction as tx
from qsd_py.commands import HANDLERS
from qsd_py.errors import QMPError

ABORT = {"type": "abort", "data": {}}


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        ({"actions": []}, {}),
        ({"actions": [ABORT]}, ("error", "Transaction aborted using Abort action")),
        ({"actions": [{"type": "abort"}]}, ("error", "Parameter 'actions[0].data' is missing")),
        (
            {"actions": [{"type": "foo", "data": {}}]},
            ("error", "Parameter 'type' does not accept value 'foo'"),
        ),
        ({"actions": [{"data": {}}]}, ("error", "Parameter 'actions[0].type' is missing")),
        (
            {"actions": [ABORT], "properties": {"completion-mode": "grouped"}},
            (
                "error",
                "Action 'abort' does not support transaction property completion-mode = grouped",
            ),
        ),
        (
            {"actions": [ABORT], "properties": {"completion-mode": "individual"}},
            ("error", "Transaction aborted using Abort action"),
        ),
        (
            {"actions": [{"type": "abort", "data": {"x": 1}}]},
            ("error", "Parameter 'actions[0].data.x' is unexpected"),
        ),
        ({"actions": {}}, ("error", "Invalid parameter type for 'actions', expected: array")),
        ({}, ("error", "Parameter 'actions' is missing")),
    ],
)
async def test_qemus_answers(args: dict[str, Any], answer: Any) -> None:
    """The replies QEMU 11.1's daemon gives to the same requests (test_realqsd_query.py
    holds the same conversation with it)."""
    daemon, _ = new_daemon()
    assert await reply(daemon, "transaction", args) == answer


class Recorder:
    """Test actions that log their phases; ``fail`` makes prepare raise."""

    log: list[str] = []

    @classmethod
    def make(cls, kind: str, fail: bool = False, grouped: bool = False) -> type[tx.Action]:
        class Act(tx.Action):
            grouped_ok = grouped

            async def prepare(self) -> None:
                cls.log.append(f"prepare {self.data['n']}")
                if fail:
                    raise QMPError(f"failed {self.data['n']}")

            def commit(self) -> None:
                cls.log.append(f"commit {self.data['n']}")

            def abort(self) -> None:
                cls.log.append(f"abort {self.data['n']}")

            def clean(self) -> None:
                cls.log.append(f"clean {self.data['n']}")

        Act.kind = kind
        return Act


@pytest.fixture
def actions(monkeypatch: pytest.MonkeyPatch) -> type[Recorder]:
    """Three registered test kinds: ``ok``, ``bad`` (fails) and ``job`` (grouped allowed)."""
    Recorder.log = []
    table = dict(tx.ACTIONS)
    table["ok"] = Recorder.make("ok")
    table["bad"] = Recorder.make("bad", fail=True)
    table["job"] = Recorder.make("job", grouped=True)
    monkeypatch.setattr(tx, "ACTIONS", table)
    return Recorder


async def run(acts: list[tuple[str, int]], mode: str | None = None) -> Any:
    """The handler with already-checked arguments (the test kinds are in no schema)."""
    daemon, _ = new_daemon()
    args: dict[str, Any] = {"actions": [{"type": k, "data": {"n": n}} for k, n in acts]}
    if mode is not None:
        args["properties"] = {"completion-mode": mode}
    try:
        return await HANDLERS["transaction"](daemon, args)
    except QMPError as e:
        return ("error", e.desc)


async def test_all_commit_newest_first(actions: type[Recorder]) -> None:
    assert await run([("ok", 1), ("ok", 2), ("ok", 3)]) == {}
    assert actions.log == [
        "prepare 1", "prepare 2", "prepare 3",
        "commit 3", "commit 2", "commit 1",
        "clean 3", "clean 2", "clean 1",
    ]  # fmt: skip


async def test_a_failure_aborts_what_was_prepared(actions: type[Recorder]) -> None:
    assert await run([("ok", 1), ("bad", 2), ("ok", 3)]) == ("error", "failed 2")
    assert actions.log == [
        "prepare 1", "prepare 2",
        "abort 2", "abort 1",
        "clean 2", "clean 1",
    ]  # fmt: skip


async def test_abort_action_undoes_the_others(actions: type[Recorder]) -> None:
    answer = await run([("ok", 1), ("abort", 0)])
    assert answer == ("error", "Transaction aborted using Abort action")
    assert actions.log == ["prepare 1", "abort 1", "clean 1"]


async def test_grouped_is_checked_before_any_prepare(actions: type[Recorder]) -> None:
    answer = await run([("job", 1), ("ok", 2)], mode="grouped")
    assert answer == (
        "error",
        "Action 'ok' does not support transaction property completion-mode = grouped",
    )
    assert actions.log == []
    assert await run([("job", 1), ("job", 2)], mode="grouped") == {}
    assert actions.log[:2] == ["prepare 1", "prepare 2"]


async def test_a_kind_nobody_implements(actions: type[Recorder]) -> None:
    answer = await run([("ok", 1), ("blockdev-snapshot", 2)])
    assert answer == ("error", "Action 'blockdev-snapshot' is not supported")
    assert actions.log == ["prepare 1", "abort 1", "clean 1"]


async def test_drain_lasts_until_the_transaction_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """``txn.drain(node)`` pauses the node's request makers from prepare until after clean,
    whether the transaction commits or aborts."""
    from qsd_py.block.perm import PERM_ALL, NodeUser, Perm

    daemon, _ = new_daemon()
    await reply(daemon, "blockdev-add", {"driver": "null-co", "node-name": "n0"})
    node = daemon.graph.lookup("n0")
    log: list[str] = []

    async def quiesce() -> Any:
        log.append("paused")
        return lambda: log.append("resumed")

    node.set_user(NodeUser("maker", Perm.CONSISTENT_READ, PERM_ALL, "a maker", quiesce=quiesce))

    class Drains(tx.Action):
        kind = "drains"

        async def prepare(self) -> None:
            await self.txn.drain(self.daemon.graph.lookup("n0"))
            log.append("prepared")

        def clean(self) -> None:
            log.append("clean")

    table = dict(tx.ACTIONS, drains=Drains)
    monkeypatch.setattr(tx, "ACTIONS", table)
    action = {"type": "drains", "data": {}}
    assert await HANDLERS["transaction"](daemon, {"actions": [action]}) == {}
    assert log == ["paused", "prepared", "clean", "resumed"]
    log.clear()
    with pytest.raises(QMPError, match="Abort action"):
        await HANDLERS["transaction"](daemon, {"actions": [action, ABORT]})
    assert log == ["paused", "prepared", "clean", "resumed"]
