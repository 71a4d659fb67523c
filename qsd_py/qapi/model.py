"""The schema model: QAPI expressions resolved into typed entities.

:func:`build_model` checks the expressions that :mod:`qsd_py.qapi.parser` read (unknown
types, bad unions, ambiguous alternates...) and links them into objects that the validator,
the JSON Schema generator, introspection and the command line all walk.  Everything that is
known about a command's arguments lives here, derived from the schema files only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qsd_py.qapi.parser import Expression, SourceInfo


class QAPISemError(Exception):
    """The schema is well-formed text but makes no sense; the message names ``file:line``."""

    def __init__(self, info: SourceInfo | None, msg: str) -> None:
        super().__init__(f"{info}: {msg}" if info else msg)


# --- types ---------------------------------------------------------------------------------


@dataclass(eq=False)
class QAPIType:
    name: str
    info: SourceInfo | None

    @property
    def json_kind(self) -> str:
        """The JSON type of values, as used to pick an alternate's branch."""
        raise NotImplementedError


@dataclass(eq=False)
class BuiltinType(QAPIType):
    """``str``, ``int`` and friends; ``c_type`` names integer widths in range errors."""

    json_type: str = "value"  # string, int, number, boolean, null, value
    minimum: int | None = None
    maximum: int | None = None
    c_type: str = ""

    @property
    def json_kind(self) -> str:
        return {"int": "number", "value": "value"}.get(self.json_type, self.json_type)


@dataclass(eq=False)
class EnumType(QAPIType):
    values: list[str] = field(default_factory=list)
    #: a value's features ({'name': ..., 'features': [...]} in 'data'), e.g. "deprecated"
    value_features: dict[str, list[str]] = field(default_factory=dict)

    @property
    def json_kind(self) -> str:
        return "string"


@dataclass(eq=False)
class ArrayType(QAPIType):
    element: QAPIType | None = None

    @property
    def json_kind(self) -> str:
        return "array"


@dataclass(eq=False)
class Member:
    name: str
    type: QAPIType
    optional: bool


@dataclass(eq=False)
class ObjectType(QAPIType):
    """A struct, a union (``tag`` + ``variants``) or the implicit type of inline ``data``.

    ``members`` holds every non-variant member, the base's first; ``variants`` maps each tag
    value to the object type whose members it adds.  ``aliases`` maps an accepted
    alternative name to the member it stands for.
    """

    members: list[Member] = field(default_factory=list)
    base: ObjectType | None = None
    tag: str | None = None
    variants: dict[str, ObjectType] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    implicit: bool = False

    @property
    def json_kind(self) -> str:
        return "object"

    def member(self, name: str) -> Member | None:
        for m in self.members:
            if m.name == name:
                return m
        return None


@dataclass(eq=False)
class AlternateType(QAPIType):
    """One of several types, chosen by the JSON type of the value (QEMU's rule)."""

    branches: list[tuple[str, QAPIType]] = field(default_factory=list)

    @property
    def json_kind(self) -> str:
        return "alternate"

    def branch_for(self, kind: str) -> QAPIType | None:
        for _, typ in self.branches:
            if typ.json_kind == kind:
                return typ
        return None


# --- commands, events, options -------------------------------------------------------------


@dataclass(eq=False)
class Command:
    name: str
    info: SourceInfo | None
    arg_type: ObjectType
    ret_type: QAPIType | None
    boxed: bool = False
    allow_oob: bool = False
    features: list[str] = field(default_factory=list)  #: e.g. "deprecated"


@dataclass(eq=False)
class Event:
    name: str
    info: SourceInfo | None
    arg_type: ObjectType


@dataclass(eq=False)
class CliOption:
    """A command-line option: ``--name``, its argument type and how it is spelled."""

    name: str
    info: SourceInfo | None
    arg_type: ObjectType
    command: Command | None
    implied_key: str | None
    syntax: str  # "keyval" or "qemu-opts"
    help: bool


@dataclass(eq=False)
class Model:
    types: dict[str, QAPIType]
    commands: dict[str, Command]
    events: dict[str, Event]
    cli_options: dict[str, CliOption]
    empty: ObjectType
    order: list[Command | Event]  # commands and events in definition order


