"""QMP ``transaction``: several actions as one, all or nothing (QEMU's qmp_transaction).

A transaction runs in phases, as QEMU's (``util/transactions.c``):

1. **prepare**, action by action in the order given: each checks its arguments and does its
   work in a form that can still be undone (a bitmap created but not yet visible, a job
   created but not started). The first failure stops the loop.
2. On success, **commit** for every prepared action; on failure, **abort** for every action
   prepared so far (the one that failed included: its prepare may have got half way). Both
   run newest action first, as QEMU's list of actions is kept newest first.
3. **clean** for every prepared action, in the same order, whatever happened: what prepare
   took for the duration (drained sections, temporary references) is given back.

Before any of this the whole request is checked: ``completion-mode: grouped`` is refused
with QEMU's text unless every action's type allows it (QEMU: the backups only).

Plugging an action in (dirty bitmaps, snapshots, backups): subclass :class:`Action`, set
``kind`` to the ``TransactionActionKind`` value, override what it needs, and decorate the
class with :func:`transaction_action`; import the module from
:func:`qsd_py.commands.load_handlers` (the module that holds the command of the same name is
the natural place). In ``qapi/transaction.json`` add the wrapper struct (``{ 'data': X }``,
X the command's argument type) and its one-line branch of ``TransactionAction``::

    @transaction_action
    class BitmapAdd(Action):
        kind = "block-dirty-bitmap-add"

        async def prepare(self) -> None:
            self.bitmap = create_bitmap(self.daemon, self.data)  # raises QMPError

        def abort(self) -> None:
            remove_bitmap(self.bitmap)

An action receives its ``data`` already checked against the schema, the daemon, and the
:class:`Transaction` (``txn.grouped`` for completion-mode, ``txn.jobs`` where an action that
starts a job lists it so grouped completion can cancel the group, ``await txn.drain(node)``
to keep a node drained until the clean phase). ``commit``, ``abort`` and ``clean`` must not
fail: QEMU's cannot either (report a problem on the log and go on); they may be coroutines.
A job started in commit is paused there (``job.pause()``) and listed in ``txn.jobs``: the
transaction resumes it once the drains are over.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.node import BlockNode
    from qsd_py.daemon import Daemon

log = logging.getLogger(__name__)


class Transaction:
    """One ``transaction`` command under way: its completion mode and shared state."""

    def __init__(self, grouped: bool) -> None:
        self.grouped = grouped
        #: Jobs the actions created (grouped completion makes them one group).
        self.jobs: list[Any] = []
        #: The jobs' group when grouped (qsd_py.jobs.job.JobTxn, made by the first job).
        self.job_group: Any = None
        self._drains = contextlib.AsyncExitStack()

    async def drain(self, node: BlockNode) -> None:
        """Keep ``node`` drained until the transaction is over (QEMU's actions begin a
        drained section in prepare and end it in clean)."""
        await self._drains.enter_async_context(node.drained())

    async def hold_exports(self, daemon: Daemon) -> None:
        """No export starts a request until the transaction is over, and those under way
        end first: QEMU drains everything before the actions and then runs them without a
        turn of its main loop, so no request falls between two actions (a write between a
        bitmap's disable and a backup's start would be in neither)."""
        for export in list(daemon.exports):
            quiesce = export.quiesce_hook()
            if quiesce is not None:
                self._drains.callback(await quiesce())

    async def close(self) -> None:
        await self._drains.aclose()

    async def resume_jobs(self) -> None:
        """The jobs started in commit paused at once, their nodes drained (QEMU: their
        first pause point); with the drains over they run, before the reply as in QEMU."""
        for job in self.jobs:
            await job.wait_not_busy()
            job.resume()
        for job in self.jobs:
            while job.status == "paused":
                await asyncio.sleep(0)


class Action:
    """One action of a transaction (QEMU's TransactionActionDrv with its state)."""

    kind: ClassVar[str]
    #: Whether ``completion-mode: grouped`` is accepted (QEMU: backups, which start jobs).
    grouped_ok: ClassVar[bool] = False

    def __init__(self, daemon: Daemon, data: dict[str, Any], txn: Transaction) -> None:
        self.daemon = daemon
        self.data = data
        self.txn = txn

    async def prepare(self) -> None:
        """Do the work, undoably; raise QMPError (QEMU's text) to fail the transaction."""

    def commit(self) -> None:
        """Make the prepared work final (all actions were prepared)."""

    def abort(self) -> None:
        """Undo what :meth:`prepare` did (an action after it failed, or it did)."""

    def clean(self) -> None:
        """Give back what :meth:`prepare` held for the transaction, after commit or abort."""


ACTIONS: dict[str, type[Action]] = {}


def transaction_action(cls: type[Action]) -> type[Action]:
    """Register ``cls`` as the action of its ``kind``."""
    if cls.kind in ACTIONS:
        raise RuntimeError(f"transaction action {cls.kind} registered twice")
    ACTIONS[cls.kind] = cls
    return cls


@transaction_action
class AbortAction(Action):
    """``abort``: fails, to test that the actions before it are undone."""

    kind = "abort"

    async def prepare(self) -> None:
        raise QMPError("Transaction aborted using Abort action")


@qmp_command("transaction")
async def transaction(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    actions = args["actions"]
    mode = args.get("properties", {}).get("completion-mode", "individual")
    if mode != "individual":
        for act in actions:
            cls = ACTIONS.get(act["type"])
            if cls is None or not cls.grouped_ok:
                raise QMPError(
                    f"Action '{act['type']}' does not support transaction property "
                    f"completion-mode = {mode}"
                )
    await daemon.graph.drain_all()  # QEMU drains all I/O before any action
    txn = Transaction(grouped=mode == "grouped")
    done: list[Action] = []  # newest first, as QEMU's list
    try:
        await txn.hold_exports(daemon)
        try:
            for act in actions:
                cls = ACTIONS.get(act["type"])
                if cls is None:  # a type of QEMU's that no module here implements yet
                    raise QMPError(f"Action '{act['type']}' is not supported")
                action = cls(daemon, act.get("data", {}), txn)
                done.insert(0, action)
                await action.prepare()
        except BaseException:
            await _each(done, "abort")
            raise
        await _each(done, "commit")
    finally:
        await _each(done, "clean")
        await txn.close()
    await txn.resume_jobs()
    return {}


async def _each(actions: list[Action], phase: str) -> None:
    """Run ``phase`` of every action; one that fails is logged and the rest still run.
    A phase may be a coroutine (cancelling a job created in prepare awaits its end)."""
    for action in actions:
        try:
            result = getattr(action, phase)()
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - the other actions must still be undone/finished
            log.exception("transaction: %s of %s failed", phase, action.kind)
