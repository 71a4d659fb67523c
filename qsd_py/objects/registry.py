"""The registry of user-created objects (``--object``, ``object-add``, ``object-del``).

Objects are looked up by id by the layers that use them, each through a method that checks
the object's kind with QEMU's texts: :meth:`ObjectRegistry.iothread`,
:meth:`ObjectRegistry.tls_creds` (the NBD server and client), :meth:`ObjectRegistry.authz`
(a TLS server's ``tls-authz``), :meth:`ObjectRegistry.secret` (keys and passwords of
block drivers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qsd_py.errors import QMPError
from qsd_py.objects.iothread import IOThread

if TYPE_CHECKING:
    from qsd_py.objects.authz import Authz
    from qsd_py.objects.secret import Secret
    from qsd_py.objects.tls_creds import TlsCreds

# The classes by QOM type name, each built as ``cls(id, options)``; the TLS and authz modules
# (and ``ssl``) are imported by the first object that needs them, not at start-up.
OBJECT_TYPES: dict[str, str] = {
    "iothread": "qsd_py.objects.iothread:IOThread",
    "tls-creds-x509": "qsd_py.objects.tls_creds:TlsCredsX509",
    "tls-creds-psk": "qsd_py.objects.tls_creds:TlsCredsPsk",
    "tls-creds-anon": "qsd_py.objects.tls_creds:TlsCredsAnon",
    "authz-simple": "qsd_py.objects.authz:AuthzSimple",
    "authz-list": "qsd_py.objects.authz:AuthzList",
    "secret": "qsd_py.objects.secret:SecretData",
    "secret_keyring": "qsd_py.objects.secret:SecretKeyring",
    "throttle-group": "qsd_py.objects.throttle_group:ThrottleGroup",
}


def object_class(qom_type: str) -> Any:
    module, _, name = OBJECT_TYPES[qom_type].partition(":")
    return getattr(importlib.import_module(module), name)


class ObjectRegistry:
    """Objects by id, and how many users hold each (those cannot be deleted)."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._users: dict[str, int] = {}

    def add(self, opts: dict[str, Any]) -> Any:
        obj_id = opts["id"]
        if obj_id in self._objects:
            raise QMPError(
                f"attempt to add duplicate property '{obj_id}' to object (type 'container')"
            )
        obj = object_class(opts["qom-type"])(obj_id, opts)
        obj.qom_type = opts["qom-type"]  # the QOM type qom-get/qom-list show
        complete = getattr(obj, "complete", None)
        if complete is not None:  # objects that read or refer to others once made
            complete(self.secret)
        self._objects[obj_id] = obj
        return obj

    def delete(self, obj_id: str) -> None:
        obj = self._objects.get(obj_id)
        if obj is None:
            raise QMPError(f"object '{obj_id}' not found")
        if self._users.get(obj_id):
            raise QMPError(f"object '{obj_id}' can't be deleted")
        check = getattr(obj, "check_delete", None)
        if check is not None:  # objects that know their users (throttle groups)
            check()
        del self._objects[obj_id]
        obj.stop()

    def get(self, obj_id: str) -> Any | None:
        """The object with id ``obj_id``, of any kind, or None."""
        return self._objects.get(obj_id)

    def items(self) -> list[tuple[str, Any]]:
        """Every object by id, in the order they were made (QOM's /objects children)."""
        return list(self._objects.items())

    def iothread(self, obj_id: str) -> IOThread:
        """Look up an iothread by id, with QEMU's text when there is none."""
        obj = self._objects.get(obj_id)
        if not isinstance(obj, IOThread):
            raise QMPError(f'iothread "{obj_id}" not found')
        return obj

    def tls_creds(self, obj_id: str, endpoint: str) -> TlsCreds:
        """TLS credentials for ``endpoint`` (``server``/``client``), with QEMU's texts."""
        from qsd_py.objects.tls_creds import TlsCreds

        obj = self._objects.get(obj_id)
        if obj is None:
            raise QMPError(f"No TLS credentials with id '{obj_id}'")
        if not isinstance(obj, TlsCreds):
            raise QMPError(f"Object with id '{obj_id}' is not TLS credentials")
        obj.check_endpoint(endpoint)
        return obj

    def authz(self, obj_id: str) -> Authz:
        """The authorization object ``obj_id``, with QEMU's texts."""
        from qsd_py.objects.authz import Authz

        obj = self._objects.get(obj_id)
        if obj is None:
            raise QMPError(f"Cannot find QAuthZ object ID {obj_id}")
        if not isinstance(obj, Authz):
            raise QMPError(f"Object '{obj_id}' is not a QAuthZ subclass")
        return obj

    def secret(self, obj_id: str) -> Secret:
        """The secret ``obj_id``, with QEMU's texts."""
        from qsd_py.objects.secret import Secret

        obj = self._objects.get(obj_id)
        if obj is None:
            raise QMPError(f"No secret with id '{obj_id}'")
        if not isinstance(obj, Secret):
            raise QMPError(f"Object with id '{obj_id}' is not a secret")
        return obj

    def hold(self, obj_id: str) -> IOThread:
        """Mark an iothread as used by an export (it cannot be deleted meanwhile)."""
        obj = self.iothread(obj_id)
        self._users[obj_id] = self._users.get(obj_id, 0) + 1
        return obj

    def release(self, obj_id: str) -> None:
        self._users[obj_id] -= 1

    def stop_all(self) -> None:
        for obj in self._objects.values():
            obj.stop()
        self._objects.clear()
