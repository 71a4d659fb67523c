"""The ``backup`` block job (blockdev-backup, drive-backup): copy a node's contents as they
were when the job started to a target, while the node is written.

As QEMU's job, it puts a ``copy-before-write`` filter node above the source
(drivers/copy_before_write.py): the source's parents and the users that can follow
(exports) move to the filter (``replace_node``), and every write of the source has the old
bytes of its clusters copied to the target first. The job's loop copies the remaining
clusters through the same :class:`~qsd_py.block.blockcopy.BlockCopy`, so each cluster is
copied once, by whichever comes first. What is to be copied: everything (``sync`` full),
what the source's top layer holds (``top``), a bitmap's chunks (``bitmap``, ``incremental``),
or only what writes are about to overwrite (``none``: the job waits until it is cancelled).
At the end the filter is taken away again and the users move back.

The command runs as QEMU's transaction does: with the source drained, the job is created
and started in it, so it stops at its first pause point (``paused``) until the drain ends.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from qsd_py.block.blockcopy import CopyError
from qsd_py.block.child import replace_node
from qsd_py.block.drivers.copy_before_write import copy_dirty_chunks
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.errors import QMPError
from qsd_py.jobs.blockjob import BlockJob
from qsd_py.jobs.inflight import CopiesInFlight

if TYPE_CHECKING:
    from qsd_py.block.blockcopy import BlockCopy
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode
    from qsd_py.jobs.registry import JobRegistry

BUSY = "block device is in use by block job: backup"
CHUNK = 1 << 20  # bytes per step of the job's loop
MAX_WORKERS = 16  # chunks in flight at most (x-perf max-workers may ask fewer)
INT_MAX = (1 << 31) - 1


class BackupJob(BlockJob):
    job_type = "backup"
    creation_drains = (5, 1)
    end_drains = (3, 3)  # its success not measured

    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        *,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        cbw: BlockNode,
        sync: str,
        bitmap: Any = None,
        bitmap_mode: str = "on-success",
        on_source_error: str = "report",
        on_target_error: str = "report",
        **kwargs: Any,
    ) -> None:
        super().__init__(registry, job_id, **kwargs)
        self.graph = graph
        self.source = source
        self.target = target
        self.cbw = cbw
        self.bcs: BlockCopy = cbw.bcs  # type: ignore[attr-defined]
        self.sync = sync
        self.bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self._succ: Any = None  # writes during the job, for the bitmap at the end
        self.max_workers = MAX_WORKERS
        self._ops = CopiesInFlight()  # chunks in flight
        self._failed: Exception | None = None  # an error of a chunk in flight, to raise

    # --- nodes ----------------------------------------------------------------------------
    def take_nodes(self) -> None:
        """The job is a parent of its filter (QEMU's job node); the filter and the target
        are blocked (the source not: QEMU lets it be backed up again)."""
        cbw = self.cbw
        desc = f"backup job '{self.id}' (uses node '{cbw.node_name}' as 'main node' child)"
        user = NodeUser(
            self._user_key(cbw), Perm(0), PERM_ALL, desc, is_parent=True, quiesce=self._quiesce
        )
        cbw.set_user(user)
        self._used.append(cbw)
        for node in (self.target, cbw):
            node.blockers[self.id] = BUSY
        self.bcs.on_progress = self._copied

    def release_nodes(self) -> None:
        for node in (self.target, self.cbw):
            node.blockers.pop(self.id, None)
        self.bcs.on_progress = None
        super().release_nodes()

    def _copied(self, nbytes: int) -> None:
        self.progress_update(nbytes)
        self.set_remaining(self.bcs.todo.count)

    # --- the copy -------------------------------------------------------------------------
    async def run(self) -> None:
        bcs = self.bcs
        if self.sync == "top":
            await bcs.reset_unallocated()
        self.set_remaining(bcs.todo.count)
        if self.sync == "none":  # the filter copies what writes overwrite, until a cancel
            while True:
                await self.checkpoint()
                await self.sleep(3600)
        try:
            await self._copy_all()
        finally:
            await self._wait_ops()
        await self.target.flush()

    async def _copy_all(self) -> None:
        """Up to ``MAX_WORKERS`` chunks in flight (QEMU's block-copy runs as many tasks),
        from a cursor that wraps round once all in flight are done; every pause point is
        reached with none in flight (a drain must find the nodes idle)."""
        bcs, cursor = self.bcs, 0
        while True:
            if self.pause_count > 0 or self.is_cancelled:
                await self._wait_ops()
            await self.checkpoint()
            if self._failed is not None:
                await self._wait_ops()
                raise self._failed
            run = bcs.todo.next_dirty(cursor, CHUNK)
            if run is None and cursor:
                await self._wait_ops()  # what is left may be theirs: look again from 0
                cursor = 0
                continue
            if run is None:
                return
            if len(self._ops) >= self.max_workers:
                await self._wait_one()
                continue
            cursor = run[0] + run[1]
            self._ops.start(self._op(*run), run[0], run[0] + run[1])
            delay = self.limit.delay(run[1])  # charged as sent off, as QEMU's block-copy
            if delay:  # over the slice's quota: sleep it off with none in flight
                await self._wait_ops()
                await self.sleep(delay)

    async def _op(self, offset: int, length: int) -> None:
        """One chunk; an error the policy survives leaves it to copy, one it does not is
        kept for the job's loop to raise."""
        try:
            await self.bcs.copy(offset, length)
        except CopyError as err:
            policy = self.on_source_error if err.operation == "read" else self.on_target_error
            try:
                self.io_error(err, err.operation, policy)
            except OSError as fail:
                self._failed = self._failed or fail
        except Exception as fail:  # noqa: BLE001 - handed to the job's loop
            self._failed = self._failed or fail

    async def _wait_one(self) -> None:
        """Until a chunk in flight is done."""
        await self._ops.wait_one()

    async def _wait_ops(self) -> None:
        await self._ops.wait_all()

    # --- the end --------------------------------------------------------------------------
    async def commit(self) -> None:
        self._settle_bitmap(success=True)

    async def abort(self) -> None:
        self._settle_bitmap(success=False)

    def _settle_bitmap(self, success: bool) -> None:
        """QEMU's bitmap modes: on success (``on-success``, ``always``) the bitmap keeps only
        what was written during the job; ``always`` after a failure keeps those writes and
        what the job had still to copy (its copy bitmap: for sync ``full`` all it did not
        reach, not only the bitmap's bits)."""
        bitmap, succ = self.bitmap, self._succ
        if bitmap is None or succ is None:
            return
        if self.bitmap_mode == "never" or (self.bitmap_mode == "on-success" and not success):
            return
        bitmap.clear(0, bitmap.length)
        if not success:
            copy_dirty_chunks(self.bcs.todo, bitmap)
        copy_dirty_chunks(succ, bitmap)

    async def clean(self) -> None:
        """Take the filter away: its users move back to the source, the filter closes (a
        drive-backup target too)."""
        if self._succ is not None:
            self.source.remove_dirty_bitmap(self._succ)
            if hasattr(self.bitmap, "busy"):
                self.bitmap.busy = False
        self.release_nodes()
        # Drained, as QEMU's bdrv_cbw_drop: the exports' requests (an iothread's NBD
        # connection too) are done and held until the users moved, so none reads through
        # the filter once it is closed.
        async with self.cbw.drained():
            replace_node(self.cbw, self.source)
        await self.graph.drop_orphan(self.cbw)
        await self.graph.drop_orphan(self.target)


# --- starting a backup (blockdev-backup, drive-backup) ---------------------------------------
def check_bitmap_args(source: BlockNode, args: dict[str, Any]) -> Any:
    """QEMU's do_backup_common checks of ``sync``, ``bitmap`` and ``bitmap-mode`` (turning
    ``incremental`` into ``bitmap`` with ``on-success``); the bitmap, or None."""
    sync = args["sync"]
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        raise QMPError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if args.get("bitmap-mode", "on-success") != "on-success":
            raise QMPError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        args["sync"] = sync = "bitmap"
        args["bitmap-mode"] = "on-success"
    bitmap = None
    if "bitmap" in args:
        bitmap = source.dirty_bitmap(args["bitmap"])
        if bitmap is None:
            raise QMPError(f"Bitmap '{args['bitmap']}' could not be found")
        if "bitmap-mode" not in args:
            raise QMPError("Bitmap sync mode must be given when providing a bitmap")
        _check_bitmap(bitmap, allow_readonly=True)
        if sync == "none":
            raise QMPError("sync mode 'none' does not produce meaningful bitmap outputs")
        if args["bitmap-mode"] == "never" and sync != "bitmap":
            raise QMPError(
                f"Bitmap sync mode 'never' has no meaningful effect when combined with sync "
                f"mode '{sync}'"
            )
    elif "bitmap-mode" in args:
        raise QMPError("Cannot specify bitmap sync mode without a bitmap")
    return bitmap


def _check_bitmap(bitmap: Any, allow_readonly: bool = False) -> None:
    """QEMU's bdrv_dirty_bitmap_check (busy, read-only, inconsistent), where the bitmap
    has those states (issue 20's user-visible bitmaps)."""
    check = getattr(bitmap, "check", None)
    if check is not None:
        check(allow_readonly=allow_readonly)


def check_job_args(source: BlockNode, target: BlockNode, args: dict[str, Any]) -> None:
    """QEMU's backup_job_create checks before the filter is inserted, in its order."""
    if source is target:
        raise QMPError("Source and target cannot be the same")
    if args.get("compress") and not hasattr(target, "write_compressed"):
        raise QMPError("Compression is not supported for this drive ")
    for node in (source, target):
        for reason in node.blockers.values():
            raise QMPError(f"Node '{node.node_name}' is busy: {reason}")
    perf = args.get("x-perf", {})
    if not 1 <= perf.get("max-workers", 64) <= INT_MAX:
        raise QMPError(f"max-workers must be between 1 and {INT_MAX}")
    max_chunk = perf.get("max-chunk", 0)
    if max_chunk < 0:
        raise QMPError("max-chunk must be zero (which means no limit) or positive")
    bitmap = source.dirty_bitmap(args["bitmap"]) if "bitmap" in args else None
    if bitmap is not None and args.get("bitmap-mode") != "never":
        _check_bitmap(bitmap)
    if source.length() != target.length():
        raise QMPError("Source and target image have different sizes")


async def insert_filter(
    graph: BlockGraph, source: BlockNode, target: BlockNode, args: dict[str, Any]
) -> BlockNode:
    """The job's copy-before-write node above ``source`` (QEMU's bdrv_cbw_append)."""
    opts: dict[str, Any] = {
        "driver": "copy-before-write",
        "file": source.node_name,
        "target": target.node_name,
    }
    if "on-cbw-error" in args:  # break-snapshot: guest writes go on, the backup fails
        opts["on-cbw-error"] = args["on-cbw-error"]
    min_cluster = args.get("x-perf", {}).get("min-cluster-size", 0)
    if min_cluster:
        opts["min-cluster-size"] = min_cluster
    try:
        if "filter-node-name" in args:
            cbw = await graph.add({**opts, "node-name": args["filter-node-name"]})
            cbw.implicit = True
        else:
            cbw = await graph.add_implicit(opts)
    except QMPError as err:
        raise QMPError(f"Could not create node: {err.desc}") from err
    bcs: BlockCopy = cbw.bcs  # type: ignore[attr-defined]
    bcs.compress = bool(args.get("compress", False))
    bcs.discard_source = bool(args.get("discard-source", False))
    max_chunk = args.get("x-perf", {}).get("max-chunk", 0)
    if max_chunk and max_chunk < bcs.cluster_size:
        await graph.drop_orphan(cbw)
        raise QMPError(
            f"Required max-chunk ({max_chunk}) is less than backup cluster size "
            f"({bcs.cluster_size})"
        )
    if max_chunk:
        bcs.max_chunk = min(bcs.max_chunk, max_chunk)
    replace_node(source, cbw, skip=cbw)
    return cbw


async def create(
    graph: BlockGraph, jobs: JobRegistry, source: BlockNode, target: BlockNode, args: dict
) -> BackupJob:
    """A transaction's prepare (QEMU's do_backup_common with the source drained): the
    checks, the filter and the job, registered but not started."""
    args = dict(args)
    bitmap = check_bitmap_args(source, args)
    check_job_args(source, target, args)
    cbw = await insert_filter(graph, source, target, args)
    try:
        job = _new_job(graph, jobs, source, target, cbw, bitmap, args)
        job.register(args.get("speed", 0))
    except BaseException:
        replace_node(cbw, source)
        await graph.drop_orphan(cbw)
        raise
    return job


async def start(
    graph: BlockGraph, jobs: JobRegistry, source: BlockNode, target: BlockNode, args: dict
) -> BackupJob:
    """Check as QEMU does, insert the filter, create and start the job in a drained section
    of the source (the job pauses at once, and goes on when the section ends)."""
    args = dict(args)
    bitmap = check_bitmap_args(source, args)
    check_job_args(source, target, args)
    async with source.drained():
        cbw = await insert_filter(graph, source, target, args)
        try:
            job = _new_job(graph, jobs, source, target, cbw, bitmap, args)
            await job.register_drained(args.get("speed", 0))
        except BaseException:
            replace_node(cbw, source)
            await graph.drop_orphan(cbw)
            raise
        job.start()
        job.pause()
    await job.wait_not_busy()
    job.resume()
    while job.status == "paused":  # back to running before the reply, as in QEMU
        await asyncio.sleep(0)
    return job


def _new_job(
    graph: BlockGraph,
    jobs: JobRegistry,
    source: BlockNode,
    target: BlockNode,
    cbw: BlockNode,
    bitmap: Any,
    args: dict[str, Any],
) -> BackupJob:
    job = BackupJob(
        jobs,
        args.get("job-id", ""),  # no devices in a storage daemon: QEMU's default is ''
        graph=graph,
        source=source,
        target=target,
        cbw=cbw,
        sync=args["sync"],
        bitmap=bitmap,
        bitmap_mode=args.get("bitmap-mode", "on-success"),
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
    )
    job.max_workers = min(MAX_WORKERS, args.get("x-perf", {}).get("max-workers", MAX_WORKERS))
    if bitmap is not None:
        _start_from_bitmap(job, source, bitmap)
    return job


def _start_from_bitmap(job: BackupJob, source: BlockNode, bitmap: Any) -> None:
    """sync bitmap: copy the bitmap's chunks; a second bitmap records the writes made
    during the job, for the bitmap's state at the end."""
    from qsd_py.block.dirty import DirtyBitmap

    bcs = job.bcs
    if job.sync == "bitmap":
        bcs.todo.clear(0, bcs.length)
        copy_dirty_chunks(bitmap, bcs.todo)
    job._succ = DirtyBitmap(source.length(), bitmap.granularity)
    # QEMU's successor bitmap records as the bitmap did; the bitmap is busy meanwhile.
    job._succ.enabled = getattr(bitmap, "enabled", True)  # type: ignore[attr-defined]
    source.add_dirty_bitmap(job._succ)
    if hasattr(bitmap, "busy"):
        bitmap.busy = True


async def open_drive_target(
    graph: BlockGraph, source: BlockNode, args: dict[str, Any]
) -> BlockNode:
    """drive-backup's target: created (``mode`` absolute-paths, the default: with the
    source's backing file for sync ``top``, the source itself for ``none``), then opened
    as an implicit node with discard=unmap."""
    fmt = args.get("format") or source.driver
    sync = args["sync"]
    backing: BlockNode | None = None
    if sync == "top":
        backing = source.child_node("backing") if source.supports_backing else None
        if backing is None:
            args["sync"] = "full"
    elif sync == "none":  # the new image reads what was not copied from the source
        backing = source
    if args.get("mode", "absolute-paths") != "existing":
        await _create_image(graph, args["target"], fmt, source.length(), backing)
    file = {"driver": "file", "filename": args["target"], "discard": "unmap"}
    opts: dict[str, Any] = {"driver": fmt, "file": file, "discard": "unmap"}
    if fmt == "file":
        opts = file
    if sync == "none" and fmt == "qcow2":
        opts["backing"] = source.node_name  # reads of what was not copied: the source
    target = await graph.add_implicit(opts)
    if sync == "none" and not target.supports_backing:
        await graph.drop_orphan(target)
        raise QMPError(
            f"Driver '{target.driver}' of node '{target.node_name}' does not support backing files"
        )
    return target


async def _create_image(
    graph: BlockGraph, path: str, fmt: str, size: int, backing: BlockNode | None
) -> None:
    """QEMU's bdrv_img_create for drive-backup: a file of the source's size, or a qcow2
    image in a new file (with the backing file's name and format when given)."""
    from qsd_py.block.create import create_file

    if fmt not in ("raw", "file", "qcow2"):
        raise QMPError(f"Format driver '{fmt}' does not support image creation")
    await create_file(
        graph, {"driver": "file", "filename": path, "size": 0 if fmt == "qcow2" else size}
    )
    if fmt != "qcow2":
        return
    from qsd_py.block.qcow2.create import create

    opts: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": path}}
    opts["size"] = size
    if backing is not None:
        opts["backing-file"] = backing.filename()
        opts["backing-fmt"] = backing.driver
    await create(graph, opts)
