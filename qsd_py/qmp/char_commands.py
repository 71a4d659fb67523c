"""QMP commands on chardevs: chardev-add/-change/-remove/-send-break, query-chardev,
query-chardev-backends, ringbuf-read/-write, with QEMU 11.1's texts and semantics."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from qsd_py.commands import qmp_command
from qsd_py.encodings import decode_base64, decode_utf8, encode_utf8
from qsd_py.errors import QMPError
from qsd_py.qmp.char_backends import BACKEND_NAMES, RingbufBackend

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon


@qmp_command("chardev-add")
async def chardev_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return await daemon.chardevs.add(args["id"], args["backend"])


@qmp_command("chardev-change")
async def chardev_change(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return await daemon.chardevs.change(args["id"], args["backend"])


@qmp_command("chardev-remove")
async def chardev_remove(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.chardevs.remove(args["id"])
    return {}


@qmp_command("chardev-send-break")
async def chardev_send_break(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    chardev = daemon.chardevs.find(args["id"])
    if chardev is None:
        raise QMPError(f"Chardev '{args['id']}' not found")
    chardev.send_break()
    return {}


@qmp_command("query-chardev")
async def query_chardev(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    """In creation order (see :mod:`qsd_py.qmp.char_registry`); keys in QEMU's order."""
    return [
        {"frontend-open": c.frontend_open, "filename": c.describe(), "label": c.id}
        for c in daemon.chardevs.all()
    ]


@qmp_command("query-chardev-backends")
async def query_chardev_backends(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": name} for name in BACKEND_NAMES]


def _ringbuf(daemon: Daemon, device: str) -> RingbufBackend:
    chardev = daemon.chardevs.find(device)
    if chardev is None:
        raise QMPError(f"Device '{device}' not found")
    if not isinstance(chardev, RingbufBackend):
        raise QMPError(f"{device} is not a ringbuf device")
    return chardev


@qmp_command("ringbuf-write")
async def ringbuf_write(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    ring = _ringbuf(daemon, args["device"])
    if args.get("format") == "base64":
        ring.write(decode_base64(args["data"]))
    else:
        ring.write(encode_utf8(args["data"]))
    return {}


@qmp_command("ringbuf-read")
async def ringbuf_read(daemon: Daemon, args: dict[str, Any]) -> str:
    ring = _ringbuf(daemon, args["device"])
    if args["size"] <= 0:
        raise QMPError("size must be greater than zero")
    data = ring.read(args["size"])
    if args.get("format") == "base64":
        return base64.b64encode(data).decode("ascii")
    return decode_utf8(data)
