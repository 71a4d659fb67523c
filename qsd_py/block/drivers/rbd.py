"""The ``rbd`` driver: a node whose bytes are an RBD image of a Ceph cluster, through librbd.

Ceph's own bindings do the talking (qsd_py/block/rbd/bindings.py says how they are
found). Calls that block (connecting, opening, resizing, diff iterate, closing) run on a
thread of their own, so an unreachable cluster holds up only the command that asked, for
as long as the configuration's timeouts say (``client mount timeout``, ``rados osd op
timeout``), never the daemon's loop. Reads, writes, zeroes, discards and flushes are
librbd's asynchronous calls, any number in flight; their completions come back on librbd's
threads and reach the waiting loop through qsd_py/block/rbd/completions.py.

Error texts, ``query-named-block-nodes`` and the ``json:`` filename are QEMU 11.1's, as
measured against its daemon on a mini-ceph cluster (tests/rbd).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

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
from qsd_py.block.rbd import bindings
from qsd_py.block.rbd.completions import inbox, result_setter
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

T = TypeVar("T")

#: What QEMU's diff-iterate callback returns to stop at the first allocated extent.
_STOP = -9000
# QEMU's request kinds, which its failure message names by number.
_READ, _WRITE, _DISCARD, _FLUSH, _WRITE_ZEROES = range(5)
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


def _as_write_buffer(data: Buffer) -> bytes | bytearray:
    """What the binding's ``aio_write`` takes (bytes or bytearray): the caller's own object
    where the view covers all of it, else a copy."""
    if isinstance(data, (bytes, bytearray)):
        return data
    obj = data.obj
    if isinstance(obj, (bytes, bytearray)) and data.nbytes == len(obj) and data.contiguous:
        return obj
    return data.tobytes()


class RbdNode(BlockNode):
    driver = "rbd"
    format_name = "rbd"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.pool: str = opts["pool"]
        self.image_name: str = opts["image"]
        self.namespace: str | None = opts.get("namespace")
        self.snapshot: str | None = opts.get("snapshot")
        self._rados_mod: Any = None
        self._rbd_mod: Any = None
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._size = 0
        self._obj_size = 0
        self._fast_diff = False
        self._snaps: list[dict[str, Any]] = []

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        self._rados_mod, self._rbd_mod = bindings.load()
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
        rados, rbd = self._rados_mod, self._rbd_mod
        self._cluster = cluster = rados.Rados(rados_id=self.opts.get("user"))
        conf = self.opts.get("conf")
        try:
            cluster.conf_read_file(conf)
        except rados.Error as err:
            if conf is not None:
                raise QMPError(f"error reading conf file {conf}: {_strerror(err)}") from err
        self._configure(cluster)
        try:
            cluster.connect()
        except rados.Error as err:
            raise QMPError(f"error connecting: {_strerror(err)}") from err
        try:
            self._ioctx = cluster.open_ioctx(self.pool)
        except rados.Error as err:
            raise QMPError(f"error opening pool {self.pool}: {_strerror(err)}") from err
        if self.namespace:
            if not rbd.RBD().namespace_exists(self._ioctx, self.namespace):
                raise QMPError(f"namespace '{self.namespace}' does not exist")
            self._ioctx.set_namespace(self.namespace)
        try:
            self._image = rbd.Image(
                self._ioctx, self.image_name, snapshot=self.snapshot, read_only=self.read_only
            )
        except rbd.Error as err:
            text = f"error reading header from {self.image_name}: {_strerror(err)}"
            raise QMPError(text) from err
        self._read_geometry()

    def _configure(self, cluster: Any) -> None:
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
            except self._rados_mod.Error as err:
                raise QMPError(f"Could not set 'key': {_strerror(err)}") from err
        modes = self.opts.get("auth-client-required")
        if modes:
            cluster.conf_set("auth_client_required", ";".join(modes))

    def _read_geometry(self) -> None:
        image, rbd = self._image, self._rbd_mod
        st = image.stat()
        self._size = st["size"]
        self._obj_size = st["obj_size"]
        fast_diff = bool(image.features() & rbd.RBD_FEATURE_FAST_DIFF)
        self._fast_diff = fast_diff and not image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID
        self._snaps = [dict(s) for s in image.list_snaps()]

    async def prepare_close(self) -> None:
        """Write back librbd's cache before the image is closed."""
        if self._image is not None and not self.read_only:
            await self.do_flush()

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        for name in ("_image", "_ioctx"):
            obj = getattr(self, name)
            setattr(self, name, None)
            if obj is not None:
                obj.close()
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.shutdown()

    def _handle(self) -> Any:
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
        await _in_thread(image.resize, length)
        self._size = length

    async def do_allocated_size(self) -> int:
        return 0

    # --- I/O ------------------------------------------------------------------------------
    async def _aio(
        self, cmd: int, offset: int, length: int, start: Callable[[Callable[..., None]], Any]
    ) -> Any:
        """Start one asynchronous librbd call and wait for its completion, which librbd's
        thread hands to this loop's inbox; a read's callback carries the data. A failure
        is reported on stderr as QEMU's driver does (``cmd``: its request kinds)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        box = inbox()

        def done(completion: Any, data: Any = None) -> None:
            ret = completion.get_return_value()
            value = OSError(-ret, os.strerror(-ret)) if ret < 0 else data
            box.post(result_setter(fut, value))

        start(done)
        try:
            return await fut
        except OSError as err:
            print(
                f"qsd-py: rbd request failed: cmd {cmd} offset {offset} bytes {length} "
                f"flags 0 task.ret {-err.errno} ({os.strerror(err.errno)})",
                file=sys.stderr,
                flush=True,
            )
            raise

    async def do_read(self, offset: int, buf: memoryview) -> None:
        """The binding reads into a bytes object of its own: copied into ``buf`` on the
        loop. A read past the image's real end (the sector rounding) reads zeroes."""
        image = self._handle()
        n = max(0, min(len(buf), self._size - offset))
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        if not n:
            return
        data = await self._aio(_READ, offset, n, lambda cb: image.aio_read(offset, n, cb))
        buf[: len(data)] = data
        if len(data) < n:
            buf[len(data) : n] = bytes(n - len(data))

    async def do_write(self, offset: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Block node is read-only")
        image = self._handle()
        payload = _as_write_buffer(data)
        await self._aio(
            _WRITE, offset, len(payload), lambda cb: image.aio_write(payload, offset, cb)
        )

    async def do_flush(self) -> None:
        image = self._handle()
        await self._aio(_FLUSH, 0, 0, image.aio_flush)

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
        thick = self._rbd_mod.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        flags = 0 if unmap and self.discard_unmap else thick
        await self._aio(
            _WRITE_ZEROES,
            offset,
            length,
            lambda cb: image.aio_write_zeroes(offset, length, cb, zero_flags=flags),
        )

    async def do_discard(self, offset: int, length: int) -> None:
        if not self.discard_unmap or self.read_only:
            return
        image = self._handle()
        await self._aio(_DISCARD, offset, length, lambda cb: image.aio_discard(offset, length, cb))

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        """QEMU's answer from librbd's diff iterate (whole objects, parents included): the
        range up to the first allocated object reads as zeroes, that object is data.
        Without a valid fast-diff map everything is data, as in QEMU."""
        data = BlockStatus(STATUS_DATA | STATUS_OFFSET_VALID, length, self, offset)
        if offset >= self._size:
            return BlockStatus(STATUS_ZERO | STATUS_OFFSET_VALID, length, self, offset)
        if not self._fast_diff:
            return data
        image = self._handle()
        want = min(length, self._size - offset, _STATUS_WINDOW)
        first = await _in_thread(self._first_allocated, image, offset, want)
        if first is None:
            return BlockStatus(STATUS_ZERO | STATUS_OFFSET_VALID, want, self, offset)
        start, n = first
        if start > offset:
            return BlockStatus(STATUS_ZERO | STATUS_OFFSET_VALID, start - offset, self, offset)
        end = min(start + n, offset + want)
        return BlockStatus(STATUS_DATA | STATUS_OFFSET_VALID, end - offset, self, offset)

    def _first_allocated(self, image: Any, offset: int, length: int) -> tuple[int, int] | None:
        """The first allocated extent in ``[offset, +length)``, clipped to it (diff iterate
        stopped there), or None."""
        found: list[tuple[int, int]] = []

        def extent(off: int, n: int, exists: bool) -> int:
            if not exists:
                return 0
            start = max(off, offset)
            found.append((start, min(off + n, offset + length) - start))
            return _STOP

        try:
            image.diff_iterate(offset, length, None, extent, include_parent=True, whole_object=True)
        except self._rbd_mod.Error:
            if not found:
                raise
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
