"""qemu-storage-daemon's command line: getopt_long-style scanning and option conversion.

:func:`iter_options` walks ``argv`` the way glibc's ``getopt_long`` does for QEMU (long
options may be abbreviated to any unique prefix, take their argument as ``--opt value`` or
``--opt=value``, short options may be bundled) and yields the options in order; it does not
interpret their arguments.  :func:`convert_option` then turns one option's argument into the
typed arguments of its QMP command (or of its command-line-only type), entirely from what the
QAPI schema declares about the option (``cli-option`` expressions in ``qapi/cli.json``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qsd_py import QEMU_VERSION, __version__
from qsd_py.errors import QMPError
from qsd_py.qapi.model import ArrayType, BuiltinType, EnumType
from qsd_py.qapi.model import CliOption as OptionDecl
from qsd_py.qapi.schema import QAPISchema
from qsd_py.qapi.visit import Visitor

PROG = "qsd-py"

# long name -> (takes an argument, short letter)
LONG_OPTIONS: dict[str, tuple[bool, str | None]] = {
    "help": (False, "h"),
    "version": (False, "V"),
    "blockdev": (True, None),
    "export": (True, None),
    "object": (True, None),
    "nbd-server": (True, None),
    "chardev": (True, None),
    "monitor": (True, None),
    "pidfile": (True, None),
    "daemonize": (False, None),
}
SHORT_OPTIONS = {short: name for name, (_, short) in LONG_OPTIONS.items() if short}

HELP_TEXT = f"""\
Usage: {PROG} [options]
A storage daemon with qemu-storage-daemon's interfaces (QMP, QAPI, command line)
and block exports over FUSE (/dev/fuse or FUSE-over-io_uring) and NBD.

  -h, --help             print this text and exit
  -V, --version          print the version and exit

  --blockdev [driver=]<driver>[,node-name=<name>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,<driver options>]
                         add a block node, as QMP's blockdev-add.  Drivers:
                           file:    filename=<path>[,aio=threads|io_uring|native]
                                    [,locking=auto|on|off]
                           raw:     file=<node-name>|file.<option>=...
                                    [,offset=<bytes>][,size=<bytes>]
                           null-co: [size=<bytes>][,read-zeroes=on|off]
                                    [,latency-ns=<ns>]

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,writable=on|off][,writethrough=on|off][,growable=on|off]
           [,allow-other=on|off|auto][,iothread=<id>|iothread.0=<id>,...]
           [,fixed-iothread=on|off][,io_uring=on|off][,queue-depth=<n>]
                         export a node over FUSE at <file> (an existing
                         regular file), as QMP's block-export-add;
                         io_uring=on serves it over FUSE-over-io_uring
                         (needs /sys/module/fuse/parameters/enable_uring)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,description=<text>][,writable=on|off][,writethrough=on|off]
           [,allocation-depth=on|off][,bitmaps.0=<bitmap>,...]
           [,iothread=<id>]
                         export a node on the NBD server (see --nbd-server),
                         as QMP's block-export-add; the export name defaults
                         to the node name

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,<options>]
  --nbd-server addr.type=unix,addr.path=<path>[,<options>]
  --nbd-server addr.type=fd,addr.str=<fd>[,<options>]
               options: [,tls-creds=<id>][,tls-authz=<id>]
                        [,max-connections=<n>][,handshake-max-seconds=<n>]
                         start the NBD server, as QMP's nbd-server-start

  --object [qom-type=]iothread,id=<id>[,poll-max-ns=<ns>][,...]
                         add an I/O thread, as QMP's object-add
                         (--object help, --object iothread,help list them)
  --object tls-creds-x509,id=<id>,dir=<dir>[,endpoint=client|server]
           [,verify-peer=on|off][,sanity-check=on|off]
  --object tls-creds-psk,id=<id>,dir=<dir>[,endpoint=client|server]
           [,username=<name>]
  --object tls-creds-anon,id=<id>[,dir=<dir>][,endpoint=client|server]
                         TLS credentials from QEMU's files in <dir>
                         (ca-cert.pem, server-cert.pem, keys.psk...)
  --object authz-simple,id=<id>,identity=<name>
  --object authz-list,id=<id>[,policy=deny|allow][,rules.<n>.match=<name>,
           rules.<n>.policy=allow|deny[,rules.<n>.format=exact|glob]]
                         who may connect to a TLS server (client
                         certificates' distinguished names)

  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
                         a socket for a monitor; with server=on the daemon
                         listens (use wait=off), without it connects to <path>
  --chardev null|ringbuf|file|pty,id=<id>[,size=<n>][,path=<file>][,append=on]
           [,input-path=<file>][,logfile=<file>[,logappend=on]]
                         other chardevs (chardev-add makes all of QEMU's)
  --chardev stdio,id=<id>
                         stdin and stdout, for a monitor (as QEMU's iotests)

  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         serve QMP over the --chardev <id>

  --pidfile <path>       write the process id to <path> once every option
                         given here is set up
  --daemonize            detach once every option given here is set up

Options are applied in the order given.
"""


def version_text() -> str:
    """The ``--version`` text: qsd-py's version and the QEMU version it follows."""
    qemu = ".".join(str(n) for n in QEMU_VERSION)
    return f"{PROG} version {__version__} (interfaces of qemu-storage-daemon {qemu})\n"


class CliError(Exception):
    """A command line that cannot be scanned; ``str()`` is the text after ``qsd-py: ``."""


class CliHelp(Exception):  # noqa: N818 - not an error: the caller prints ``text`` and exits 0
    """An option asked for help (``--object help``); ``text`` goes to stdout."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass(frozen=True)
class CliOption:
    """One option: its long ``name``, its argument, and how QEMU shows it in errors."""

    name: str
    arg: str | None
    given: str


# --- scanning ------------------------------------------------------------------------------


def _match_long(name: str, raw: str) -> str:
    if name in LONG_OPTIONS:
        return name
    matches = [n for n in LONG_OPTIONS if n.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(f"unrecognized option '{raw}'")
    listing = " ".join(f"'--{m}'" for m in matches)
    raise CliError(f"option '{raw}' is ambiguous; possibilities: {listing}")


def iter_options(argv: list[str]) -> Iterator[CliOption]:
    """Yield the options of ``argv`` (without the program name) in order.

    Raises :class:`CliError` with getopt's text at the first bad option. An argument that is
    not an option is yielded as ``CliOption("argument", arg, arg)``: QEMU reports it
    (``<arg>: Unexpected argument``) only after applying every option.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            for rest in argv[i:]:
                yield CliOption("argument", rest, rest)
            return
        if arg.startswith("--"):
            body, eq, value = arg[2:].partition("=")
            name = _match_long(body, arg)
            takes_arg = LONG_OPTIONS[name][0]
            if eq:
                if not takes_arg:
                    raise CliError(f"option '--{name}' doesn't allow an argument")
                yield CliOption(name, value, arg)
            elif takes_arg:
                if i >= len(argv):
                    raise CliError(f"option '--{name}' requires an argument")
                yield CliOption(name, argv[i], f"{arg} {argv[i]}")
                i += 1
            else:
                yield CliOption(name, None, arg)
        elif arg.startswith("-") and arg != "-":
            for letter in arg[1:]:
                name = SHORT_OPTIONS.get(letter)
                if name is None:
                    raise CliError(f"invalid option -- '{letter}'")
                yield CliOption(name, None, f"-{letter}")
        else:
            # getopt moves arguments that are no options to the end; QEMU complains about
            # them only after applying every option, so the caller decides when to fail.
            yield CliOption("argument", arg, arg)


# --- converting ----------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_NO_HELP = "Help is not available for this option"


def convert_option(schema: QAPISchema, name: str, arg: str) -> tuple[str | None, dict[str, Any]]:
    """Turn the argument of ``--name`` into ``(command, typed arguments)``.

    For options declared with a command (blockdev, export, object) the caller runs the
    command with the arguments (the daemon validates them once more against the schema);
    for options with a type of their own (chardev, monitor) ``command`` is None and the
    arguments are already validated.  Raises :class:`QMPError` with QEMU's text, or
    :class:`CliHelp` when the argument asks for help.
    """
    from qsd_py.cli.keyval import parse_keyval, parse_qemu_opts

    option = schema.cli_option(name)
    if option is None:
        raise QMPError(f"option '--{name}' takes no key=value argument")
    if option.syntax == "qemu-opts":
        parsed = parse_qemu_opts(arg, option.implied_key)
        if parsed.help:
            raise CliHelp(_help_text(option, parsed.tree))
        return None, _convert_qemu_opts(schema, option, parsed.tree)
    parsed = parse_keyval(arg, option.implied_key)
    if parsed.help:
        raise CliHelp(_help_text(option, parsed.tree))
    args = Visitor(keyval=True).visit(option.arg_type, parsed.tree, "", None)
    if option.command is None:
        return None, schema.check_type_value(option.arg_type, args, json_schema=False)
    return option.command.name, args


def _convert_qemu_opts(
    schema: QAPISchema, option: OptionDecl, tree: dict[str, str]
) -> dict[str, Any]:
    """QemuOpts' checks, in its order: id, each key in turn, then the backend."""
    typ = option.arg_type
    if "id" in tree and not _IDENTIFIER.match(tree["id"]):
        raise QMPError(
            "Parameter 'id' expects an identifier\n"
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
        )
    visitor = Visitor(keyval=True)
    args: dict[str, Any] = {}
    for key, value in tree.items():
        member = typ.member(key)
        if member is None:
            raise QMPError(f"Invalid parameter '{key}'")
        if isinstance(member.type, BuiltinType):
            args[key] = visitor.visit(member.type, value, key, key)
        else:
            args[key] = value  # enums: checked below with the option's own wording
    if "id" not in args:
        raise QMPError(f"{option.name}: no id specified")
    tag = option.implied_key
    if tag and tag not in args:
        raise QMPError(f'{option.name}: "{args["id"]}" missing {tag}')
    tag_type = typ.member(tag).type if tag and typ.member(tag) else None
    if isinstance(tag_type, EnumType) and args[tag] not in tag_type.values:
        raise QMPError(f"'{args[tag]}' is not a valid char driver name")
    return schema.check_type_value(typ, args, json_schema=False)


def _help_text(option: OptionDecl, tree: dict[str, Any]) -> str:
    """``--object help``, ``--object iothread,help``, ``--chardev help``; others refuse."""
    if not option.help:
        raise QMPError(_NO_HELP)
    typ = option.arg_type
    tag = option.implied_key
    tag_member = typ.member(tag) if tag else None
    if tag_member is None or not isinstance(tag_member.type, EnumType):
        raise QMPError(_NO_HELP)
    choice = tree.get(tag)
    variant = typ.variants.get(choice) if isinstance(choice, str) else None
    if variant is not None:
        # QEMU sorts the formatted lines, not the names: "x-bps-read-max=" before "x-bps-read=".
        props = sorted(f"  {m.name}=<{_type_hint(m.type)}>" for m in variant.members)
        return "\n".join([f"{choice} options:", *props]) + "\n"
    if option.syntax == "qemu-opts":
        lines = ["Available chardev backend types: "]
    else:
        lines = ["List of user creatable objects:"]
    lines += [f"  {v}" for v in sorted(tag_member.type.values)]
    return "\n".join(lines) + "\n"


def _type_hint(typ: Any) -> str:
    """QOM's names for property types in help texts (``string``, ``bool``, ``int``, sized
    integers by their C type: ``serial=<int32_t>``; a list by its element type:
    ``rules=<QAuthZListRule>``)."""
    if isinstance(typ, ArrayType) and typ.element is not None:
        return str(typ.element.name)
    if isinstance(typ, BuiltinType):
        if typ.name[-1].isdigit():
            return f"{typ.name}_t"
        return {"string": "string", "boolean": "bool"}.get(typ.json_type, typ.name)
    return str(typ.name)  # an enum's or a struct's name: limits=<ThrottleLimits>
