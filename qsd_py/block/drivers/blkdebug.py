"""The ``blkdebug`` filter: passes requests to its ``image`` child and fails chosen ones,
as QEMU's blkdebug does for its iotests.

Rules come from ``inject-error``/``set-state`` options and from a ``config`` file in QEMU's
syntax (``[inject-error]`` / ``[set-state]`` groups of ``key = "value"`` lines). Each rule
belongs to an event (``BlkdebugEvent``): when a driver above raises the event (through
:meth:`BlockNode.debug_event`) in the rule's state (or any, without ``state``), a
``set-state`` rule moves the node to ``new_state`` and an ``inject-error`` rule becomes
active. The first active rule that matches a later request's kind (``iotype``) and sector
fails it with ``errno`` (EIO by default); a ``once`` rule is then removed. The node starts
in state 1.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qsd_py.block.node import SECTOR_SIZE, BlockNode, BlockStatus, Buffer, qdict_bucket
from qsd_py.block.perm import PERM_ALL, Perm
from qsd_py.errors import QMPError

if TYPE_CHECKING:
    from qsd_py.block.graph import BlockGraph

DEFAULT_IOTYPES = frozenset({"read", "write", "write-zeroes", "discard", "flush"})
_PERM_BITS = {
    "consistent-read": Perm.CONSISTENT_READ,
    "write": Perm.WRITE,
    "write-unchanged": Perm.WRITE_UNCHANGED,
    "resize": Perm.RESIZE,
}
_GROUP_KEYS = {
    "inject-error": {"event", "state", "iotype", "errno", "sector", "once", "immediately"},
    "set-state": {"event", "state", "new_state"},
}
INT_MAX = (1 << 31) - 1


@dataclass(eq=False)
class Rule:
    """One rule; ``state`` 0 matches any state. ``offset`` -1: any request."""

    event: str
    state: int = 0
    new_state: int | None = None  # set-state rules
    errno: int = errno.EIO
    offset: int = -1
    iotypes: frozenset[str] = DEFAULT_IOTYPES
    once: bool = False
    immediately: bool = False

    def matches(self, offset: int, nbytes: int, iotype: str) -> bool:
        """QEMU's test: the injected sector lies inside the request (or is its offset, for
        requests without length), and the request is of a kind the rule fails."""
        at = self.offset
        hit = at == -1 or (at >= offset and at < offset + nbytes if nbytes else at == offset)
        return hit and iotype in self.iotypes


class BlkdebugNode(BlockNode):
    driver = "blkdebug"
    format_name = "blkdebug"

    def __init__(self, graph: BlockGraph, opts: dict[str, Any]) -> None:
        super().__init__(graph, opts)
        self.rules: dict[str, list[Rule]] = {}
        self.armed: list[Rule] = []  # the rules that fail requests (not BlockNode.active)
        self.state = 1
        self.counted = False
        self.take = _perm_bits(opts.get("take-child-perms", []))
        self.unshare = _perm_bits(opts.get("unshare-child-perms", []))

    @property
    def image(self) -> BlockNode:
        return self.children["image"].node

    # --- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        config = self.opts.get("config")
        if config is not None:
            for group, values in _read_config(config):
                self._add_rule(group, values)
        for values in self.opts.get("inject-error", []):
            self._add_rule("inject-error", values)
        for values in self.opts.get("set-state", []):
            self._add_rule("set-state", values)
        child = await self.graph.open_child(self, self.opts["image"])
        self.attach_child("image", child, *self._child_perms(Perm(0), PERM_ALL))
        self._check_limits(child)
        self.graph.debug_nodes += 1
        self.counted = True

    def close(self) -> None:
        if self.counted:
            self.graph.debug_nodes -= 1
            self.counted = False

    def _add_rule(self, group: str, values: dict[str, Any]) -> None:
        """A rule from options or a config group (values are strings from a file)."""
        event = values.get("event")
        if event is None:
            raise QMPError("Missing event name for rule")
        event = str(event)
        if event not in schema_enum_values("BlkdebugEvent"):
            raise QMPError(f"invalid parameter value: {event}")
        rule = Rule(event=event, state=_number(values, "state", 0))
        if group == "set-state":
            rule.new_state = _number(values, "new_state", 0)
        else:
            rule.errno = _number(values, "errno", errno.EIO)
            sector = _number(values, "sector", -1)
            rule.offset = sector * SECTOR_SIZE if sector >= 0 else -1
            rule.once = _boolean(values, "once")
            rule.immediately = _boolean(values, "immediately")
            iotype = values.get("iotype")
            if iotype is not None:
                if iotype not in schema_enum_values("BlkdebugIOType"):
                    raise QMPError(f"invalid parameter value: {iotype}")
                rule.iotypes = frozenset({iotype})
        self.rules.setdefault(event, []).insert(0, rule)  # QEMU's list: newest first

    def _check_limits(self, child: BlockNode) -> None:
        """QEMU's checks of the announced limits against each other and the child's."""
        for key in ("align", "max-transfer", "opt-write-zero", "max-write-zero"):
            _unsigned(self.opts, key)
        for key in ("opt-discard", "max-discard"):
            _unsigned(self.opts, key)
        align_opt = self.opts.get("align", 0)
        if align_opt and (align_opt >= INT_MAX or align_opt & (align_opt - 1)):
            raise QMPError(f"Cannot meet constraints with align {align_opt}")
        align = max(align_opt, child.limits().get("request-alignment", 1))
        checks = (
            ("max-transfer", align),
            ("opt-write-zero", align),
            ("max-write-zero", max(self.opts.get("opt-write-zero", 0), align)),
            ("opt-discard", align),
            ("max-discard", max(self.opts.get("opt-discard", 0), align)),
        )
        for key, unit in checks:
            value = self.opts.get(key, 0)
            if value and (value < 0 or value >= INT_MAX or value % unit):
                raise QMPError(f"Cannot meet constraints with {key} {value}")

    # --- permissions ----------------------------------------------------------------------
    def _child_perms(self, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return perm | self.take, shared & ~self.unshare

    def apply_perms(self, perm: Perm, shared: Perm) -> None:
        if "image" in self.children:
            self.attach_child("image", self.image, *self._child_perms(perm, shared))

    # --- events and injection -------------------------------------------------------------
    def debug_event(self, event: str) -> None:
        """QEMU's blkdebug_debug_event: every rule of the event in the current state acts;
        the state changes after all of them ran."""
        new_state = self.state
        armed = False
        for rule in self.rules.get(event, ()):
            if rule.state and rule.state != self.state:
                continue
            if rule.new_state is not None:
                new_state = rule.new_state
                continue
            if not armed:  # the first injecting rule of an event replaces the active set
                self.armed = []
                armed = True
            self.armed.insert(0, rule)
        self.state = new_state

    async def _check(self, offset: int, nbytes: int, iotype: str) -> None:
        """Fail the request if an active rule says so."""
        for rule in self.armed:
            if rule.matches(offset, nbytes, iotype):
                break
        else:
            return
        if not rule.errno:
            return
        if rule.once:
            self.armed.remove(rule)
            self.rules[rule.event].remove(rule)
        if not rule.immediately:
            await asyncio.sleep(0)
        raise OSError(rule.errno, os.strerror(rule.errno))

    # --- size -----------------------------------------------------------------------------
    def length(self) -> int:
        return self.image.length()

    async def do_truncate(self, length: int, prealloc: str) -> None:
        await self.image.truncate(length, prealloc)

    async def do_allocated_size(self) -> int:
        return await self.image.allocated_size()

    def allocated_size_now(self) -> int | None:
        return None  # QEMU's blkdebug does not say

    # --- I/O ------------------------------------------------------------------------------
    async def do_read(self, offset: int, buf: memoryview) -> None:
        if self.armed:
            await self._check(offset, len(buf), "read")
        await self.image.read(offset, buf)

    async def do_write(self, offset: int, data: Buffer) -> None:
        """QEMU's generic write path raises ``pwritev`` on the node before its driver's
        write (a rule it arms fails that very write) and ``pwritev_done`` after, failed or
        not."""
        self.debug_event("pwritev")
        try:
            if self.armed:
                await self._check(offset, len(data), "write")
            await self.image.write(offset, data)
        finally:
            self.debug_event("pwritev_done")

    async def do_flush(self) -> None:
        if self.armed and self.flush_needed:
            await self._check(0, 0, "flush")
        await self.image.flush()

    async def do_write_zeroes(
        self, offset: int, length: int, unmap: bool, no_fallback: bool = False
    ) -> None:
        self.debug_event("pwritev_zero")  # as a write's events, for a zeroing request
        try:
            if self.armed:
                await self._check(offset, length, "write-zeroes")
            await self.image.write_zeroes(offset, length, unmap, no_fallback)
        finally:
            self.debug_event("pwritev_done")

    async def do_discard(self, offset: int, length: int) -> None:
        if self.armed:
            await self._check(offset, length, "discard")
        await self.image.discard(offset, length)

    async def do_block_status(self, offset: int, length: int) -> BlockStatus:
        if self.armed:
            await self._check(offset, length, "block-status")
        return await self.image.block_status(offset, length)

    # --- introspection --------------------------------------------------------------------
    def filename(self) -> str:
        """``blkdebug:CONFIG:IMAGE`` when only those options were given, else ``json:``
        with the options flattened as QEMU's block layer flattens them."""
        own = {k: v for k, v in self.opts.items() if k not in _BASE_KEYS}
        image = self.image.filename()
        if set(own) <= {"config", "image", "driver"} and not image.startswith("json:"):
            return f"blkdebug:{self.opts.get('config', '')}:{image}"
        desc: dict[str, Any] = {"image": self.image.full_options(), "driver": self.driver}
        for key, value in own.items():
            if key not in ("image", "driver"):
                _flatten(desc, key, value)
        return "json:" + json.dumps({k: desc[k] for k in sorted(desc, key=qdict_bucket)})

    def full_options(self) -> dict[str, Any]:
        return (
            json.loads(self.filename()[5:])
            if self.filename().startswith("json:")
            else {
                "driver": self.driver,
                "filename": self.filename(),
            }
        )

    def image_extra(self) -> dict[str, Any]:
        return {"dirty-flag": False}

    def limits(self) -> dict[str, int]:
        own = super().limits()
        if self.opts.get("align"):
            own["request-alignment"] = self.opts["align"]
        if self.opts.get("max-transfer"):
            own["max-transfer"] = self.opts["max-transfer"]
        return own


