"""``transaction`` actions of the backups (QEMU's blockdev_backup_action and
drive_backup_action): the source is drained from prepare to clean; prepare makes the
target (drive-backup), the filter and the job, registered but not started; commit starts
it (paused until the transaction's drains end); abort cancels the job that never ran, which
takes the filter away again (and closes a drive-backup target). With ``completion-mode:
grouped`` the jobs form one :class:`~qsd_py.jobs.job.JobTxn`."""

from __future__ import annotations

from typing import Any

from qsd_py.errors import QMPError
from qsd_py.jobs import backup
from qsd_py.jobs.job import JobTxn
from qsd_py.transaction import Action, transaction_action


def _node(daemon: Any, name: str) -> Any:
    node = daemon.graph.lookup_device(name)
    return node


@transaction_action
class BlockdevBackup(Action):
    kind = "blockdev-backup"
    grouped_ok = True
    job: backup.BackupJob | None = None

    async def prepare(self) -> None:
        source = _node(self.daemon, self.data["device"])
        target = _node(self.daemon, self.data["target"])
        await self.txn.drain(source)
        await self._create(source, target)

    async def _create(self, source: Any, target: Any) -> None:
        self.job = await backup.create(self.daemon.graph, self.daemon.jobs, source, target,
                                       self.data)  # fmt: skip
        self.txn.jobs.append(self.job)
        if self.txn.grouped:
            if self.txn.job_group is None:
                self.txn.job_group = JobTxn()
            self.txn.job_group.add(self.job)

    def commit(self) -> None:
        if self.job is not None:
            self.job.start()
            self.job.pause()

    async def abort(self) -> None:
        if self.job is not None:
            self.txn.jobs.remove(self.job)
            if self.job.status != "null":  # (a grouped job ends with its group)
                await self.job.cancel(force=True)


@transaction_action
class DriveBackup(BlockdevBackup):
    kind = "drive-backup"

    async def prepare(self) -> None:
        graph, data = self.daemon.graph, dict(self.data)
        source = _node(self.daemon, data["device"])
        for reason in source.blockers.values():
            raise QMPError(f"Node '{source.node_name}' is busy: {reason}")
        await self.txn.drain(source)
        target = await backup.open_drive_target(graph, source, data)
        self.data = data
        try:
            await self._create(source, target)
        except BaseException:
            await graph.drop_orphan(target)
            raise
