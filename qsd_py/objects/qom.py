"""QOM properties of user-created objects, as QEMU 11.1's daemon shows them to ``qom-*``.

Each QOM type has a list of :class:`Prop` in QEMU's order (its own after its parents'); a
property reads and writes the object's options (``obj.opts``) unless the object keeps the
value elsewhere (an iothread's polling parameters, an authz object's rules). Values are
checked as QEMU's input visitor and property setters check them, with their texts.
``TYPES`` is the type hierarchy qsd-py has (name -> parent, abstract), which
``qom-list-types`` answers from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qsd_py.errors import QMPError

INT64_MAX = 2**63 - 1

# name -> (parent, abstract): the types qsd-py has, with QEMU's names and parents.
TYPES: dict[str, tuple[str | None, bool]] = {
    "object": (None, True),
    "interface": (None, True),
    "user-creatable": ("interface", True),
    "container": ("object", False),
    "event-loop-base": ("object", True),
    "iothread": ("event-loop-base", False),
    "secret_common": ("object", True),
    "secret": ("secret_common", False),
    "secret_keyring": ("secret_common", False),
    "tls-creds": ("object", True),
    "tls-creds-anon": ("tls-creds", False),
    "tls-creds-psk": ("tls-creds", False),
    "tls-creds-x509": ("tls-creds", False),
    "authz": ("object", True),
    "authz-simple": ("authz", False),
    "authz-list": ("authz", False),
    "throttle-group": ("object", False),
    "chardev": ("object", True),
    "chardev-fd": ("chardev", True),
    "chardev-socket": ("chardev", False),
    "chardev-null": ("chardev", False),
    "chardev-ringbuf": ("chardev", False),
    "chardev-memory": ("chardev-ringbuf", False),
    "chardev-file": ("chardev-fd", False),
    "chardev-serial": ("chardev-fd", False),
    "chardev-pipe": ("chardev-fd", False),
    "chardev-stdio": ("chardev-fd", False),
    "chardev-parallel": ("chardev", False),
    "chardev-pty": ("chardev", False),
    "chardev-udp": ("chardev", False),
    "chardev-mux": ("chardev", False),
    "chardev-hub": ("chardev", False),
}
# Types that are user-creatable (they implement the interface, as QEMU's objects do).
USER_CREATABLE = {
    "event-loop-base",
    "secret_common",
    "tls-creds",
    "authz",
}


def implements(name: str, ancestor: str) -> bool:
    """Whether ``name`` is ``ancestor`` or derives from it (or implements the interface)."""
    seen: str | None = name
    while seen is not None:
        if seen == ancestor or (ancestor == "user-creatable" and seen in USER_CREATABLE):
            return True
        seen = TYPES[seen][0]
    return False


@dataclass
class Prop:
    """One property: its QOM type text, how to read it, how to write it (None: read-only)."""

    name: str
    type: str
    get: Callable[[Any], Any]
    set: Callable[[Any, Any], None] | None = None


def check_value(prop: Prop, value: Any, enum: tuple[str, ...] = ()) -> None:
    """The input visitor's checks of a scalar value, with QEMU's texts."""
    want = {
        "int": (int, "integer"),
        "int32_t": (int, "integer"),
        "bool": (bool, "boolean"),
        "string": (str, "string"),
    }.get(prop.type)
    if enum:
        want = (str, "string")
    if want is None:
        return
    kind, text = want
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QMPError(f"Invalid parameter type for '{prop.name}', expected: {text}")
    if enum and value not in enum:
        raise QMPError(f"Parameter '{prop.name}' does not accept value '{value}'")


def _opt(name: str, default: Any = "") -> Callable[[Any], Any]:
    return lambda obj: obj.opts.get(name, default)


def _set_opt(name: str, attr: str | None = None) -> Callable[[Any, Any], None]:
    def setter(obj: Any, value: Any) -> None:
        obj.opts[name] = value
        if attr is not None:
            setattr(obj, attr, value)

    return setter


# Iothread polling and event loop parameters: QEMU's defaults and ranges.
LOOP_DEFAULTS = {
    "thread-pool-min": 0,
    "aio-max-batch": 0,
    "thread-pool-max": 64,
    "poll-max-ns": 32768,
    "poll-weight": 3,
    "poll-grow": 2,
    "poll-shrink": 2,
}
_LOOP_MAX = {"poll-weight": 63}


def _loop_param(name: str) -> Prop:
    def setter(obj: Any, value: int) -> None:
        top = _LOOP_MAX.get(name, INT64_MAX)
        if not 0 <= value <= top:
            raise QMPError(f"{name} value must be in range [0, {top}]")
        # QEMU stores the value, then its event loop checks the pair (and refuses, keeping
        # the value stored).
        obj.params = dict(obj.params, **{name: value})
        if obj.params["thread-pool-min"] > obj.params["thread-pool-max"]:
            raise QMPError("bad thread-pool-min/thread-pool-max values")

    return Prop(name, "int", lambda obj: obj.params[name], setter)


def _rules_set(obj: Any, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise QMPError("Invalid parameter type for 'rules', expected: array")
    obj.set_rules(value)


_SECRET_COMMON = [
    Prop("iv", "string", _opt("iv"), _set_opt("iv")),
    Prop("keyid", "string", _opt("keyid"), _set_opt("keyid")),
    Prop("format", "QCryptoSecretFormat", _opt("format", "raw"), _set_opt("format")),
]
_TLS_COMMON = [
    Prop(
        "endpoint",
        "QCryptoTLSCredsEndpoint",
        _opt("endpoint", "client"),
        _set_opt("endpoint", "endpoint"),
    ),
    Prop("dir", "string", _opt("dir"), _set_opt("dir", "dir")),
    Prop("verify-peer", "bool", _opt("verify-peer", True), _set_opt("verify-peer", "verify_peer")),
    Prop("priority", "string", _opt("priority"), _set_opt("priority", "priority")),
]
ENUMS: dict[str, tuple[str, ...]] = {
    "QCryptoSecretFormat": ("raw", "base64"),
    "QCryptoTLSCredsEndpoint": ("client", "server"),
    "QAuthZListPolicy": ("deny", "allow"),
}

# Each type's own properties; a type has its parents' first, as QEMU lists them.
OWN_PROPS: dict[str, list[Prop]] = {
    "event-loop-base": [
        _loop_param(n) for n in ("thread-pool-min", "aio-max-batch", "thread-pool-max")
    ],
    "iothread": [
        _loop_param(n) for n in ("poll-max-ns", "poll-weight", "poll-grow", "poll-shrink")
    ],
    "secret_common": _SECRET_COMMON,
    "secret": [
        Prop("file", "string", _opt("file"), _set_opt("file")),
        Prop("data", "string", _opt("data"), _set_opt("data")),
    ],
    "secret_keyring": [Prop("serial", "int32_t", _opt("serial", 0), _set_opt("serial"))],
    "tls-creds": _TLS_COMMON,
    "tls-creds-psk": [Prop("username", "string", _opt("username"), _set_opt("username"))],
    "tls-creds-x509": [
        Prop("sanity-check", "bool", _opt("sanity-check", True), _set_opt("sanity-check")),
        Prop("passwordid", "string", _opt("passwordid"), _set_opt("passwordid")),
    ],
    "authz-simple": [
        Prop("identity", "string", lambda o: o.identity, _set_opt("identity", "identity"))
    ],
    "authz-list": [
        Prop("policy", "QAuthZListPolicy", lambda o: o.policy, _set_opt("policy", "policy")),
        Prop("rules", "QAuthZListRule", lambda o: o.opts.get("rules", []), _rules_set),
    ],
}


def _limits_set(obj: Any, value: Any) -> None:
    from qsd_py.objects.throttle_group import KEYS

    if not isinstance(value, dict):
        raise QMPError("Invalid parameter type for 'limits', expected: object")
    for key, item in value.items():
        if key not in KEYS:
            raise QMPError(f"Parameter 'limits.{key}' is unexpected")
        if not isinstance(item, int) or isinstance(item, bool):
            raise QMPError(f"Invalid parameter type for 'limits.{key}', expected: integer")
    obj.set_limits(value)


def _flat_set(obj: Any, value: Any) -> None:
    raise QMPError("Property cannot be set after initialization")


def _throttle_props() -> list[Prop]:
    """``limits`` and the legacy flat ``x-*`` properties (readable; set only at creation)."""
    from qsd_py.objects.throttle_group import KEYS

    props = [Prop("limits", "ThrottleLimits", lambda o: dict(o.cfg), _limits_set)]
    for key in KEYS:
        props.append(Prop(f"x-{key}", "int", lambda o, k=key: o.cfg[k], _flat_set))
    return props


OWN_PROPS["throttle-group"] = _throttle_props()


def type_props(name: str) -> list[Prop]:
    """Every property of QOM type ``name``: ``type`` first, then the ancestors' own."""
    chain: list[str] = []
    seen: str | None = name
    while seen is not None:
        chain.append(seen)
        seen = TYPES[seen][0]
    props = [Prop("type", "string", lambda obj: obj.qom_type)]
    for kind in reversed(chain):
        props.extend(OWN_PROPS.get(kind, []))
    return props
