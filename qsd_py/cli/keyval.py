"""QEMU's ``key=value,...`` option syntax, in its two dialects.

*keyval* (``--blockdev``, ``--export``, ``--object``, ``--monitor``) builds a tree:
dotted keys nest (``file.driver=file``), all-numeric keys make lists (``iothread.0=a``),
``,,`` is a literal comma, and the first item may leave out its key (the *implied* key,
e.g. ``driver``), in which case its value can contain neither ``,`` nor ``=``.

*QemuOpts* (``--chardev``) is flat: keys are not split, a key without ``=`` is the
deprecated short form of a boolean (``server`` = ``server=on``, ``nowait`` = ``wait=off``).

Both return plain dicts of strings; the schema converts them to typed values afterwards.
Errors carry QEMU's texts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qsd_py.errors import QMPError

_NAME = re.compile(r"(?:__[a-z0-9.-]+_)?[A-Za-z][A-Za-z0-9_-]*\Z")  # a QAPI name
_INDEX = re.compile(r"[0-9]+\Z")
MAX_FRAGMENT = 127  # longest key fragment QEMU accepts


@dataclass
class Parsed:
    """A parsed option: the tree of strings, and whether ``help`` (or ``?``) was asked."""

    tree: dict[str, Any] = field(default_factory=dict)
    help: bool = False


def _split(text: str, pos: int) -> tuple[str, int]:
    """Read a value from ``pos`` up to an unescaped ``,``; return it and the next position."""
    out: list[str] = []
    n = len(text)
    while pos < n:
        comma = text.find(",", pos)
        if comma < 0:
            out.append(text[pos:])
            return "".join(out), n
        out.append(text[pos:comma])
        if comma + 1 < n and text[comma + 1] == ",":
            out.append(",")
            pos = comma + 2
        else:
            return "".join(out), comma + 1
    return "".join(out), n


def _key_end(text: str, pos: int) -> int:
    """Where the key starting at ``pos`` ends: at the first ``=`` or ``,``."""
    ends = [i for i in (text.find("=", pos), text.find(",", pos)) if i >= 0]
    return min(ends) if ends else len(text)


def parse_keyval(text: str, implied_key: str | None = None) -> Parsed:
    """Parse keyval ``text`` into a tree of dicts, lists and strings."""
    result = Parsed()
    pos, n = 0, len(text)
    if implied_key and n:
        end = _key_end(text, 0)
        first = text[:end]
        if first and (end == n or text[end] == ",") and first not in ("help", "?"):
            _store(result.tree, [implied_key], first, implied_key)
            pos = end + 1
    while pos < n:
        end = _key_end(text, pos)
        key = text[pos:end]
        if end == n or text[end] == ",":
            if key in ("help", "?"):
                result.help = True
                pos = end + 1
                continue
            _check_key(key)
            raise QMPError(f"Expected '=' after parameter '{key}'")
        fragments = _check_key(key)
        value, pos = _split(text, end + 1)
        _store(result.tree, fragments, value, key)
    result.tree = _listify(result.tree, "")
    return result


def _check_key(key: str) -> list[str]:
    fragments = key.split(".")
    for i, frag in enumerate(fragments):
        if len(frag) > MAX_FRAGMENT:
            what = "Parameter fragment" if len(fragments) > 1 else "Parameter"
            raise QMPError(f"{what} '{frag}' is too long")
        if not (_NAME.match(frag) or (i > 0 and _INDEX.match(frag))):
            raise QMPError(f"Invalid parameter '{key}'")
    return fragments


def _store(tree: dict[str, Any], fragments: list[str], value: str, key: str) -> None:
    node = tree
    for i, frag in enumerate(fragments[:-1]):
        child = node.setdefault(frag, {})
        if not isinstance(child, dict):
            raise QMPError(f"Parameters '{'.'.join(fragments[: i + 1])}.*' used inconsistently")
        node = child
    last = fragments[-1]
    if isinstance(node.get(last), dict):
        raise QMPError(f"Parameters '{key}.*' used inconsistently")
    node[last] = value  # a repeated key: the last one wins, as in QEMU


def _listify(tree: dict[str, Any], prefix: str) -> Any:
    """Turn every dict whose keys are all indices into a list, checking there are no gaps."""
    for key, value in tree.items():
        if isinstance(value, dict):
            tree[key] = _listify(value, f"{prefix}{key}.")
    if not prefix or not tree:
        return tree
    numeric = [k for k in tree if _INDEX.match(k)]
    if not numeric:
        return tree
    if len(numeric) != len(tree):
        raise QMPError(f"Parameters '{prefix}*' used inconsistently")
    by_index = {int(k): v for k, v in tree.items()}
    for i in range(len(by_index)):
        if i not in by_index:
            raise QMPError(f"Parameter '{prefix}{i}' missing")
    return [by_index[i] for i in range(len(by_index))]


def parse_qemu_opts(text: str, implied_key: str | None = None) -> Parsed:
    """Parse QemuOpts ``text`` into a flat dict of strings (short-form booleans expanded)."""
    result = Parsed()
    pos, n = 0, len(text)
    first = True
    while pos < n:
        end = _key_end(text, pos)
        key = text[pos:end]
        if end == n or text[end] == ",":
            value, pos = _split(text, pos)
            if value in ("help", "?"):
                result.help = True
            elif first and implied_key:
                result.tree[implied_key] = value
            elif value.startswith("no"):
                result.tree[value[2:]] = "off"
            elif value:
                result.tree[value] = "on"
        else:
            value, pos = _split(text, end + 1)
            result.tree[key] = value
        first = False
    return result