# --- builtins ------------------------------------------------------------------------------


def _int(name: str, bits: int, signed: bool, c_type: str) -> BuiltinType:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return BuiltinType(name, None, "int", lo, hi, c_type)


def _builtins() -> list[QAPIType]:
    types: list[QAPIType] = [
        BuiltinType("str", None, "string"),
        BuiltinType("number", None, "number"),
        BuiltinType("bool", None, "boolean"),
        BuiltinType("null", None, "null"),
        BuiltinType("any", None, "value"),
        _int("int", 64, True, "int64_t"),
        _int("size", 64, False, "uint64_t"),
    ]
    for bits in (8, 16, 32, 64):
        types.append(_int(f"int{bits}", bits, True, f"int{bits}_t"))
        types.append(_int(f"uint{bits}", bits, False, f"uint{bits}_t"))
    return types


# --- building ------------------------------------------------------------------------------

_KEYS = {
    "enum": {"enum", "data", "prefix", "if", "features"},
    "struct": {"struct", "data", "base", "if", "features", "aliases"},
    "union": {"union", "base", "discriminator", "data", "if", "features", "aliases"},
    "alternate": {"alternate", "data", "if", "features"},
    "command": {
        "command", "data", "returns", "boxed", "if", "features", "gen", "success-response",
        "allow-oob", "allow-preconfig", "coroutine",
    },
    "event": {"event", "data", "boxed", "if", "features"},
    "cli-option": {"cli-option", "command", "data", "implied-key", "syntax", "help"},
}  # fmt: skip


