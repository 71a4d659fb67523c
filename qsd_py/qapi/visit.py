"""Walk a value through a schema type the way QEMU's input visitors do.

QEMU stops at the first problem it meets while visiting members in schema order (base
members, then the variant's), and looks for unexpected members only after a struct's own
members.  The walk here follows the same order so that the *first* error is QEMU's error,
with QEMU's text.  It also normalises aliases (``io-uring`` -> ``io_uring``) and, for
command-line input (``keyval=True``), converts the strings of QEMU's keyval syntax into the
schema's scalar types.

The verdict of record comes from the derived JSON Schema (see :mod:`qsd_py.qapi.schema`);
this walk explains a rejection and produces the normalised value.
"""

from __future__ import annotations

import re
from typing import Any

from qsd_py.errors import QMPError
from qsd_py.qapi.model import (
    AlternateType,
    ArrayType,
    BuiltinType,
    EnumType,
    ObjectType,
    QAPIType,
)

_JSON_NAMES = {"string": "string", "int": "integer", "number": "number", "boolean": "boolean"}
_INT = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)\Z")
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def json_kind(value: Any) -> str:
    """The JSON type of a Python value: string, number, boolean, null, object or array."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "value"


def _type_error(path: str, expected: str) -> QMPError:
    return QMPError(f"Invalid parameter type for '{path}', expected: {expected}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Visitor:
    """One walk; ``keyval`` selects command-line conversion (all scalars arrive as strings)."""

    def __init__(self, keyval: bool = False) -> None:
        self.keyval = keyval

    def visit(self, typ: QAPIType, value: Any, path: str, name: str | None) -> Any:
        """Check/convert ``value``; ``path`` is the full name, ``name`` the bare member name."""
        if isinstance(typ, ObjectType):
            return self.visit_object(typ, value, path)
        if isinstance(typ, AlternateType):
            return self.visit_alternate(typ, value, path, name)
        if isinstance(typ, ArrayType):
            return self.visit_array(typ, value, path)
        if self.keyval and not isinstance(value, str):
            raise QMPError(f"Parameters '{path}.*' are unexpected")
        if isinstance(typ, EnumType):
            return self.visit_enum(typ, value, path, name)
        assert isinstance(typ, BuiltinType)
        return self.visit_builtin(typ, value, path, name)

    # --- objects -------------------------------------------------------------------------
    def visit_object(self, typ: ObjectType, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _type_error(path, "object")
        value = self.apply_aliases(typ, value, path)
        result: dict[str, Any] = {}
        self.visit_members(typ, value, path, result)
        if typ.tag is not None:
            variant = typ.variants.get(result[typ.tag])
            if variant is not None:
                value = self.apply_aliases(variant, value, path)
                self.visit_members(variant, value, path, result)
        if len(result) != len(value):
            extra = [k for k in value if k not in result]
            raise QMPError(
                f"Parameter '{_join(path, first_unexpected(value, extra))}' is unexpected"
            )
        return result

    def visit_members(
        self, typ: ObjectType, value: dict[str, Any], path: str, out: dict[str, Any]
    ) -> None:
        for m in typ.members:
            if m.name in value:
                out[m.name] = self.visit(m.type, value[m.name], _join(path, m.name), m.name)
            elif not m.optional:
                raise QMPError(f"Parameter '{_join(path, m.name)}' is missing")

    def apply_aliases(self, typ: ObjectType, value: dict[str, Any], path: str) -> dict[str, Any]:
        if not typ.aliases or not any(a in value for a in typ.aliases):
            return value
        value = dict(value)
        for alias, target in typ.aliases.items():
            if alias in value:
                if target in value:
                    raise QMPError(
                        f"Parameters '{_join(path, target)}' and '{_join(path, alias)}' "
                        "are aliases of each other; give only one"
                    )
                value[target] = value.pop(alias)
        return value

    # --- alternates and arrays ---------------------------------------------------------------
    def visit_alternate(self, typ: AlternateType, value: Any, path: str, name: str | None) -> Any:
        kind = json_kind(value)
        branch = typ.branch_for(kind)
        if branch is None and self.keyval and kind == "string":
            # On the command line every scalar is a string: take the scalar branch there is.
            branch = next(
                (t for _, t in typ.branches if t.json_kind not in ("object", "array")), None
            )
        if branch is None:
            raise _type_error(path, typ.name)
        return self.visit(branch, value, path, name)

    def visit_array(self, typ: ArrayType, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise _type_error(path, "array")
        assert typ.element is not None
        # QEMU's QMP input names elements 'list[0]', its keyval input 'list.0'; enum errors
        # inside a list say 'null' because elements have no member name.
        fmt = "{}.{}" if self.keyval else "{}[{}]"
        return [self.visit(typ.element, v, fmt.format(path, i), None) for i, v in enumerate(value)]

    # --- scalars -------------------------------------------------------------------------
    def visit_enum(self, typ: EnumType, value: Any, path: str, name: str | None) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if value not in typ.values:
            raise QMPError(f"Parameter '{name or 'null'}' does not accept value '{value}'")
        return value

    def visit_builtin(self, typ: BuiltinType, value: Any, path: str, name: str | None) -> Any:
        jt = typ.json_type
        if self.keyval:
            value = self.parse_scalar(typ, value, path)
        if jt == "value":
            return value
        if jt == "int":
            if typ.name == "uint64" and isinstance(value, float) and value.is_integer():
                # a whole number outside int64 and uint64, which JSON parsing left a double
                raise QMPError(f"Parameter '{path}' expects uint64")
            if not isinstance(value, int) or isinstance(value, bool):
                raise _type_error(path, "integer")
            return self.check_range(typ, value, path)
        if jt == "number":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise _type_error(path, "number")
            return value
        if jt == "boolean":
            if not isinstance(value, bool):
                raise _type_error(path, "boolean")
            return value
        if jt == "string":
            if not isinstance(value, str):
                raise _type_error(path, "string")
            return value
        if value is not None:
            raise _type_error(path, "null")
        return value

    def check_range(self, typ: BuiltinType, value: int, path: str) -> int:
        assert typ.minimum is not None and typ.maximum is not None
        if typ.minimum <= value <= typ.maximum:
            return value
        if typ.name in ("int", "int64") or (typ.name in ("uint64", "size") and value > 0):
            # QEMU's JSON parser cannot even hold such a number as an integer
            raise _type_error(path, "integer")
        if typ.name in ("uint64", "size"):
            return value + (1 << 64)  # QEMU reads negative numbers modulo 2^64
        raise QMPError(f"Parameter '{path}' expects {typ.c_type}")

    def parse_scalar(self, typ: BuiltinType, text: str, path: str) -> Any:
        """Convert one keyval string as QEMU's keyval input visitor does."""
        jt = typ.json_type
        if jt == "boolean":
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise QMPError(f"Parameter '{path}' expects 'on' or 'off'")
        if jt == "int":
            if typ.name == "size":
                return parse_size(text, path)
            value = parse_int(text)
            if value is None:
                raise QMPError(f"Parameter '{path}' expects integer")
            if typ.minimum == 0 and -(1 << 64) < value < 0:
                value += 1 << 64  # strtoull reads a negative number modulo 2^64
            if not (typ.minimum or 0) <= value <= (typ.maximum or 0):
                # QEMU parses to 64 bits first (overflow: "integer"), then checks the width
                wide = typ.name in ("int", "int64", "uint64")
                raise QMPError(f"Parameter '{path}' expects {'integer' if wide else typ.c_type}")
            return value
        if jt == "number":
            try:
                return float(text)
            except ValueError as err:
                raise QMPError(f"Parameter '{path}' expects number") from err
        if jt == "null":
            if text != "":
                raise QMPError(f"Parameter '{path}' expects null")
            return None
        return text