_BASE_KEYS = {
    "node-name",
    "discard",
    "cache",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
}


def _flatten(out: dict[str, Any], key: str, value: Any) -> None:
    """``inject-error.0.event``: QEMU's flat option names for lists and dicts."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _flatten(out, f"{key}.{i}", item)
    elif isinstance(value, dict):
        for sub, item in value.items():
            _flatten(out, f"{key}.{sub}", item)
    else:
        out[key] = value


def schema_enum_values(name: str) -> list[str]:
    """An enum's values as qapi/block-core.json declares them (the only list of the
    event names): a config file's strings are checked against them."""
    from qsd_py.qapi.schema import load_schema

    typ = load_schema().model.types[name]
    return list(getattr(typ, "values", []))


def _unsigned(opts: dict[str, Any], key: str) -> None:
    """QEMU reads the limits as unsigned option numbers: a negative one is refused so."""
    value = opts.get(key)
    if value is not None and value < 0:
        raise QMPError(f"Value '{value}' is out of range for parameter '{key}'")


def _perm_bits(names: list[str]) -> Perm:
    bits = Perm(0)
    for name in names:
        bits |= _PERM_BITS[name]
    return bits


def _number(values: dict[str, Any], key: str, default: int) -> int:
    """An option's number; from a config file a string, which QEMU parses as a number."""
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, int):
        return value
    try:
        return int(value, 0)
    except ValueError:
        raise QMPError(f"Parameter '{key}' expects a number") from None


