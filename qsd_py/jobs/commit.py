"""The ``commit`` block jobs (block-commit): fold the nodes from ``top`` down to ``base``
(exclusive) into ``base``, then let the chain skip them.

Two kinds, chosen as QEMU chooses:

* **intermediate** (``top`` below the active layer and nobody writes it): :class:`CommitJob`
  copies every range some node from ``top`` down to ``base`` holds into ``base`` (read
  through ``top``: the newest bytes), growing ``base`` first if it is shorter. Nothing the
  users see changes while it runs, so it goes straight to its end: :meth:`CommitJob.prepare`
  drains the overlay of ``top``, writes the new backing file name (the base's, or
  ``backing-file``) into its header and points its ``backing`` child at ``base``.
* **active** (``top`` is the active layer, or someone writes it): :class:`ActiveCommitJob`
  is a mirror from ``top`` to ``base`` (:mod:`qsd_py.jobs.mirror`) whose first dirty ranges
  are those held above ``base``; it goes ``ready`` and pivots the users of ``top`` to
  ``base`` on job-complete, as QEMU's commit_active_start.

QEMU inserts a filter node above ``top`` (``filter-node-name``), and so does qsd-py: an
active commit the mirror's ``mirror_top``, an intermediate one a ``commit_top`` node between
the overlay and ``top`` (qsd_py/block/drivers/mirror_top.py). The nodes the job covers carry op
blockers (``Node 'x' is busy``) and are no root nodes meanwhile (``Need a root block
node``), as in QEMU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block.drivers import mirror_top
from qsd_py.block.node import STATUS_ALLOCATED
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.block.reopen import make_read_only, make_writable
from qsd_py.errors import QMPError
from qsd_py.jobs import mirror
from qsd_py.jobs.blockjob import BlockJob
from qsd_py.jobs.stream import chain_below

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode
    from qsd_py.jobs.registry import JobRegistry

CHUNK = 512 * 1024  # QEMU's COMMIT_BUFFER_SIZE
BUSY = "block device is in use by block job: commit"
# Drivers QEMU calls protocols: backing-mask-protocol records their format as raw.
PROTOCOLS = {"file", "host_device", "host_cdrom", "nbd", "rbd", "null-co", "null-aio"}
# What the covered nodes let others do: write and write unchanged, as QEMU.
INTERMEDIATE_SHARED = Perm.WRITE | Perm.WRITE_UNCHANGED


async def allocated_above(top: BlockNode, base: BlockNode, offset: int, n: int) -> tuple[int, bool]:
    """How much of ``[offset, +n)`` has one answer, and whether a node from ``top`` down to
    ``base`` (exclusive) holds it (QEMU's is_allocated_above with the base's overlay)."""
    for node in (top, *chain_below(top, base)):
        st = await node.block_status(offset, n)
        n = min(n, st.length)
        if st.flags & STATUS_ALLOCATED:
            return n, True
    return n, False


def _block(
    job: BlockJob, nodes: list[BlockNode], shared: Perm, role: str, above: BlockNode | None = None
) -> None:
    """QEMU's block_job_add_bdrv: the job uses each node (no permission of its own) and
    blocks operations on it. The parent nodes in the chain keep reading (QEMU's filter
    node takes their reads off the covered nodes), and so does every user of ``above``
    (the node QEMU inserts its filter over: its users then use the filter)."""
    for node in nodes:
        desc = f"commit job '{job.id}' (uses node '{node.node_name}' as '{role}' child)"
        keep = frozenset(k for k, u in node.users.items() if u.is_parent or node is above)
        node.set_user(NodeUser(job._user_key(node), Perm(0), shared, desc, tolerates=keep))
        job._used.append(node)
        node.blockers[job.id] = BUSY


class CommitJob(BlockJob):
    """An intermediate commit: ``top`` .. ``base`` (exclusive) into ``base``; ``device`` is
    the root node of the chain, ``overlay`` the node whose backing node ``top`` is."""

    job_type = "commit"
    creation_drains = (0, 4)
    end_drains = (4, 5)

    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        *,
        graph: BlockGraph,
        device: BlockNode,
        top: BlockNode,
        base: BlockNode,
        overlay: BlockNode,
        backing_file: str | None = None,
        mask_protocol: bool = False,
        on_error: str = "report",
        filter_node_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(registry, job_id, **kwargs)
        self.graph = graph
        self.device = device
        self.top = top
        self.base = base
        self.overlay = overlay
        self.backing_file = backing_file
        self.mask_protocol = mask_protocol
        self.on_error = on_error
        self.filter_node_name = filter_node_name
        self.filter: BlockNode | None = None  # the commit_top node between overlay and top
        self.base_read_only = False  # reopened writable for the job: read-only again after

    # --- nodes ----------------------------------------------------------------------------
    def take_nodes(self) -> None:
        """QEMU's commit_start after the job exists: the filter's name, then the device,
        the covered nodes and the base (written, and grown when shorter than ``top``)."""
        name = self.filter_node_name
        if name is not None and self.graph.find(name) is not None:
            raise QMPError(f"Duplicate nodes with node-name='{name}'")
        name = name or self.graph.generate_name()
        cls = mirror_top.CommitTopNode
        self.filter = mirror_top.insert(self.graph, self.top, name, cls=cls)
        self.overlay.children["backing"].replace(self.filter)  # the overlay reads through it
        dev = self.device
        desc = f"commit job '{self.id}' (uses node '{dev.node_name}' as 'main node' child)"
        dev.set_user(NodeUser(self._user_key(dev), Perm(0), PERM_ALL, desc, is_parent=True))
        self._used.append(dev)
        dev.blockers[self.id] = BUSY
        covered = [self.top, *chain_below(self.top, self.base)]
        _block(self, covered, INTERMEDIATE_SHARED, "intermediate node", above=self.top)
        base = self.base
        _block(self, [base], PERM_ALL, "base")
        perm = Perm.CONSISTENT_READ | Perm.WRITE
        if base.length() < self.top.length():
            perm |= Perm.RESIZE
        desc = f"an unnamed block device (uses node '{base.node_name}' as 'root' child)"
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        user = NodeUser(f"job:{self.id}:base-blk", perm, shared, desc, quiesce=self._quiesce)
        base.set_user(user)
        # QEMU's job reads the top through a BlockBackend of its own that takes nothing
        desc = f"an unnamed block device (uses node '{self.top.node_name}' as 'root' child)"
        self.top.set_user(NodeUser(f"job:{self.id}:top-blk", Perm(0), PERM_ALL, desc))

    def release_nodes(self) -> None:
        """Let go of the nodes; the filter goes (the overlay reads from the top again
        unless the commit linked it to the base)."""
        self.base.remove_user(f"job:{self.id}:base-blk")
        self.top.remove_user(f"job:{self.id}:top-blk")
        for node in self._used:
            node.blockers.pop(self.id, None)
        super().release_nodes()
        fil = self.filter
        if fil is not None:
            link = self.overlay.children.get("backing")
            if link is not None and link.node is fil:
                link.replace(self.top)
            mirror_top.discard(fil)  # type: ignore[arg-type]
            self.filter = None

    async def clean(self) -> None:
        """Let go of the nodes; a base that was read-only is so again (QEMU's commit_clean);
        implicit nodes the chain no longer reaches are closed (the top and what it alone
        reads from)."""
        self.release_nodes()
        if self.base_read_only:
            await make_read_only(self.base)
        await self.graph.drop_orphan(self.top)

    def do_change(self, opts: dict[str, Any]) -> None:
        raise QMPError("Job type does not support change")

    # --- the copy -------------------------------------------------------------------------
    async def run(self) -> None:
        """QEMU's commit_run: grow the base if needed, then copy what is held above it."""
        length = self.top.length()
        self.set_remaining(length)
        if self.base.length() < length:
            await self.base.truncate(length)
        offset = 0
        while offset < length:
            await self.ratelimit_sleep()  # what the last copy owes, as QEMU: before a step
            await self.checkpoint()
            n, copied = await self._step(offset, min(CHUNK, length - offset))
            offset += n
            self.progress_update(n)
            if copied:
                self.limit.delay(n)  # accounted now, slept off before the next step

    async def _step(self, offset: int, n: int) -> tuple[int, bool]:
        """One extent from ``offset``: (its length, whether it was copied); (0, False)
        after an error the policy lets the job survive (the extent is tried again)."""
        n, allocated = await allocated_above(self.top, self.base, offset, n)
        if not allocated:
            return n, False
        buf = memoryview(bytearray(n))
        operation = "read"
        try:
            await self.top.read(offset, buf)
            operation = "write"
            await self.base.write(offset, buf)
        except OSError as err:
            self.io_error(err, operation, self.on_error)
            return 0, False
        return n, True

    # --- the end --------------------------------------------------------------------------
    async def prepare(self) -> None:
        """QEMU's bdrv_drop_intermediate: the overlay records the base's name (or
        ``backing-file``) and format in its image and reads from the base from now on."""
        overlay, base = self.overlay, self.base
        self.base.remove_user(f"job:{self.id}:base-blk")
        async with overlay.drained():
            name = self.backing_file or base.filename()
            fmt = "raw" if self.mask_protocol and base.driver in PROTOCOLS else base.driver
            set_backing = getattr(overlay, "set_backing_file", None)
            if set_backing is not None:
                await set_backing(name, fmt)
            await overlay.replace_child("backing", base)


class ActiveCommitJob(mirror.MirrorJob):
    """An active commit: a mirror from ``top`` into ``base`` (in its backing chain) that
    copies what is held above ``base`` and pivots ``top``'s users to ``base``."""

    job_type = "commit"
    filter_reads = False  # QEMU's filter takes no consistent read of the chain it commits
    creation_drains = (1, 2)
    end_drains = (4, 4)  # its success not measured

    def take_nodes(self) -> None:
        super().take_nodes()
        try:
            covered = chain_below(self.source, self.target)
            _block(self, covered, INTERMEDIATE_SHARED, "intermediate node")
        except BaseException:
            self.release_nodes()
            raise

    def release_nodes(self) -> None:
        for node in self._used:
            node.blockers.pop(self.id, None)
        super().release_nodes()

    def target_perms(self) -> tuple[Perm, Perm]:
        """QEMU's mirror with its target in the source's chain: the backing chain's readers
        and writers stay; resize when the base must grow."""
        perm = Perm.WRITE
        if self.target.length() < self.source.length():
            perm |= Perm.RESIZE
        return perm, Perm.WRITE_UNCHANGED | Perm.CONSISTENT_READ | Perm.WRITE

    async def check_lengths(self) -> None:
        """A shorter base grows to the top's length (QEMU's mirror_run for commit)."""
        if self.target.length() < self.source.length():
            await self.target.truncate(self.source.length())

    async def top_allocated(self, offset: int, length: int) -> tuple[int, bool]:
        return await allocated_above(self.source, self.target, offset, length)

    base_read_only = False  # reopened writable for the job: read-only again if aborted

    async def clean(self) -> None:
        """The base is a node of the chain: it stays open; read-only again if it was and the
        job was aborted (failed or cancelled while running). After the pivot the base is the
        active layer; a soft cancel in ready leaves it writable too, as QEMU's mirror exit."""
        self.drop_filter()
        self.release_nodes()
        if self.base_read_only and self.error is not None:
            await make_read_only(self.target)

    def type_info(self) -> dict[str, Any]:
        return {}  # BlockJobInfo's branch is mirror's only

    def do_change(self, opts: dict[str, Any]) -> None:
        raise QMPError("Job type does not support change")  # QEMU's driver has no change


# --- starting a commit (block-commit) ---------------------------------------------------------
def root_node(graph: BlockGraph, name: str) -> BlockNode | None:
    """QEMU's qmp_get_root_bs: None when no node has the name; a node with a parent (or a
    job using it) is refused."""
    node = graph.find(name)
    if node is None:
        return None
    held = any(u.is_parent or k.startswith("job:") for k, u in node.users.items())
    if node.parents() or node.blockers or held:  # a job's node is no root (its filter too)
        raise QMPError("Need a root block node")
    return node


def in_chain(top: BlockNode, node: BlockNode) -> bool:
    """QEMU's bdrv_chain_contains: ``node`` is ``top`` or a backing node under it."""
    return node is top or node in chain_below(top, None)


def _by_file(top: BlockNode, name: str) -> BlockNode | None:
    """QEMU's bdrv_find_backing_image: the node below ``top`` that its overlay's image names
    so (or whose own file name it is)."""
    node = top
    while (backing := node.child_node("backing")) is not None:
        recorded = getattr(getattr(node, "header", None), "backing_file", None)
        if name in (recorded, backing.filename()):
            return backing
        node = backing
    return None


def _node_in_chain(graph: BlockGraph, top: BlockNode, name: str) -> BlockNode:
    node = graph.lookup(name)
    if not in_chain(top, node):
        raise QMPError(f"'{name}' is not in this backing file chain")
    return node


def _pick_top(graph: BlockGraph, dev: BlockNode, args: dict[str, Any]) -> BlockNode:
    if "top-node" in args and "top" in args:
        raise QMPError("'top-node' and 'top' are mutually exclusive")
    if "top-node" in args:
        return _node_in_chain(graph, dev, args["top-node"])
    if "top" in args and dev.filename() != args["top"]:
        top = _by_file(dev, args["top"])
        if top is None:
            raise QMPError(f"Top image file {args['top']} not found")
        return top
    return dev


def _pick_base(graph: BlockGraph, top: BlockNode, args: dict[str, Any]) -> BlockNode:
    if "base-node" in args and "base" in args:
        raise QMPError("'base-node' and 'base' are mutually exclusive")
    if "base-node" in args:
        return _node_in_chain(graph, top, args["base-node"])
    if "base" in args:
        base = _by_file(top, args["base"])
        if base is None:
            raise QMPError(f"Can't find '{args['base']}' in the backing chain")
        return base
    chain = chain_below(top, None)
    return chain[-1] if chain else top


def _overlay(dev: BlockNode, top: BlockNode) -> BlockNode:
    """The node whose backing node ``top`` is (QEMU's bdrv_find_overlay)."""
    node = dev
    while node.child_node("backing") is not top:
        node = node.child_node("backing")  # type: ignore[assignment]
    return node


async def start(graph: BlockGraph, jobs: JobRegistry, args: dict[str, Any]) -> BlockJob:
    """QEMU's qmp_block_commit checks, in its order, then the job of the right kind."""
    device = args["device"]
    dev = root_node(graph, device)
    if dev is None:
        raise QMPError(f"Device '{device}' not found", "DeviceNotFound")
    top = _pick_top(graph, dev, args)
    base = _pick_base(graph, top, args)
    for node in (top, *chain_below(top, None)):
        for reason in node.blockers.values():
            raise QMPError(f"Node '{node.node_name}' is busy: {reason}")
    if top is base:
        raise QMPError("cannot commit an image into itself")
    common = {
        "auto_finalize": args.get("auto-finalize", True),
        "auto_dismiss": args.get("auto-dismiss", True),
    }
    if top is dev or top.cumulative_perms()[0] & Perm.WRITE:
        return await _start_active(graph, jobs, args, dev, top, base, common)
    overlay = _overlay(dev, top)
    for reason in overlay.blockers.values():
        raise QMPError(f"Node '{overlay.node_name}' is busy: {reason}")
    job = CommitJob(
        jobs,
        args.get("job-id", ""),  # the device's name, which a storage daemon has not: ''
        graph=graph,
        device=dev,
        top=top,
        base=base,
        overlay=overlay,
        backing_file=args.get("backing-file"),
        mask_protocol=args.get("backing-mask-protocol", False),
        on_error=args.get("on-error", "report"),
        filter_node_name=args.get("filter-node-name"),
        **common,
    )
    await _launch_writable(job, base, args)
    return job


async def _launch_writable(job: CommitJob | ActiveCommitJob, base: BlockNode, args: dict) -> None:
    """Launch ``job`` with ``base`` writable (QEMU reopens a read-only base read-write for
    the job and back when the job does not start or ends)."""
    job.base_read_only = base.read_only
    await make_writable(base)
    try:
        await job.launch_drained(args.get("speed", 0))
    except BaseException:
        if job.base_read_only:
            await make_read_only(base)
        raise


async def _start_active(
    graph: BlockGraph,
    jobs: JobRegistry,
    args: dict[str, Any],
    dev: BlockNode,
    top: BlockNode,
    base: BlockNode,
    common: dict[str, Any],
) -> BlockJob:
    """QEMU's commit_active_start: a mirror of ``top`` into ``base`` (its filter node is
    made before the job exists, so a taken name is refused without events)."""
    if "backing-file" in args:
        if top is dev:
            raise QMPError("'backing-file' specified, but 'top' is the active layer")
        raise QMPError("'backing-file' specified, but 'top' has a writer on it")
    name = args.get("filter-node-name")
    if name is not None and graph.find(name) is not None:
        raise QMPError(f"Duplicate nodes with node-name='{name}'")
    on_error = args.get("on-error", "report")
    job = ActiveCommitJob(
        jobs,
        args.get("job-id", ""),
        graph=graph,
        source=top,
        target=base,
        replaces=top,
        sync="top",
        granularity=mirror.default_granularity(base),
        buf_size=mirror.DEFAULT_BUF_SIZE,
        on_source_error=on_error,
        on_target_error=on_error,
        **common,
        filter_node_name=name,
    )
    await _launch_writable(job, base, args)
    return job


async def change_backing_file(graph: BlockGraph, args: dict[str, Any]) -> None:
    """QEMU's qmp_change_backing_file: record another backing file name (and the image's
    own format, as QEMU writes) in the header of a node in ``device``'s chain; the graph
    is not changed."""
    device = args["device"]
    dev = root_node(graph, device)
    if dev is None:
        raise QMPError(f"Cannot find device='{device}' nor node-name='{device}'")
    image = graph.lookup(args["image-node-name"])
    if image.child_node("backing") is None:
        raise QMPError("not allowing backing file change on an image without a backing file")
    for reason in dev.blockers.values():
        raise QMPError(f"Node '{dev.node_name}' is busy: {reason}")
    if not in_chain(dev, image):
        raise QMPError(f"'{device}' and image file are not in the same chain")
    name = args["backing-file"]
    set_backing = getattr(image, "set_backing_file", None)
    if set_backing is None or len(name.encode()) > 1023:
        raise QMPError(f"Could not change backing file to '{name}': Invalid argument")
    was_read_only = image.read_only
    await make_writable(image)
    try:
        async with image.drained():
            await set_backing(name, image.driver)
    finally:
        if was_read_only:
            await make_read_only(image)
