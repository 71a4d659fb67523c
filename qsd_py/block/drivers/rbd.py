"""The ``rbd`` driver: a node whose bytes are an RBD image of a Ceph cluster, through librbd.

librados' and librbd's C API do the talking, through ctypes (qsd_py/block/rbd/capi.py
says why not Ceph's Python bindings). Calls that block (connecting, opening, resizing, diff
iterate, closing) run on a thread of their own, so an unreachable cluster holds up only the
command that asked, for as long as the configuration's timeouts say (``client mount
timeout``, ``rados osd op timeout``), never the daemon's loop. Reads, writes, zeroes,
discards and flushes are librbd's asynchronous calls, any number in flight, from and into
the caller's buffers; librbd signals their completions on an eventfd the loop watches, as
in QEMU's driver.

Error texts, ``query-named-block-nodes`` and the ``json:`` filename are QEMU 11.1's, as
measured against its daemon on a mini-ceph cluster (tests/rbd).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qsd_py.block.fast_map import FastTarget
from qsd_py.block.node import (
    STATUS_DATA,
    STATUS_OFFSET_VALID,
    STATUS_ZERO,
    BlockNode,
    BlockStatus,
    Buffer,
    qdict_bucket,
    round_to_sectors,
)
from qsd_py.block.rbd import capi
from qsd_py.block.rbd.completions import inbox, result_setter
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

T = TypeVar("T")

#: What QEMU's diff-iterate callback returns to stop at the first allocated extent.
_STOP = -9000
_READ, _WRITE, _DISCARD = capi.CMD_READ, capi.CMD_WRITE, capi.CMD_DISCARD
_FLUSH, _WRITE_ZEROES = capi.CMD_FLUSH, capi.CMD_WRITE_ZEROES
#: The longest stretch one block status call asks librbd about.
_STATUS_WINDOW = 1 << 30


def _errno_of(err: BaseException) -> int:
    return abs(getattr(err, "errno", None) or errno.EIO)


def _strerror(err: BaseException) -> str:
    return os.strerror(_errno_of(err))


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking librados/librbd call on a daemon thread of its own: one that hangs on
    a silent cluster never holds up the loop, the default executor, nor the daemon's exit."""
    fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    box = inbox()

    def run() -> None:
        try:
            value: Any = fn(*args)
        except BaseException as err:  # handed to the waiting coroutine
            value = err
        box.post(result_setter(fut, value))

    threading.Thread(target=run, name="rbd-call", daemon=True).start()
    return await fut


