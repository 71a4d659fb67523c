"""The answer to ``query-qmp-schema``, in QEMU's SchemaInfo format.

Like QEMU, the answer lists commands and events first, in definition order, then every type
they use, in order of first use; type names other than the built-in ones are replaced by
numbers given in that same order (so clients look at commands and members, not at type
names), arrays are spelled ``[element]``, and all integer types show as ``int``.  The
command-line-only types are never reached from a command, so they are not listed.
"""

from __future__ import annotations

from typing import Any

from qsd_py.qapi.model import (
    AlternateType,
    ArrayType,
    BuiltinType,
    Command,
    EnumType,
    Model,
    ObjectType,
    QAPIType,
)


class _Introspector:
    def __init__(self, model: Model, unmask: bool) -> None:
        self.model = model
        self.unmask = unmask
        self.names: dict[str, str] = {}
        self.used: list[QAPIType] = []
        self.seen: set[int] = set()
        self.int_type = model.types["int"]

    def use(self, typ: QAPIType) -> str:
        """Name ``typ`` as it appears in the answer, queueing it for a definition."""
        if isinstance(typ, BuiltinType) and typ.json_type == "int":
            typ = self.int_type
        elif isinstance(typ, ArrayType) and isinstance(typ.element, BuiltinType):
            if typ.element.json_type == "int" and typ.element is not self.int_type:
                typ = ArrayType("intList", None, self.int_type)
        if isinstance(typ, ArrayType):
            key = f"array:{typ.name}"
        else:
            key = typ.name
        if key not in self.names:
            self.used.append(typ)
            if isinstance(typ, BuiltinType):
                self.names[key] = typ.name
            elif isinstance(typ, ArrayType):
                assert typ.element is not None
                self.names[key] = f"[{self.use(typ.element)}]"
            else:
                self.names[key] = typ.name if self.unmask else str(self.name_count())
        return self.names[key]

    def name_count(self) -> int:
        """Numbers go to non-builtin, non-array types only, counting from 0."""
        self._count = getattr(self, "_count", -1) + 1
        return self._count

    def entries(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for entity in self.model.order:
            if isinstance(entity, Command):
                entry: dict[str, Any] = {
                    "name": entity.name,
                    "meta-type": "command",
                    "arg-type": self.use(entity.arg_type),
                    "ret-type": self.use(entity.ret_type or self.model.empty),
                }
                if entity.allow_oob:
                    entry["allow-oob"] = True
                if entity.features:
                    entry["features"] = list(entity.features)
            else:
                entry = {
                    "name": entity.name,
                    "meta-type": "event",
                    "arg-type": self.use(entity.arg_type),
                }
            out.append(entry)
        i = 0
        while i < len(self.used):  # grows while types are described
            out.append(self.describe(self.used[i]))
            i += 1
        return out

    def describe(self, typ: QAPIType) -> dict[str, Any]:
        name = self.use(typ)
        if isinstance(typ, BuiltinType):
            return {"name": name, "meta-type": "builtin", "json-type": typ.json_type}
        if isinstance(typ, EnumType):
            return {
                "name": name,
                "meta-type": "enum",
                "members": [_enum_member(typ, v) for v in typ.values],
                "values": list(typ.values),
            }
        if isinstance(typ, ArrayType):
            assert typ.element is not None
            return {"name": name, "meta-type": "array", "element-type": self.use(typ.element)}
        if isinstance(typ, AlternateType):
            members = [{"type": self.use(t)} for _, t in typ.branches]
            return {"name": name, "meta-type": "alternate", "members": members}
        assert isinstance(typ, ObjectType)
        members = []
        for m in typ.members:
            member: dict[str, Any] = {"name": m.name, "type": self.use(m.type)}
            if m.optional:
                member["default"] = None
            members.append(member)
        entry: dict[str, Any] = {"name": name, "meta-type": "object", "members": members}
        if typ.tag is not None:
            entry["tag"] = typ.tag
            entry["variants"] = [
                {"case": case, "type": self.use(v)} for case, v in typ.variants.items()
            ]
        return entry


def introspect(model: Model, unmask: bool = False) -> list[dict[str, Any]]:
    """Build the SchemaInfo list; ``unmask`` keeps real type names (for debugging)."""
    return _Introspector(model, unmask).entries()


def _enum_member(typ: EnumType, value: str) -> dict[str, Any]:
    """An enum value in introspection, with its features as QEMU lists them."""
    features = typ.value_features.get(value)
    return {"name": value, "features": list(features)} if features else {"name": value}
