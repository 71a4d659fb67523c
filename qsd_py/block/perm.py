"""QEMU's block permission model: what a user of a node needs and what it lets others do.

Every user of a node (an export, a QMP command, a parent node) states the permissions it
takes (``perm``) and the ones it tolerates in others (``shared``). Conflicts are refused with
QEMU's texts, and the file driver mirrors the result into OFD lock bytes so that qsd-py and
QEMU processes opening one image see each other's permissions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntFlag
from typing import Any


class Perm(IntFlag):
    """QEMU's BLK_PERM_* bits; the bit number is also the lock byte offset (100+bit, 200+bit)."""

    CONSISTENT_READ = 1
    WRITE = 2
    WRITE_UNCHANGED = 4
    RESIZE = 8


PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
PERM_NONE = Perm(0)

# QEMU's names for the bits, in bit order (used in conflict and lock error texts).
PERM_NAMES: tuple[tuple[Perm, str], ...] = (
    (Perm.CONSISTENT_READ, "consistent read"),
    (Perm.WRITE, "write"),
    (Perm.WRITE_UNCHANGED, "write unchanged"),
    (Perm.RESIZE, "resize"),
)


def perm_names(perm: Perm) -> str:
    """``'write, resize'``: the names of the bits set in ``perm``, as QEMU lists them."""
    return ", ".join(name for bit, name in PERM_NAMES if perm & bit)


@dataclass
class NodeUser:
    """One user of a node.

    ``is_parent`` tells a parent node (QEMU: another BlockDriverState, whose presence makes
    blockdev-del say ``Block device X is in use``) from a block backend such as an export or a
    command (``Node X is in use``). ``description`` is QEMU's phrase for conflict messages.
    ``quiesce``, for users that start requests of their own (an export, a job): pause them,
    and return the function that lets them go on (a job's returns an awaitable, done once
    the job has gone on); :meth:`BlockNode.drained` calls it.
    ``repoint``: how the user moves to another node when a job pivots (QEMU replaces the node
    under every parent); a user without it stays where it is.
    """

    key: str
    perm: Perm
    shared: Perm
    description: str
    is_parent: bool = False
    quiesce: Callable[[], Awaitable[Callable[[], Awaitable[None] | None]]] | None = None
    #: For a user that may follow a pivot (an export): called with the node that replaces
    #: this one (mirror's completion), under a drain, after the user was moved to it.
    repoint: Callable[[Any], None] | None = None
    #: Keys of users whose permissions this one lets be although it does not share them
    #: (a job's, for the users QEMU moves above the filter node the job inserts).
    tolerates: frozenset[str] = frozenset()
