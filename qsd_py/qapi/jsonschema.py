"""Derive JSON Schema (Draft 2020-12) documents from the schema model.

Every named type becomes an entry under ``$defs``; a command's or option's document is a
``$ref`` to its argument type plus the definitions it reaches.  Unions keep their base
members in ``properties`` and add each variant's members under ``if``/``then`` on the tag;
``unevaluatedProperties: false`` then rejects anything neither the base nor the chosen
variant declares.  Alternates are ``anyOf`` their branches, which QAPI guarantees differ in
JSON type.  Aliases are not in the documents: input is normalised before it is validated.
"""

from __future__ import annotations

from typing import Any

from qsd_py.qapi.model import (
    AlternateType,
    ArrayType,
    BuiltinType,
    EnumType,
    ObjectType,
    QAPIType,
)

DRAFT = "https://json-schema.org/draft/2020-12/schema"

_BUILTIN = {
    "string": {"type": "string"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "value": {},
}


def _ref(typ: QAPIType, defs: dict[str, Any]) -> dict[str, Any]:
    """A reference to ``typ``, adding its definition (and those it needs) to ``defs``."""
    if isinstance(typ, BuiltinType):
        if typ.json_type == "int":
            return {"type": "integer", "minimum": typ.minimum, "maximum": typ.maximum}
        return dict(_BUILTIN[typ.json_type])
    if isinstance(typ, ArrayType):
        assert typ.element is not None
        return {"type": "array", "items": _ref(typ.element, defs)}
    if typ.name not in defs:
        defs[typ.name] = {}  # placeholder first: types may refer to themselves
        defs[typ.name] = _define(typ, defs)
    return {"$ref": f"#/$defs/{typ.name}"}


def _define(typ: QAPIType, defs: dict[str, Any]) -> dict[str, Any]:
    if isinstance(typ, EnumType):
        return {"type": "string", "enum": list(typ.values)}
    if isinstance(typ, AlternateType):
        return {"anyOf": [_ref(t, defs) for _, t in typ.branches]}
    assert isinstance(typ, ObjectType)
    doc = _object_body(typ, defs)
    doc["type"] = "object"
    if typ.tag is None:
        doc["additionalProperties"] = False
        return doc
    doc["allOf"] = [
        {
            "if": {"properties": {typ.tag: {"const": case}}, "required": [typ.tag]},
            "then": _object_body(variant, defs),
        }
        for case, variant in typ.variants.items()
    ]
    doc["unevaluatedProperties"] = False
    return doc


def _object_body(typ: ObjectType, defs: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"properties": {m.name: _ref(m.type, defs) for m in typ.members}}
    required = [m.name for m in typ.members if not m.optional]
    if required:
        body["required"] = required
    return body


def type_schema(typ: QAPIType) -> dict[str, Any]:
    """A self-contained JSON Schema document for values of ``typ``."""
    defs: dict[str, Any] = {}
    root = _ref(typ, defs)
    doc: dict[str, Any] = {"$schema": DRAFT, **root}
    if defs:
        doc["$defs"] = defs
    return doc


def validator_class() -> Any:
    """Draft 2020-12 with QMP's notion of an integer.

    JSON Schema counts ``1000.0`` as an integer; QMP's parser keeps ``1000`` and ``1000.0``
    apart and QEMU refuses the float for an ``int`` member, so our checker does too.
    """
    from jsonschema import Draft202012Validator, validators

    def is_integer(_checker: Any, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", is_integer)
    return validators.extend(Draft202012Validator, type_checker=checker)
