"""The QOM commands against a qsd-py daemon: QEMU 11.1's replies (conversation.py), and
what qom-set changes in the objects that use the properties."""

from __future__ import annotations

from collections.abc import Callable

from nbd_server.qmp_talk import Talk
from qom.conversation import OBJECTS, STEPS, normalize
from support import Qsd


def _start(qsd: Callable[..., Qsd]) -> Talk:
    args = [a for obj in OBJECTS for a in ("--object", obj)]
    return Talk(str(qsd(*args).qmp_path))


def test_conversation_has_qemus_replies(qsd: Callable[..., Qsd]) -> None:
    client = _start(qsd)
    try:
        for name, args, reply in STEPS:
            got = client.command(name, args)["reply"]
            assert normalize(got) == normalize(reply), (name, args)
    finally:
        client.close()


def test_partial_path_must_be_unique(qsd: Callable[..., Qsd]) -> None:
    """A partial path names one object; an id that is both an object and a chardev is
    ambiguous (QEMU's text)."""
    client = _start(qsd)
    try:
        client.command("object-add", {"qom-type": "iothread", "id": "qmp0"})
        got = client.command("qom-list", {"path": "qmp0"})["reply"]
        assert got == {
            "error": {
                "class": "GenericError",
                "desc": "Path 'qmp0' does not uniquely identify an object",
            }
        }
        got = client.command("qom-get", {"path": "objects/qmp0", "property": "type"})["reply"]
        assert got == {"return": "iothread"}
    finally:
        client.close()


def test_authz_rules_set_at_run_time_decide(qsd: Callable[..., Qsd]) -> None:
    """qom-set of an authz-list's rules replaces the rules the object checks with."""
    client = _start(qsd)
    try:
        client.command("object-add", {"qom-type": "authz-list", "id": "al0"})
        rules = [{"match": "CN=*", "policy": "allow", "format": "glob"}]
        assert client.command(
            "qom-set", {"path": "/objects/al0", "property": "rules", "value": rules}
        )["reply"] == {"return": {}}
        got = client.command("qom-get", {"path": "al0", "property": "rules"})["reply"]
        assert got == {"return": rules}
    finally:
        client.close()


def test_rules_property_replaces_the_checked_rules() -> None:
    """The object's decisions follow the rules qom-set gives it (the setter's effect)."""
    from qsd_py.objects.authz import AuthzList
    from qsd_py.objects.qom import type_props

    obj = AuthzList("al0", {"rules": [{"match": "a", "policy": "allow"}]})
    assert obj.is_allowed("a") and not obj.is_allowed("b")
    (rules,) = [p for p in type_props("authz-list") if p.name == "rules"]
    assert rules.set is not None
    rules.set(obj, [{"match": "b*", "policy": "allow", "format": "glob"}])
    assert obj.is_allowed("bee") and not obj.is_allowed("a")
