"""The ``stream`` block job (block-stream): copy what the top node reads through from its
backing chain (down to ``base``, exclusive) into the top node, then make ``base`` its backing
node (or none) and record that in the image.

The copy goes by the extents ``block_status_above`` reports between the top and ``base``:
ranges the top holds are skipped, the rest is read through the chain and written into the
top, under a :class:`~qsd_py.block.rangelock.RangeGate` so that a guest write of the same
range waits until the copy of it is done, and the copy waits for guest writes under way
(else old bytes could land over new ones). While the job runs, the top's fast plans write
through its coroutines, where the gate is. As QEMU's, the job puts a ``copy-on-read`` filter
node above the top (``filter-node-name``, else ``#blockNNN``) and moves the top's parents and
exports onto it; the exports' fast path reads through it (the job copies every range
itself), and the filter goes when the job ends. Nothing the guest sees changes, so the job goes
straight on to its end (no ``ready``). :meth:`StreamJob.commit` then drains the top node,
writes the new backing file name into the image (qcow2) and points the ``backing`` child at
``base`` (``Child.replace``) or drops it; implicit intermediate nodes are closed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.block.child import replace_node
from qsd_py.block.node import STATUS_ALLOCATED
from qsd_py.block.perm import PERM_ALL, NodeUser, Perm
from qsd_py.block.rangelock import RangeGate
from qsd_py.errors import QMPError
from qsd_py.jobs.blockjob import BlockJob

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph
    from qsd_py.block.node import BlockNode
    from qsd_py.jobs.registry import JobRegistry

CHUNK = 512 * 1024  # QEMU's STREAM_CHUNK
BUSY = "block device is in use by block job: stream"


def chain_below(top: BlockNode, base: BlockNode | None) -> list[BlockNode]:
    """The backing nodes under ``top`` down to ``base`` (exclusive), top first."""
    out = []
    node = top.child_node("backing") if top.supports_backing else None
    while node is not None and node is not base:
        out.append(node)
        node = node.child_node("backing") if node.supports_backing else None
    return out


class StreamJob(BlockJob):
    job_type = "stream"
    creation_drains = (2, 2)
    end_drains = (3, 2)

    def __init__(
        self,
        registry: JobRegistry,
        job_id: str,
        *,
        graph: BlockGraph,
        top: BlockNode,
        base: BlockNode | None,
        backing_file: str | None,
        on_error: str = "report",
        **kwargs: Any,
    ) -> None:
        super().__init__(registry, job_id, **kwargs)
        self.graph = graph
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.on_error = on_error
        self.below = chain_below(top, base)
        self.gate = RangeGate()
        self.filter: BlockNode | None = None  # the copy-on-read node above the top

    def do_change(self, opts: dict[str, Any]) -> None:
        raise QMPError("Job type does not support change")  # QEMU's driver has no change

    # --- nodes ----------------------------------------------------------------------------
    def take_nodes(self) -> None:
        """QEMU's: the job holds its filter (``main node``, and reads through it as its own
        block device), the top (``active node``) and the streamed nodes."""
        top, fil = self.top, self.filter
        if fil is not None:
            self._use(fil, Perm(0), PERM_ALL, "main node", parent=False)
            desc = f"an unnamed block device (uses node '{fil.node_name}' as 'root' child)"
            shared = PERM_ALL & ~Perm.RESIZE
            fil.set_user(NodeUser(self._root_key, Perm.CONSISTENT_READ, shared, desc,
                                  quiesce=self._quiesce))  # fmt: skip
            self._use(top, Perm(0), PERM_ALL & ~Perm.RESIZE, "active node", parent=True)
        else:
            perm = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
            self._use(top, perm, PERM_ALL & ~Perm.RESIZE, "main node", parent=True)
        for node in self.below:  # QEMU's "intermediate node" children: nobody else writes
            node.set_user(
                NodeUser(
                    self._user_key(node),
                    Perm(0),
                    Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
                    f"stream job '{self.id}' (uses node '{node.node_name}' as "
                    "'intermediate node' child)",
                    is_parent=True,
                    quiesce=self._quiesce,
                )
            )
            self._used.append(node)
        for node in (*([fil] if fil is not None else []), top, *self.below):
            node.blockers[self.id] = BUSY
        top.write_gates.append(self.gate)
        top.close_fast_writes(self)

    def _use(self, node: BlockNode, perm: Perm, shared: Perm, role: str, parent: bool) -> None:
        desc = f"stream job '{self.id}' (uses node '{node.node_name}' as '{role}' child)"
        quiesce = self._quiesce if self.filter is None else None
        node.set_user(NodeUser(self._user_key(node), perm, shared, desc, is_parent=parent,
                               quiesce=quiesce))  # fmt: skip
        self._used.append(node)

    @property
    def _root_key(self) -> str:
        return f"job:{self.id}:root"

    def release_nodes(self) -> None:
        top = self.top
        if self.filter is not None:
            self.filter.remove_user(self._root_key)
            self.filter.blockers.pop(self.id, None)
        if self.gate in top.write_gates:
            top.write_gates.remove(self.gate)
        top.open_fast_writes(self)
        for node in (top, *self.below):
            node.blockers.pop(self.id, None)
        super().release_nodes()

    # --- the copy -------------------------------------------------------------------------
    async def run(self) -> None:
        top = self.top
        if not self.below:
            return  # nothing to stream (QEMU: done at once, len 0)
        length = top.length()
        self.set_remaining(length)
        offset = 0
        while offset < length:
            # What the last copy owes, slept off before a step as QEMU 11.1's stream_run
            # does: a pause (a drain) cuts the sleep short, and the rest is slept after it.
            await self.ratelimit_sleep()
            await self.checkpoint()
            n = min(CHUNK, length - offset)
            copied = await self._step(offset, n)
            offset += copied[0]
            self.progress_update(copied[0])
            if copied[1]:
                self.limit.delay(copied[0])  # accounted now, slept off before the next step

    async def _step(self, offset: int, n: int) -> tuple[int, bool]:
        """One extent from ``offset`` (at most ``n``): (its length, whether it was copied)."""
        top = self.top
        async with self.gate.hold(offset, n):
            status = await top.block_status(offset, n)
            n = status.length
            if status.flags & STATUS_ALLOCATED:
                return n, False
            n, in_base = await self._in_base(offset, n)  # QEMU's is_allocated_above
            if in_base:
                return n, False
            buf = memoryview(bytearray(n))
            try:
                await top.read(offset, buf)
                with self.gate.owned():
                    await top.write(offset, buf)
            except OSError as err:
                self.io_error(err, "write", self.on_error)
                return 0, False
        return n, True

    async def _in_base(self, offset: int, n: int) -> tuple[int, bool]:
        """How much of ``[offset, +n)`` has one answer, and whether that answer is that
        ``base`` or a node below it holds the range, or no node does (it then stays where
        it is: QEMU copies only what a streamed node holds)."""
        for node in self.below:
            st = await node.block_status(offset, n)
            n = min(n, st.length)
            if st.flags & STATUS_ALLOCATED:
                return n, False
        return n, True

    async def clean(self) -> None:
        """The filter's users go back to the top and the filter leaves the graph."""
        fil = self.filter
        if fil is not None:
            replace_node(fil, self.top)
        self.release_nodes()
        if fil is not None:
            fil.implicit = True
            await self.graph.drop_orphan(fil)
            self.filter = None

    # --- the end --------------------------------------------------------------------------
    async def prepare(self) -> None:
        """The top reads the same without the streamed nodes: record and link ``base``
        (in prepare, as QEMU's stream does: a failure to write the header fails the job)."""
        top = self.top
        if not self.below:
            return
        base = self.base
        async with top.drained():
            name = fmt = None
            if base is not None:
                name = self.backing_file or base.filename()
                fmt = base.driver
            set_backing = getattr(top, "set_backing_file", None)
            if set_backing is not None:
                await set_backing(name, fmt)
            old = top.children.get("backing")
            if base is not None:
                if old is not None:
                    await top.replace_child("backing", base)
            elif old is not None:
                old.detach()
                del top.children["backing"]
                await self.graph.drop_orphan(old.node)


