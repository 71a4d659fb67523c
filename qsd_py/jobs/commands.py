"""QMP commands of jobs: query-jobs, job-*, query-block-jobs, block-job-*, blockdev-create.

The ``block-job-*`` forms find only block jobs (QEMU: ``Block job 'x' not found``, class
DeviceNotActive, for any other id, a create job's included); ``job-*`` find any job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon
    from qsd_py.jobs.job import Job


@qmp_command("query-jobs")
async def query_jobs(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.jobs.query()


@qmp_command("job-pause")
async def job_pause(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await _pause(daemon.jobs.find(args["id"]))
    return {}


@qmp_command("job-resume")
async def job_resume(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await _resume(daemon.jobs.find(args["id"]))
    return {}


@qmp_command("job-cancel")
async def job_cancel(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find(args["id"]).user_cancel(force=True)
    return {}


@qmp_command("job-complete")
async def job_complete(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find(args["id"]).user_complete()
    return {}


@qmp_command("job-dismiss")
async def job_dismiss(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find(args["id"]).user_dismiss()
    return {}


@qmp_command("job-finalize")
async def job_finalize(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find(args["id"]).user_finalize()
    return {}


@qmp_command("query-block-jobs")
async def query_block_jobs(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return daemon.jobs.query_block()


@qmp_command("block-job-set-speed")
async def block_job_set_speed(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find_block_job(args["device"]).set_speed(args["speed"])
    return {}


@qmp_command("block-job-cancel")
async def block_job_cancel(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Without ``force`` a job the user paused is refused, and a ready mirror completes
    without pivoting (the job kind's cancel_hook decides)."""
    device = args["device"]
    job = daemon.jobs.find_block_job(device)
    force = bool(args.get("force", False))
    if job.user_paused and not force:
        raise QMPError(f"The block job for device '{device}' is currently paused")
    await job.user_cancel(force)
    return {}


@qmp_command("block-job-pause")
async def block_job_pause(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await _pause(daemon.jobs.find_block_job(args["device"]))
    return {}


@qmp_command("block-job-resume")
async def block_job_resume(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await _resume(daemon.jobs.find_block_job(args["device"]))
    return {}


@qmp_command("block-job-complete")
async def block_job_complete(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find_block_job(args["device"]).user_complete()
    return {}


@qmp_command("block-job-dismiss")
async def block_job_dismiss(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find_block_job(args["id"]).user_dismiss()
    return {}


@qmp_command("block-job-finalize")
async def block_job_finalize(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.jobs.find_block_job(args["id"]).user_finalize()
    return {}


@qmp_command("block-job-change")
async def block_job_change(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.jobs.find_block_job(args["id"]).user_change(args)
    return {}


@qmp_command("blockdev-create")
async def blockdev_create(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Start a ``create`` job; every problem with the options is the job's error."""
    from qsd_py.block.create import creator
    from qsd_py.jobs.create import CreateJob

    options = args["options"]
    create = creator(options["driver"])
    if create is None:
        raise QMPError("Driver does not support blockdev-create")
    job = CreateJob(daemon.jobs, args["job-id"], graph=daemon.graph, create=create, options=options)
    daemon.jobs.add(job)
    job.start()
    return {}


@qmp_command("blockdev-mirror")
async def blockdev_mirror(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Start a mirror of node ``device`` to node ``target`` (QEMU's checks, in its order)."""
    from qsd_py.jobs import mirror

    source = mirror.lookup_source(daemon.graph, daemon.jobs, args["device"])
    target = daemon.graph.lookup_device(args["target"])
    await mirror.start(daemon.graph, daemon.jobs, source, target, args)
    return {}


@qmp_command("drive-mirror")
async def drive_mirror(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """A mirror to an existing image named by its file name (``mode`` existing); the node
    opened for it is the job's and closed after it unless the pivot made it the users'."""
    from qsd_py.jobs import mirror

    source = mirror.lookup_source(daemon.graph, daemon.jobs, args["device"])
    if args.get("mode", "absolute-paths") != "existing":
        raise QMPError("drive-mirror creates no image in qsd-py: use mode 'existing'")
    fmt = args.get("format") or mirror.format_of(source)
    opts: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": args["target"]}}
    if fmt == "file":
        opts = {"driver": "file", "filename": args["target"]}
    if "node-name" in args:
        opts["node-name"] = args["node-name"]
        target = await daemon.graph.add(opts)
        target.implicit = True
    else:
        target = await daemon.graph.add_implicit(opts)
    try:
        await mirror.start(daemon.graph, daemon.jobs, source, target, args)
    except BaseException:
        await daemon.graph.drop_orphan(target)
        raise
    return {}


@qmp_command("block-stream")
async def block_stream(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Start a stream job (qsd_py/jobs/stream.py)."""
    from qsd_py.jobs import stream

    await stream.start(daemon.graph, daemon.jobs, args)
    return {}


@qmp_command("block-commit")
async def block_commit(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Start a commit job, intermediate or active (qsd_py/jobs/commit.py)."""
    from qsd_py.jobs import commit

    await commit.start(daemon.graph, daemon.jobs, args)
    return {}


@qmp_command("change-backing-file")
async def change_backing_file(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    from qsd_py.jobs import commit

    await commit.change_backing_file(daemon.graph, args)
    return {}


@qmp_command("blockdev-backup")
async def blockdev_backup(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Start a backup of node ``device`` to node ``target`` (qsd_py/jobs/backup.py)."""
    from qsd_py.jobs import backup

    source = daemon.graph.lookup_device(args["device"])
    target = daemon.graph.lookup_device(args["target"])
    await backup.start(daemon.graph, daemon.jobs, source, target, args)
    return {}


@qmp_command("drive-backup")
async def drive_backup(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """A backup to an image named by its file name, created first unless ``mode`` is
    ``existing``; the node opened for it is the job's and closed after it."""
    from qsd_py.jobs import backup

    source = daemon.graph.lookup_device(args["device"])
    for reason in source.blockers.values():
        raise QMPError(f"Node '{source.node_name}' is busy: {reason}")
    target = await backup.open_drive_target(daemon.graph, source, args)
    try:
        await backup.start(daemon.graph, daemon.jobs, source, target, args)
    except BaseException:
        await daemon.graph.drop_orphan(target)
        raise
    return {}


@qmp_command("x-blockdev-amend")
async def x_blockdev_amend(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Start an ``amend`` job (qsd_py/jobs/amend.py); the driver's refusal is the job's."""
    from qsd_py.jobs.amend import AmendJob, check

    node = check(daemon.graph.find(args["node-name"]), args["node-name"], args["options"])
    job = AmendJob(daemon.jobs, args["job-id"], node=node, options=args["options"],
                   force=bool(args.get("force", False)))  # fmt: skip
    daemon.jobs.add(job)
    if node.driver == "luks" and node.read_only:  # QEMU's luks asks for write before it runs
        job.drop()
        raise QMPError("Block node is read-only")
    job.start()
    return {}


async def _pause(job: Job) -> None:
    """A job sleeping (off its speed, or idle in ready) is woken into its pause point
    before the reply, as QEMU's job runs at once when entered: its ``paused``/``standby``
    comes first. A job busy with I/O pauses later, at its next pause point."""
    sleeping = job.started and not job.busy and not job.paused and not job.deferred
    job.user_pause()
    if sleeping:
        await job.wait_paused()


async def _resume(job: Job) -> None:
    """The job leaves its pause point before the reply (its ``running``/``ready`` first)."""
    job.user_resume()
    await job.wait_unpaused()