def _boolean(values: dict[str, Any], key: str) -> bool:
    value = values.get(key, False)
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QMPError(f"Parameter '{key}' expects 'on' or 'off'")


_GROUP_RE = re.compile(r"\[([^\]]{1,63})\]")
# QEMU's sscanf patterns: a first word is the key even when no '= "value"' follows it
# (the value is then empty), only a line without any word is a parse error.
_KEY_RE = re.compile(r"\s*(\S{1,63})")
_VALUE_RE = re.compile(r"\s*=\s*\"([^\"]{1,1023})")


def _read_config(path: str) -> list[tuple[str, dict[str, str]]]:
    """The groups of a blkdebug config file, in QEMU's config syntax."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as err:
        raise QMPError(f"Could not open '{path}': {os.strerror(err.errno or errno.EIO)}") from None
    groups: list[tuple[str, dict[str, str]]] = []
    for line in lines:
        if line in ("\n", "") or line.startswith("#"):
            continue
        group = _GROUP_RE.match(line)
        if group:
            name = group.group(1)
            if name not in _GROUP_KEYS:
                raise QMPError(f"There is no option group '{name}'")
            groups.append((name, {}))
            continue
        key = _KEY_RE.match(line)
        if key is None:
            raise QMPError("parse error")
        if not groups:
            raise QMPError("no group defined")
        if key.group(1) not in _GROUP_KEYS[groups[-1][0]]:
            raise QMPError(f"Invalid parameter '{key.group(1)}'")
        value = _VALUE_RE.match(line, key.end())
        groups[-1][1][key.group(1)] = value.group(1) if value else ""
    return groups


NODE = BlkdebugNode
