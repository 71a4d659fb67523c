"""The QOM commands (``qom-list``, ``qom-get``, ``qom-set``, ``qom-list-get``,
``qom-list-properties``, ``qom-list-types``) over the object tree QEMU's daemon shows.

The tree is built from the registries when a command asks: the root container with the
containers ``backend``, ``objects`` (the user-created objects, by id), ``chardevs`` (the
character devices, by id) and ``audiodevs``; each child is a ``child<TYPE>`` property whose
value is the child's path. Objects' own properties are :mod:`qsd_py.objects.qom`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd_py.commands import qmp_command
from qsd_py.errors import QMPError
from qsd_py.objects.qom import ENUMS, TYPES, Prop, check_value, implements, type_props

if TYPE_CHECKING:
    from qsd_py.daemon import Daemon


class Node:
    """One object of the tree: its QOM type, the Python object its properties read, its
    children by name."""

    def __init__(self, qom_type: str, target: Any = None) -> None:
        self.qom_type = qom_type
        self.target = target
        self.children: dict[str, Node] = {}
        self.path = ""
        self.extra: list[Prop] = []

    def props(self) -> list[Prop]:
        own = [Prop("type", "string", lambda _obj: self.qom_type)]
        own += type_props(self.qom_type)[1:] + self.extra
        for name, child in self.children.items():
            own.append(Prop(name, f"child<{child.qom_type}>", lambda _o, c=child: c.path))
        return own

    def prop(self, name: str) -> Prop:
        for prop in self.props():
            if prop.name == name:
                return prop
        raise QMPError(f"Property '{self.qom_type}.{name}' not found")


def _chardev_node(chardev: Any) -> Node:
    """A chardev's node: ``chardev-KIND`` as QEMU names the backend's class."""
    name = type(chardev).__name__
    if name.endswith("Backend"):
        kind = getattr(chardev, "filename", None) if name == "RingbufBackend" else None
        node = Node(f"chardev-{kind or name[: -len('Backend')].lower()}", chardev)
        return node
    node = Node("chardev-socket", chardev)  # the monitors' --chardev socket
    node.extra = [
        Prop("connected", "bool", lambda c: getattr(c, "session", None) is not None),
        Prop("addr", "SocketAddress", lambda c: _socket_address(c.where)),
    ]
    return node


def _socket_address(where: str) -> dict[str, Any]:
    """QEMU's SocketAddress of a socket chardev from its ``unix:PATH,...``/``tcp:H:P`` text."""
    kind, _, rest = where.partition(":")
    rest = rest.split(",", 1)[0]
    if kind == "unix":
        return {"path": rest, "type": "unix"}
    host, _, port = rest.rpartition(":")
    return {"host": host, "port": port, "type": "inet"}


def build_tree(daemon: Daemon) -> Node:
    root = Node("container")
    for name in ("backend", "objects", "chardevs", "audiodevs"):
        root.children[name] = Node("container")
    for obj_id, obj in daemon.objects.items():
        root.children["objects"].children[obj_id] = Node(obj.qom_type, obj)
    for chardev in daemon.chardevs.all():
        root.children["chardevs"].children[chardev.id] = _chardev_node(chardev)
    _set_paths(root, "")
    return root


def _set_paths(node: Node, path: str) -> None:
    node.path = path or "/"
    for name, child in node.children.items():
        _set_paths(child, f"{path}/{name}")


def _walk(node: Node) -> list[Node]:
    nodes = [node]
    for child in node.children.values():
        nodes.extend(_walk(child))
    return nodes


def resolve(daemon: Daemon, path: str) -> Node:
    """The node at ``path``: absolute from the root, or a partial path matching the end of
    exactly one node's path, as QEMU resolves them; QEMU's texts otherwise."""
    root = build_tree(daemon)
    parts = [p for p in path.split("/") if p]
    if path.startswith("/"):
        node: Node | None = root
        for part in parts:
            node = node.children.get(part) if node is not None else None
        if node is None:
            raise QMPError(f"Device '{path}' not found", "DeviceNotFound")
        return node
    found = [n for n in _walk(root) if parts and n.path.split("/")[-len(parts) :] == parts]
    if len(found) > 1:
        raise QMPError(f"Path '{path}' does not uniquely identify an object")
    if not found:
        raise QMPError(f"Device '{path}' not found", "DeviceNotFound")
    return found[0]


def _info(prop: Prop) -> dict[str, Any]:
    return {"name": prop.name, "type": prop.type}


@qmp_command("qom-list")
async def qom_list(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [_info(p) for p in resolve(daemon, args["path"]).props()]


@qmp_command("qom-get")
async def qom_get(daemon: Daemon, args: dict[str, Any]) -> Any:
    node = resolve(daemon, args["path"])
    return node.prop(args["property"]).get(node.target)


@qmp_command("qom-set")
async def qom_set(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    node = resolve(daemon, args["path"])
    prop = node.prop(args["property"])
    if prop.set is None:
        raise QMPError(f"Property '{node.qom_type}.{prop.name}' is not writable")
    check_value(prop, args["value"], ENUMS.get(prop.type, ()))
    prop.set(node.target, args["value"])
    return {}


@qmp_command("qom-list-get")
async def qom_list_get(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [resolve(daemon, path) for path in args["paths"]]
    return [
        {
            "properties": [
                {"name": p.name, "value": p.get(n.target), "type": p.type} for p in n.props()
            ]
        }
        for n in nodes
    ]


@qmp_command("qom-list-properties")
async def qom_list_properties(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    name = args["typename"]
    if name not in TYPES:
        raise QMPError(f"Class '{name}' not found", "DeviceNotFound")
    if implements(name, "interface"):
        raise QMPError("Parameter 'typename' expects a QOM type")
    return [_info(p) for p in type_props(name)]


@qmp_command("qom-list-types")
async def qom_list_types(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The types qsd-py has (not QEMU's whole list), in QEMU's shape."""
    want_abstract = args.get("abstract", False)
    answer = []
    for name, (parent, abstract) in TYPES.items():
        if abstract and not want_abstract:
            continue
        if "implements" in args and (
            args["implements"] not in TYPES or not implements(name, args["implements"])
        ):
            continue
        info: dict[str, Any] = {"abstract": True} if abstract else {}
        info["name"] = name
        if parent is not None:
            info["parent"] = parent
        answer.append(info)
    return answer