class RbdNode(BlockNode):
    driver = "rbd"
    format_name = "rbd"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.pool: str = opts["pool"]
        self.image_name: str = opts["image"]
        self.namespace: str | None = opts.get("namespace")
        self.snapshot: str | None = opts.get("snapshot")
        self._cluster: capi.Cluster | None = None
        self._ioctx: capi.Ioctx | None = None
        self._image: capi.Image | None = None
        self._size = 0
        self._obj_size = 0
        self._fast_diff = False
        # object index -> end of the allocated extent librbd's diff iterate reported over
        # it: allocation only grows while this node is the image's one writer (RBD's
        # exclusive lock), so a known object needs no second diff iterate until a discard,
        # zeroing or resize forgets them all (and bumps the generation: an answer asked
        # for before is not kept)
        self._allocated: dict[int, int] = {}
        self._allocated_gen = 0
        self._snaps: list[dict[str, Any]] = []

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        capi.libs()
        try:
            await _in_thread(self._connect)
        except BaseException:
            self._release()
            raise
        if self.snapshot is not None and not self.read_only:
            if not self.opts.get("auto-read-only"):
                self._release()
                raise QMPError("rbd snapshots are read-only")
            self.read_only = True

    def _connect(self) -> None:
        """QEMU's order of steps and texts: configuration, connection, pool, namespace,
        image (a missing snapshot fails as reading the header)."""
        self._cluster = cluster = capi.Cluster(self.opts.get("user"))
        conf = self.opts.get("conf")
        try:
            cluster.conf_read_file(conf)
        except OSError as err:
            if conf is not None:
                raise QMPError(f"error reading conf file {conf}: {_strerror(err)}") from err
        self._configure(cluster)
        try:
            cluster.connect()
        except OSError as err:
            raise QMPError(f"error connecting: {_strerror(err)}") from err
        try:
            self._ioctx = ioctx = cluster.open_ioctx(self.pool)
        except OSError as err:
            raise QMPError(f"error opening pool {self.pool}: {_strerror(err)}") from err
        if self.namespace:
            if not ioctx.namespace_exists(self.namespace):
                raise QMPError(f"namespace '{self.namespace}' does not exist")
            ioctx.set_namespace(self.namespace)
        try:
            self._image = capi.Image(ioctx, self.image_name, self.snapshot, self.read_only)
        except OSError as err:
            text = f"error reading header from {self.image_name}: {_strerror(err)}"
            raise QMPError(text) from err
        self._read_geometry()

    def _configure(self, cluster: capi.Cluster) -> None:
        """Monitors, librbd's cache and authentication as QEMU sets them, in its order:
        ``server`` as ``mon_host``, the cache on unless ``cache.direct``, the ``key-secret``
        object's bytes (base64) as ``key``, ``auth-client-required`` joined with ';'."""
        servers = self.opts.get("server")
        if servers:
            hosts = [_mon_address(s["host"], s["port"]) for s in servers]
            cluster.conf_set("mon_host", ";".join(hosts))
        direct = self.opts.get("cache", {}).get("direct", False)
        cluster.conf_set("rbd_cache", "false" if direct else "true")
        secret_id = self.opts.get("key-secret")
        if secret_id is not None:
            if self.graph.objects is None:
                raise QMPError(f"No secret with id '{secret_id}'")
            key = self.graph.objects.secret(secret_id).as_base64()
            try:
                cluster.conf_set("key", key)
            except OSError as err:
                raise QMPError(f"Could not set 'key': {_strerror(err)}") from err
        modes = self.opts.get("auth-client-required")
        if modes:
            cluster.conf_set("auth_client_required", ";".join(modes))

    def _read_geometry(self) -> None:
        image = self._handle()
        self._size, self._obj_size = image.stat()
        fast_diff = bool(image.features() & capi.FEATURE_FAST_DIFF)
        self._fast_diff = fast_diff and not image.flags() & capi.FLAG_FAST_DIFF_INVALID
        self._snaps = image.list_snaps()

    async def prepare_close(self) -> None:
        """Write back librbd's cache before the image is closed."""
        if self._image is not None and not self.read_only:
            await self.do_flush()

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        image, self._image = self._image, None
        if image is not None:
            image.close()
        ioctx, self._ioctx = self._ioctx, None
        if ioctx is not None:
            ioctx.close()
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.shutdown()

    def fast_target(self) -> FastTarget | None:
        """The image itself: the exports in the daemon send READ and WRITE straight to
        librbd (qsd_py/block/fast_io.py), without this node's coroutines."""
        if self._image is None:
            return None
        return FastTarget(image=self._image, writable=not self.read_only)

    def _handle(self) -> capi.Image:
        if self._image is None:
            raise OSError(errno.EIO, "RBD node is closed")
        return self._image

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        return round_to_sectors(self._size)

    def exact_length(self) -> int:
        return self._size

    async def do_truncate(self, length: int, prealloc: str) -> None:
        """librbd resizes (QEMU allows no preallocation on RBD)."""
        if prealloc != "off":
            raise OSError(errno.ENOTSUP, f"Unsupported preallocation mode '{prealloc}'")
        if self.read_only:
            raise OSError(errno.EACCES, "Image is read-only")
        image = self._handle()
        self._forget_allocated()
        await _in_thread(image.resize, length)
        self._size = length

    async def do_allocated_size(self) -> int:
        return 0

    # --- I/O ------------------------------------------------------------------------------
    async def _aio(
        self,
        cmd: int,
        offset: int,
        length: int,
        fn: Callable[..., int],
        *args: Any,
        keep: Any = None,
        tail: tuple[int, ...] = (),
    ) -> int:
        """One asynchronous librbd call (capi.Image.io). A failure is reported on stderr as
        QEMU's driver does (``cmd``: its request kinds)."""
        try:
            return await self._handle().io(fn, *args, keep=keep, tail=tail)
        except OSError as err:
            capi.report_failure(cmd, offset, length, err.errno or errno.EIO)
            raise

    async def do_read(self, offset: int, buf: memoryview) -> None:
        """librbd reads straight into ``buf`` (a read-only or scattered view gets a bounce
        buffer). A read past the image's real end (the sector rounding) reads zeroes."""
        image = self._handle()
        n = max(0, min(len(buf), self._size - offset))
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        if not n:
            return
        target = buf[:n]
        bounce = target.readonly or not target.contiguous
        if bounce:
            target = memoryview(bytearray(n))
        addr, keep = capi.buffer_address(target)
        got = await self._aio(_READ, offset, n, image.lib.rbd_aio_read, offset, n, addr, keep=keep)
        if bounce:
            buf[:n] = target
        if got < n:
            buf[got:n] = bytes(n - got)

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        image = self._handle()
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not n:
            return
        addr, keep = capi.buffer_address(data)
        await self._aio(_WRITE, offset, n, image.lib.rbd_aio_write, offset, n, addr, keep=keep)

    async def do_flush(self) -> None:
        image = self._handle()
        await self._aio(_FLUSH, 0, 0, image.lib.rbd_aio_flush)

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        """librbd's write-zeroes; without ``unmap`` (or discard=ignore) the range stays
        allocated (thick provisioning), as QEMU asks. QEMU's rbd driver takes no
        BDRV_REQ_NO_FALLBACK, so such a request is refused."""
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        if no_fallback:
            raise OSError(errno.ENOTSUP, "RBD cannot promise a fast zeroing")
        image = self._handle()
        self._forget_allocated()
        flags = 0 if unmap and self.discard_unmap else capi.WRITE_ZEROES_FLAG_THICK_PROVISION
        fn = image.lib.rbd_aio_write_zeroes
        await self._aio(_WRITE_ZEROES, offset, length, fn, offset, length, tail=(flags, 0))

    async def do_discard(self, offset: int, length: int) -> None:
        if not self.discard_unmap or self.read_only:
            return
        image = self._handle()
        self._forget_allocated()
        await self._aio(_DISCARD, offset, length, image.lib.rbd_aio_discard, offset, length)

    def _forget_allocated(self) -> None:
        self._allocated.clear()
        self._allocated_gen += 1

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """QEMU's answer from librbd's diff iterate (whole objects, parents included): the
        range up to the first allocated object reads as zeroes, that object is data.
        Without a valid fast-diff map everything is data, as in QEMU. An object already
        found allocated is answered from memory: a copy reading an image in 256 KiB
        requests (nbdcopy) asks about each object 16 times, and each diff iterate is a
        thread and librbd's object-map walk."""
        data = BlockStatus(STATUS_DATA | STATUS_OFFSET_VALID, length, self, offset)
        if offset >= self._size:
            return BlockStatus(STATUS_ZERO | STATUS_OFFSET_VALID, length, self, offset)
        if not self._fast_diff:
            return data
        image = self._handle()
        want = min(length, self._size - offset, _STATUS_WINDOW)
        known = self._allocated.get(offset // self._obj_size, 0)
        if known > offset:
            end = min(known, offset + want)
            return BlockStatus(STATUS_DATA | STATUS_OFFSET_VALID, end - offset, self, offset)
        gen = self._allocated_gen
        first = await _in_thread(self._first_allocated, image, offset, want)
        if first is not None and gen == self._allocated_gen:
            self._remember_allocated(*first)
        if first is None:
            return BlockStatus(STATUS_ZERO | STATUS_OFFSET_VALID, want, self, offset)
        start, n = first
        if start > offset:
            return BlockStatus(STATUS_ZERO | STATUS_OFFSET_VALID, start - offset, self, offset)
        end = min(start + n, offset + want)
        return BlockStatus(STATUS_DATA | STATUS_OFFSET_VALID, end - offset, self, offset)

    def _remember_allocated(self, start: int, n: int) -> None:
        """``[start, +n)`` is allocated: every object it covers, up to its end."""
        size = self._obj_size
        for obj in range(start // size, (start + n - 1) // size + 1):
            self._allocated[obj] = start + n

    def _first_allocated(
        self, image: capi.Image, offset: int, length: int
    ) -> tuple[int, int] | None:
        """The first allocated extent in ``[offset, +length)``, clipped to it (diff iterate
        stopped there), or None."""
        found: list[tuple[int, int]] = []

        def extent(off: int, n: int, exists: bool) -> int:
            if not exists:
                return 0
            start = max(off, offset)
            found.append((start, min(off + n, offset + length) - start))
            return _STOP

        ret = image.diff_iterate(offset, length, extent)
        if ret < 0 and not found:
            capi.check(ret)
        return found[0] if found else None

    # --- introspection --------------------------------------------------------------------
    def full_options(self) -> dict[str, Any]:
        """QEMU's flattened options (``server.0.host``), in its QDict's order."""
        flat: dict[str, Any] = {"driver": "rbd", "pool": self.pool, "image": self.image_name}
        for key in ("namespace", "conf", "snapshot", "user", "key-secret"):
            if key in self.opts:
                flat[key] = self.opts[key]
        for i, mode in enumerate(self.opts.get("auth-client-required", [])):
            flat[f"auth-client-required.{i}"] = mode
        for i, server in enumerate(self.opts.get("server", [])):
            flat[f"server.{i}.host"] = server["host"]
            flat[f"server.{i}.port"] = server["port"]
        return {k: flat[k] for k in sorted(flat, key=qdict_bucket)}

    def filename(self) -> str:
        return "json:" + json.dumps(self.full_options())

    def limits(self) -> dict[str, int]:
        return {
            "request-alignment": 1,
            "min-mem-alignment": 512,
            "opt-mem-alignment": 4096,
            "max-iov": 1024,
        }

    def image_extra(self) -> dict[str, Any]:
        """The object size as cluster size; the image's snapshots as QEMU lists them (the
        name as id, the image size at the snapshot as VM state size, no dates); as they
        were when the node was opened."""
        extra: dict[str, Any] = {"dirty-flag": False, "cluster-size": self._obj_size}
        if self._snaps:
            extra["snapshots"] = [_snapshot_info(s) for s in self._snaps]
        extra["format-specific"] = {"type": "rbd", "data": {}}
        return extra

    def allocated_size_now(self) -> int | None:
        """Unknown (QEMU's rbd driver cannot say it either)."""
        return None


NODE = RbdNode


def _mon_address(host: str, port: str) -> str:
    """One ``mon_host`` entry: an IPv6 address in brackets, as QEMU writes it."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _snapshot_info(snap: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": snap["name"],
        "name": snap["name"],
        "vm-state-size": snap["size"],
        "date-sec": 0,
        "date-nsec": 0,
        "vm-clock-sec": 0,
        "vm-clock-nsec": 0,
        "icount": 0,
    }