# --- starting a stream (block-stream) ---------------------------------------------------------
def _find_in_chain(top: BlockNode, filename: str) -> BlockNode | None:
    for node in chain_below(top, None):
        if node.filename() == filename:
            return node
    return None


async def start(graph: BlockGraph, jobs: JobRegistry, args: dict[str, Any]) -> StreamJob:
    """QEMU's qmp_block_stream checks, in its order, then the job."""
    for a, b in (("base", "base-node"), ("base", "bottom"), ("bottom", "base-node")):
        if a in args and b in args:
            raise QMPError(f"'{a}' and '{b}' cannot be specified at the same time")
    device = args["device"]
    top = graph.lookup_device(device)
    base: BlockNode | None = None
    if "base" in args:
        base = _find_in_chain(top, args["base"])
        if base is None:
            raise QMPError(f"Can't find '{args['base']}' in the backing chain")
    if "base-node" in args:
        base = graph.find(args["base-node"])
        if base is None:
            raise QMPError(f"Cannot find device='' nor node-name='{args['base-node']}'")
        if base not in chain_below(top, None):
            raise QMPError(f"Node '{base.node_name}' is not a backing image of '{top.node_name}'")
    if "bottom" in args:
        bottom = graph.find(args["bottom"])
        if bottom is None:
            raise QMPError(f"Cannot find device='' nor node-name='{args['bottom']}'")
        chain = chain_below(top, None)
        if bottom not in chain:
            raise QMPError(f"Node '{bottom.node_name}' is not a backing image of '{top.node_name}'")
        i = chain.index(bottom)
        base = chain[i + 1] if i + 1 < len(chain) else None
    for node in (top, *chain_below(top, base)):
        for reason in node.blockers.values():
            raise QMPError(f"Node '{node.node_name}' is busy: {reason}")
    if base is None and "backing-file" in args:
        raise QMPError("backing file specified, but streaming the entire chain")
    job = StreamJob(
        jobs,
        args.get("job-id", ""),  # no devices in a storage daemon: QEMU's default is ''
        graph=graph,
        top=top,
        base=base,
        backing_file=args.get("backing-file"),
        on_error=args.get("on-error", "report"),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
    )
    job.filter = await insert_filter(graph, top, args.get("filter-node-name"))
    try:
        await job.launch_drained(args.get("speed", 0))
    except BaseException:
        replace_node(job.filter, top)
        await graph.drop_orphan(job.filter)
        raise
    return job


async def insert_filter(graph: BlockGraph, top: BlockNode, name: str | None) -> BlockNode:
    """QEMU's stream_start: a copy-on-read node over ``top`` (named ``name``, else
    ``#blockNNN``) takes the top's parents and exports."""
    opts: dict[str, Any] = {"driver": "copy-on-read", "file": top.node_name}
    try:
        if name is not None:
            fil = await graph.add({**opts, "node-name": name})
        else:
            fil = await graph.add_implicit(opts)
    except QMPError as err:
        raise QMPError(f"Could not create node: {err.desc}") from err
    fil.job_owned = True  # type: ignore[attr-defined]
    fil.named = name is not None  # type: ignore[attr-defined]
    fil.implicit = True
    replace_node(top, fil, skip=fil)
    return fil