class _Builder:
    """Two passes: declare every named type, then resolve references and check."""

    def __init__(self, exprs: list[Expression]) -> None:
        self.exprs = exprs
        self.types: dict[str, QAPIType] = {t.name: t for t in _builtins()}
        self.commands: dict[str, Command] = {}
        self.events: dict[str, Event] = {}
        self.cli: dict[str, CliOption] = {}
        self.empty = ObjectType("q_empty", None, implicit=True)
        self.types["q_empty"] = self.empty
        self.arrays: dict[str, ArrayType] = {}
        self.order: list[Command | Event] = []

    def build(self) -> Model:
        for e in self.exprs:
            self.declare(e)
        for e in self.exprs:
            self.define(e)
        for e in self.exprs:
            self.check(e)
        for name, array in self.arrays.items():
            self.types.setdefault(name, array)
        return Model(self.types, self.commands, self.events, self.cli, self.empty, self.order)

    # pass 1
    def declare(self, e: Expression) -> None:
        meta = next(iter(e.expr), None)  # the first key says what the expression defines
        if meta not in _KEYS:
            meta = None
        if meta is None:
            raise QAPISemError(e.info, "expression is missing metatype")
        unknown = sorted(set(e.expr) - _KEYS[meta])
        if unknown:
            raise QAPISemError(e.info, f"{meta} has unknown key '{unknown[0]}'")
        name = e.expr[meta]
        if not isinstance(name, str):
            raise QAPISemError(e.info, f"'{meta}' requires a string name")
        if meta in ("command", "event", "cli-option"):
            table = {"command": self.commands, "event": self.events, "cli-option": self.cli}[meta]
            if name in table:
                raise QAPISemError(e.info, f"{meta} '{name}' is already defined")
            return
        if name in self.types:
            raise QAPISemError(e.info, f"type '{name}' is already defined")
        cls = {
            "enum": EnumType,
            "struct": ObjectType,
            "union": ObjectType,
            "alternate": AlternateType,
        }[meta]
        self.types[name] = cls(name, e.info)

    # pass 2
    def define(self, e: Expression) -> None:
        x = e.expr
        if "cli-option" in x:
            self.define_cli(e)
        elif "enum" in x:
            self.define_enum(e)
        elif "struct" in x or "union" in x:
            self.define_object(e)
        elif "alternate" in x:
            self.define_alternate(e)
        elif "command" in x:
            self.define_command(e)
        elif "event" in x:
            self.define_event(e)

    def lookup(self, ref: Any, info: SourceInfo, what: str) -> QAPIType:
        if isinstance(ref, list):
            if len(ref) != 1 or not isinstance(ref[0], str):
                raise QAPISemError(info, f"{what}: array type must contain one type name")
            element = self.lookup(ref[0], info, what)
            name = f"{element.name}List"
            if name not in self.arrays:
                self.arrays[name] = ArrayType(name, info, element)
            return self.arrays[name]
        if not isinstance(ref, str):
            raise QAPISemError(info, f"{what} should be a type name")
        typ = self.types.get(ref)
        if typ is None:
            raise QAPISemError(info, f"{what} uses unknown type '{ref}'")
        return typ

    def members(self, data: Any, info: SourceInfo, what: str) -> list[Member]:
        if not isinstance(data, dict):
            raise QAPISemError(info, f"'data' of {what} should be an object")
        out = []
        for key, ref in data.items():
            optional = key.startswith("*")
            name = key[1:] if optional else key
            if isinstance(ref, dict):  # {'type': ..., 'if': ..., 'features': ...}
                ref = ref.get("type")
            out.append(Member(name, self.lookup(ref, info, f"member '{name}' of {what}"), optional))
        return out

    def define_enum(self, e: Expression) -> None:
        typ = self.types[e.expr["enum"]]
        assert isinstance(typ, EnumType)
        data = e.expr.get("data")
        if not isinstance(data, list):
            raise QAPISemError(e.info, f"'data' of enum '{typ.name}' should be an array")
        for v in data:
            name = v.get("name") if isinstance(v, dict) else v
            if not isinstance(name, str) or name in typ.values:
                raise QAPISemError(e.info, f"enum '{typ.name}' has a bad or duplicate value")
            typ.values.append(name)
            if isinstance(v, dict) and v.get("features"):
                typ.value_features[name] = list(v["features"])

    def object_ref(self, ref: Any, info: SourceInfo, what: str, implicit: str) -> ObjectType:
        """A base or 'data' that is either a struct's name or an inline member dict."""
        if isinstance(ref, dict):
            typ = ObjectType(implicit, info, implicit=True)
            typ.members = self.members(ref, info, what)
            self.types[implicit] = typ
            return typ
        typ = self.lookup(ref, info, what)
        if not isinstance(typ, ObjectType) or typ.variants:
            raise QAPISemError(info, f"{what} requires a struct type, not '{typ.name}'")
        return typ

    def define_object(self, e: Expression) -> None:
        x = e.expr
        name = x.get("struct") or x["union"]
        typ = self.types[name]
        assert isinstance(typ, ObjectType)
        if "base" in x:
            typ.base = self.object_ref(x["base"], e.info, f"base of '{name}'", f"q_obj_{name}-base")
        if "struct" in x:
            typ.members = self.members(x.get("data", {}), e.info, f"'{name}'")
        else:
            data = x.get("data")
            if not isinstance(data, dict):
                raise QAPISemError(e.info, f"'data' of union '{name}' should be an object")
            for case, ref in data.items():
                if isinstance(ref, dict):
                    ref = ref.get("type")
                typ.variants[case] = self.object_ref(ref, e.info, f"branch '{case}'", "")
            typ.tag = x.get("discriminator")
        aliases = x.get("aliases", {})
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise QAPISemError(e.info, f"'aliases' of '{name}' should map names to names")
        typ.aliases = dict(aliases)

    def define_alternate(self, e: Expression) -> None:
        typ = self.types[e.expr["alternate"]]
        assert isinstance(typ, AlternateType)
        data = e.expr.get("data")
        if not isinstance(data, dict) or not data:
            raise QAPISemError(e.info, f"'data' of alternate '{typ.name}' should be an object")
        for branch, ref in data.items():
            if isinstance(ref, dict):
                ref = ref.get("type")
            typ.branches.append((branch, self.lookup(ref, e.info, f"branch '{branch}'")))

    def define_command(self, e: Expression) -> None:
        x = e.expr
        name = x["command"]
        arg = self.arg_type(x, e.info, name, "command")
        ret = (
            self.lookup(x["returns"], e.info, f"'returns' of '{name}'") if "returns" in x else None
        )
        features = [f["name"] if isinstance(f, dict) else f for f in x.get("features", [])]
        self.commands[name] = Command(
            name, e.info, arg, ret, bool(x.get("boxed")), bool(x.get("allow-oob")), features
        )
        self.order.append(self.commands[name])

    def define_event(self, e: Expression) -> None:
        name = e.expr["event"]
        self.events[name] = Event(name, e.info, self.arg_type(e.expr, e.info, name, "event"))
        self.order.append(self.events[name])

    def arg_type(self, x: dict[str, Any], info: SourceInfo, name: str, meta: str) -> ObjectType:
        data = x.get("data")
        if data is None:
            return self.empty
        if x.get("boxed"):
            typ = self.lookup(data, info, f"'data' of {meta} '{name}'")
            if not isinstance(typ, ObjectType):
                raise QAPISemError(info, f"'data' of boxed {meta} '{name}' must be an object type")
            return typ
        return self.object_ref(data, info, f"'data' of {meta} '{name}'", f"q_obj_{name}-arg")

    def define_cli(self, e: Expression) -> None:
        x = e.expr
        name = x["cli-option"]
        command = None
        if "command" in x:
            command = self.commands.get(x["command"])
            if command is None:
                raise QAPISemError(e.info, f"option '{name}' uses unknown command")
            arg = command.arg_type
        else:
            arg = self.object_ref(x.get("data"), e.info, f"option '{name}'", f"q_obj_cli-{name}")
        syntax = x.get("syntax", "keyval")
        if syntax not in ("keyval", "qemu-opts"):
            raise QAPISemError(e.info, f"option '{name}' has unknown syntax '{syntax}'")
        self.cli[name] = CliOption(
            name, e.info, arg, command, x.get("implied-key"), syntax, bool(x.get("help"))
        )

    # pass 3: things that need every type defined
    def check(self, e: Expression) -> None:
        x = e.expr
        if "struct" in x or "union" in x:
            typ = self.types[x.get("struct") or x["union"]]
            assert isinstance(typ, ObjectType)
            self.flatten(typ, e.info)
            if "union" in x:
                self.check_union(typ, e.info)
            for alias, target in typ.aliases.items():
                if typ.member(target) is None or typ.member(alias) is not None:
                    raise QAPISemError(e.info, f"alias '{alias}' must name a member of its own")
        elif "alternate" in x:
            typ = self.types[x["alternate"]]
            assert isinstance(typ, AlternateType)
            kinds = [t.json_kind for _, t in typ.branches]
            if len(set(kinds)) != len(kinds) or "alternate" in kinds or "value" in kinds:
                raise QAPISemError(e.info, f"alternate '{typ.name}' has ambiguous branches")

    def flatten(self, typ: ObjectType, info: SourceInfo) -> None:
        """Put the base's members in front of the type's own (once, base first)."""
        if getattr(typ, "_flat", False):
            return
        typ._flat = True  # type: ignore[attr-defined]
        if typ.base is not None:
            self.flatten(typ.base, info)
            own = typ.members
            typ.members = list(typ.base.members) + own
        names = [m.name for m in typ.members]
        if len(set(names)) != len(names):
            raise QAPISemError(info, f"'{typ.name}' has a member twice")

    def check_union(self, typ: ObjectType, info: SourceInfo) -> None:
        tag = typ.member(typ.tag) if typ.tag else None
        if tag is None or tag.optional or not isinstance(tag.type, EnumType):
            raise QAPISemError(info, f"discriminator of '{typ.name}' must be a mandatory enum")
        for case, variant in typ.variants.items():
            if case not in tag.type.values:
                raise QAPISemError(info, f"branch '{case}' is not a value of {tag.type.name}")
            self.flatten(variant, info)
            clash = {m.name for m in variant.members} & {m.name for m in typ.members}
            if clash:
                raise QAPISemError(info, f"branch '{case}' repeats member '{min(clash)}'")


def build_model(exprs: list[Expression]) -> Model:
    """Resolve the parsed expressions into a :class:`Model`, raising :class:`QAPISemError`."""
    return _Builder(exprs).build()
