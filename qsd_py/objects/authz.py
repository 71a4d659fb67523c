"""Authorization objects (``authz-simple``, ``authz-list``): may this identity in?

A TLS server with ``tls-authz=ID`` asks the object ``ID`` about each client whose certificate
verified, passing the certificate's distinguished name in GnuTLS's text form
(``CN=client,O=Example,C=GB``; see :func:`qsd_py.objects.x509.distinguished_name`). Every
object answers :meth:`is_allowed`.
"""

from __future__ import annotations

import re
from typing import Any


class Authz:
    """What every authorization object offers."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        self.id = obj_id
        self.opts = opts

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        """Nothing to release (object-del, shutdown)."""


class AuthzSimple(Authz):
    """``authz-simple``: exactly one identity is allowed."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        super().__init__(obj_id, opts)
        self.identity: str = opts["identity"]

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


class AuthzList(Authz):
    """``authz-list``: the first rule that matches decides; none matching, ``policy`` does
    (default deny). A rule's ``format`` is ``exact`` (the default) or ``glob``."""

    def __init__(self, obj_id: str, opts: dict[str, Any]) -> None:
        super().__init__(obj_id, opts)
        self.policy: str = opts.get("policy", "deny")
        self.set_rules(opts.get("rules", []))

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        """Replace the rules (creation, and qom-set of ``rules``)."""
        self.rules: list[tuple[re.Pattern[str] | str, str]] = [
            (_glob(r["match"]) if r.get("format") == "glob" else r["match"], r["policy"])
            for r in rules
        ]
        self.opts["rules"] = rules

    def is_allowed(self, identity: str) -> bool:
        for match, policy in self.rules:
            hit = match.fullmatch(identity) if isinstance(match, re.Pattern) else match == identity
            if hit:
                return policy == "allow"
        return self.policy == "allow"


def _glob(pattern: str) -> re.Pattern[str]:
    """QEMU matches with GLib's simple patterns: ``*`` any run of characters, ``?`` any one,
    nothing else special (no brackets, no escapes), unlike Python's fnmatch."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)