def parse_int(text: str) -> int | None:
    """Integers the way C's strtoll with base 0 reads them (hex, octal, binary prefixes)."""
    if not _INT.match(text):
        return None
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-")
    if digits[:2] in ("0x", "0X"):
        return sign * int(digits[2:], 16)
    if digits[:2] in ("0b", "0B"):
        return sign * int(digits[2:], 2)
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits[1:], 8)
    return sign * int(digits)


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|0[xX][0-9a-fA-F]+)([bkKMGTPE]?)\Z")
_SUFFIX = {"": 0, "b": 0, "k": 10, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def parse_size(text: str, path: str) -> int:
    """A byte count with an optional binary suffix (``64K``, ``1.5G``), as for QEMU's 'size'."""
    m = _SIZE.match(text)
    if m:
        num, suffix = m.groups()
        base = int(num, 16) if num[:2] in ("0x", "0X") else float(num)
        value = int(base * (1 << _SUFFIX[suffix]))
        if value < 1 << 64 and (num[:2] not in ("0x", "0X") or not suffix):
            return value
    raise QMPError(
        f"Parameter '{path}' expects a non-negative number below 2^64\n"
        "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
        "and exabytes, respectively.\n"
    )


# --- which unexpected member QEMU names first ------------------------------------------------


def first_unexpected(value: dict[str, Any], extra: list[str]) -> str:
    """The unexpected key QEMU reports when there are several.

    QEMU keeps a struct's not-yet-visited keys in a GLib hash table and reports the first
    left in table order.  For the small tables of real arguments that order is the order of
    ``(djb2(key) * 11) % 7`` slots with linear-ish probing; emulating the table exactly
    across resizes is not worth it, so larger inputs fall back to the same slot order
    computed for an 8-slot table.
    """
    if len(extra) == 1:
        return extra[0]
    return min(extra, key=lambda k: (_glib_slot(k), list(value).index(k)))


def _glib_slot(key: str) -> int:
    h = 5381
    for byte in key.encode():
        if byte >= 128:
            byte -= 256  # GLib hashes signed chars
        h = (h * 33 + byte) & 0xFFFFFFFF
    if h <= 1:
        h = 2
    return (h * 11) % 7
