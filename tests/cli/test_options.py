# ruff: noqa: E501 - the table holds whole command lines and error lines
"""Command-line scanning and conversion; the error texts were observed on QEMU 11.1's
qemu-storage-daemon (with qemu-storage-daemon: where qsd-py prints qsd-py:)."""

from __future__ import annotations

from typing import Any

import pytest

from qsd_py.cli.options import (
    HELP_TEXT,
    CliError,
    CliHelp,
    CliOption,
    convert_option,
    iter_options,
    version_text,
)
from qsd_py.errors import QMPError
from qsd_py.qapi.schema import load_schema

# (argv, the error line after "qsd-py: ")
CLI_ERRORS: list[tuple[list[str], str]] = [
    (
        ["--blockdev", "driver=qcow2,node-name=q"],
        "--blockdev driver=qcow2,node-name=q: Parameter 'file' is missing",
    ),
    (
        ["--blockdev", "qcow2,node-name=q,file=f,cache-size=1M"],
        "--blockdev qcow2,node-name=q,file=f,cache-size=1M: Parameter 'cache-size' expects integer",
    ),
    (
        ["--blockdev", "qcow2,node-name=q,file=f,lazy-refcounts=maybe"],
        "--blockdev qcow2,node-name=q,file=f,lazy-refcounts=maybe: Parameter 'lazy-refcounts' expects 'on' or 'off'",
    ),
    (
        ["--blockdev", "qcow2,node-name=q,file=f,overlap-check=bogus"],
        "--blockdev qcow2,node-name=q,file=f,overlap-check=bogus: Parameter 'overlap-check' does not accept value 'bogus'",
    ),
    (
        ["--blockdev", "qcow2,node-name=q,file=f,overlap-check.template=bogus"],
        "--blockdev qcow2,node-name=q,file=f,overlap-check.template=bogus: Parameter 'template' does not accept value 'bogus'",
    ),
    (
        ["--nbd-server", "addr.type=unix"],
        "--nbd-server addr.type=unix: Parameter 'addr.path' is missing",
    ),
    (["--nbd-server", "foo"], "--nbd-server foo: Expected '=' after parameter 'foo'"),
    (
        ["--nbd-server", "addr.type=unix,addr.path=/x,max-connections=abc"],
        "--nbd-server addr.type=unix,addr.path=/x,max-connections=abc: Parameter 'max-connections' expects integer",
    ),
    (
        ["--nbd-server", "addr.type=unix,addr.path=/x,handshake-max-seconds=-1"],
        "--nbd-server addr.type=unix,addr.path=/x,handshake-max-seconds=-1: Parameter 'handshake-max-seconds' expects uint32_t",
    ),
    (
        ["--nbd-server", "addr.type=inet,addr.host=h"],
        "--nbd-server addr.type=inet,addr.host=h: Parameter 'addr.port' is missing",
    ),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--blockdev"], "option '--blockdev' requires an argument"),
    (["-x"], "invalid option -- 'x'"),
    (["foo"], "foo: Unexpected argument"),
    (
        ["--blockdev", "bad", "foo"],
        "--blockdev bad: Parameter 'driver' does not accept value 'bad'",
    ),
    (["--blockdev=node-name=x"], "--blockdev=node-name=x: Parameter 'driver' is missing"),
    (["--blockdev", "node-name=x"], "--blockdev node-name=x: Parameter 'driver' is missing"),
    (["--block", "node-name=x"], "--block node-name=x: Parameter 'driver' is missing"),
    (["--blockdev", ""], "--blockdev : Parameter 'driver' is missing"),
    (
        ["--blockdev", "null-co,node-name"],
        "--blockdev null-co,node-name: Expected '=' after parameter 'node-name'",
    ),
    (["--blockdev", "null-co,a..b=1"], "--blockdev null-co,a..b=1: Invalid parameter 'a..b'"),
    (["--blockdev", "null-co,=1"], "--blockdev null-co,=1: Invalid parameter ''"),
    (
        ["--blockdev", "null-co,null-co"],
        "--blockdev null-co,null-co: Expected '=' after parameter 'null-co'",
    ),
    (
        ["--blockdev", "driver=null-co,null-co"],
        "--blockdev driver=null-co,null-co: Expected '=' after parameter 'null-co'",
    ),
    (
        ["--blockdev", "null-co,size=abc"],
        "--blockdev null-co,size=abc: Parameter 'size' expects integer",
    ),
    (
        ["--blockdev", "null-co,size=1G"],
        "--blockdev null-co,size=1G: Parameter 'size' expects integer",
    ),
    (
        ["--blockdev", "null-co,node-name=a,detect-zeroes=maybe"],
        "--blockdev null-co,node-name=a,detect-zeroes=maybe: Parameter 'detect-zeroes' does not accept value 'maybe'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,cache=on"],
        "--blockdev null-co,node-name=a,cache=on: Invalid parameter type for 'cache', expected: object",
    ),
    (
        ["--blockdev", "null-co,node-name=a,cache.foo=on"],
        "--blockdev null-co,node-name=a,cache.foo=on: Parameter 'cache.foo' is unexpected",
    ),
    (
        ["--blockdev", "null-co,node-name=a,foo=on"],
        "--blockdev null-co,node-name=a,foo=on: Parameter 'foo' is unexpected",
    ),
    (
        ["--blockdev", "null-co,node-name=a,cache.direct=on,cache=x"],
        "--blockdev null-co,node-name=a,cache.direct=on,cache=x: Parameters 'cache.*' used inconsistently",
    ),
    (
        ["--blockdev", "bogus,node-name=a"],
        "--blockdev bogus,node-name=a: Parameter 'driver' does not accept value 'bogus'",
    ),
    (
        ["--blockdev", "raw,node-name=a,file.driver=file"],
        "--blockdev raw,node-name=a,file.driver=file: Parameter 'file.filename' is missing",
    ),
    (
        ["--blockdev", "raw,node-name=a,file.driver=bogus"],
        "--blockdev raw,node-name=a,file.driver=bogus: Parameter 'driver' does not accept value 'bogus'",
    ),
    (["--blockdev", "raw,node-name=a"], "--blockdev raw,node-name=a: Parameter 'file' is missing"),
    (
        ["--blockdev", "raw,node-name=a,file.0=x"],
        "--blockdev raw,node-name=a,file.0=x: Invalid parameter type for 'file', expected: BlockdevRef",
    ),
    (
        ["--blockdev", "null-co,node-name=a,x,,y=1"],
        "--blockdev null-co,node-name=a,x,,y=1: Expected '=' after parameter 'x'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,read-only=maybe"],
        "--blockdev null-co,node-name=a,read-only=maybe: Parameter 'read-only' expects 'on' or 'off'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,read-only=ON"],
        "--blockdev null-co,node-name=a,read-only=ON: Parameter 'read-only' expects 'on' or 'off'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,read-only="],
        "--blockdev null-co,node-name=a,read-only=: Parameter 'read-only' expects 'on' or 'off'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,size="],
        "--blockdev null-co,node-name=a,size=: Parameter 'size' expects integer",
    ),
    (
        ["--blockdev", "null-co,node-name=a,size=12abc"],
        "--blockdev null-co,node-name=a,size=12abc: Parameter 'size' expects integer",
    ),
    (
        ["--blockdev", "null-co,node-name=a,size=99999999999999999999"],
        "--blockdev null-co,node-name=a,size=99999999999999999999: Parameter 'size' expects integer",
    ),
    (
        ["--blockdev", "null-co,node-name=a,size=1.5"],
        "--blockdev null-co,node-name=a,size=1.5: Parameter 'size' expects integer",
    ),
    (
        ["--blockdev", "null-co,node-name=a,size=9223372036854775808"],
        "--blockdev null-co,node-name=a,size=9223372036854775808: Parameter 'size' expects integer",
    ),
    (
        ["--blockdev", "null-co,node-name=a,cache.direct=on,cache.direct=off,cache.no-flush=x"],
        "--blockdev null-co,node-name=a,cache.direct=on,cache.direct=off,cache.no-flush=x: Parameter 'cache.no-flush' expects 'on' or 'off'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,cache.direct.x=on"],
        "--blockdev null-co,node-name=a,cache.direct.x=on: Parameters 'cache.direct.*' are unexpected",
    ),
    (
        ["--blockdev", "null-co,node-name=a,.x=on"],
        "--blockdev null-co,node-name=a,.x=on: Invalid parameter '.x'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,x.=on"],
        "--blockdev null-co,node-name=a,x.=on: Invalid parameter 'x.'",
    ),
    (
        ["--blockdev", "null-co,node-name=a,a-b_c.d=1"],
        "--blockdev null-co,node-name=a,a-b_c.d=1: Parameter 'a-b_c' is unexpected",
    ),
    (
        ["--blockdev", "null-co,node-name=a,x@y=1"],
        "--blockdev null-co,node-name=a,x@y=1: Invalid parameter 'x@y'",
    ),
    (
        ["--blockdev", "null-co,,x,node-name=a"],
        "--blockdev null-co,,x,node-name=a: Invalid parameter ''",
    ),
    (["--blockdev", ",node-name=a"], "--blockdev ,node-name=a: Invalid parameter ''"),
    (
        ["--blockdev", "null-co,node-name=a,x=1,,2"],
        "--blockdev null-co,node-name=a,x=1,,2: Parameter 'x' is unexpected",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,iothread.0=a,iothread.2=b"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,iothread.0=a,iothread.2=b: Parameter 'iothread.1' missing",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,iothread.1=a"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,iothread.1=a: Parameter 'iothread.0' missing",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,iothread.x=a"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,iothread.x=a: Invalid parameter type for 'iothread', expected: BlockExportIothreads",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,iothread.0.x=a"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,iothread.0.x=a: Parameters 'iothread.0.*' are unexpected",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,iothread.0=a,iothread=b"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,iothread.0=a,iothread=b: Parameters 'iothread.*' used inconsistently",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,writable=maybe"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,writable=maybe: Parameter 'writable' expects 'on' or 'off'",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,allow-other=maybe"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,allow-other=maybe: Parameter 'allow-other' does not accept value 'maybe'",
    ),
    (
        ["--export", "fuse,id=e,node-name=n"],
        "--export fuse,id=e,node-name=n: Parameter 'mountpoint' is missing",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,mountpoint=/x,foo=1"],
        "--export fuse,id=e,node-name=n,mountpoint=/x,foo=1: Parameter 'foo' is unexpected",
    ),
    (
        ["--export", "fuse,id=e,node-name=n,foo=1"],
        "--export fuse,id=e,node-name=n,foo=1: Parameter 'mountpoint' is missing",
    ),
    (
        ["--export", "fuse,node-name=n,foo=1"],
        "--export fuse,node-name=n,foo=1: Parameter 'id' is missing",
    ),
    (["--export", "fuse"], "--export fuse: Parameter 'id' is missing"),
    (
        ["--export", "type=bogus"],
        "--export type=bogus: Parameter 'type' does not accept value 'bogus'",
    ),
    (["--export"], "option '--export' requires an argument"),
    (["--export", ""], "--export : Parameter 'type' is missing"),
    (
        ["--object", "iothread,id=t,poll-max-ns=abc"],
        "--object iothread,id=t,poll-max-ns=abc: Parameter 'poll-max-ns' expects integer",
    ),
    (
        ["--object", "iothread,poll-max-ns=abc"],
        "--object iothread,poll-max-ns=abc: Parameter 'id' is missing",
    ),
    (
        ["--object", "iothread,id=t,foo=1"],
        "--object iothread,id=t,foo=1: Parameter 'foo' is unexpected",
    ),
    (
        ["--object", "bogus,id=t"],
        "--object bogus,id=t: Parameter 'qom-type' does not accept value 'bogus'",
    ),
    (["--object", "id=t"], "--object id=t: Parameter 'qom-type' is missing"),
    (["--blockdev", "help"], "--blockdev help: Help is not available for this option"),
    (["--export", "help"], "--export help: Help is not available for this option"),
    (["--chardev", "bogus,id=c"], "--chardev bogus,id=c: 'bogus' is not a valid char driver name"),
    (["--pidfile"], "option '--pidfile' requires an argument"),
    (["--daemonize=x"], "option '--daemonize' doesn't allow an argument"),
    (["--help=x"], "option '--help' doesn't allow an argument"),
    (
        ["--blockdev", "null-co,node-name=a,x=1,y=2"],
        "--blockdev null-co,node-name=a,x=1,y=2: Parameter 'y' is unexpected",
    ),
    (
        ["--blockdev", "null-co,node-name=a,y=1,x=2"],
        "--blockdev null-co,node-name=a,y=1,x=2: Parameter 'y' is unexpected",
    ),
    (
        ["--blockdev", "null-co,node-name=a,ab=1,ba=2"],
        "--blockdev null-co,node-name=a,ab=1,ba=2: Parameter 'ab' is unexpected",
    ),
    (
        ["--blockdev", "null-co,node-name=a,help"],
        "--blockdev null-co,node-name=a,help: Help is not available for this option",
    ),
    (
        ["--chardev", "socket,id=c,path=/tmp/c.sock,server=maybe,wait=off"],
        "--chardev socket,id=c,path=/tmp/c.sock,server=maybe,wait=off: Parameter 'server' expects 'on' or 'off'",
    ),
    (
        ["--chardev", "socket,id=c,path=/tmp/c.sock,server=on,wait=off,foo=1"],
        "--chardev socket,id=c,path=/tmp/c.sock,server=on,wait=off,foo=1: Invalid parameter 'foo'",
    ),
    (
        ["--chardev", "socket,path=/tmp/c.sock,server=on,wait=off"],
        "--chardev socket,path=/tmp/c.sock,server=on,wait=off: chardev: no id specified",
    ),
    (
        ["--chardev", "id=c,path=/tmp/c.sock,server=on,wait=off"],
        '--chardev id=c,path=/tmp/c.sock,server=on,wait=off: chardev: "c" missing backend',
    ),
    (["--chardev", "bogus,id=c"], "--chardev bogus,id=c: 'bogus' is not a valid char driver name"),
    (
        ["--chardev", "socket,id=c,path=/tmp/c.sock,server=on,wait=off,,x"],
        "--chardev socket,id=c,path=/tmp/c.sock,server=on,wait=off,,x: Parameter 'wait' expects 'on' or 'off'",
    ),
    (
        ["--chardev", "socket,id=c,path=/tmp/c.sock,a.b=1"],
        "--chardev socket,id=c,path=/tmp/c.sock,a.b=1: Invalid parameter 'a.b'",
    ),
    (
        ["--chardev", "socket,id=1c,path=/tmp/c.sock"],
        "--chardev socket,id=1c,path=/tmp/c.sock: Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
    ),
    (
        ["--chardev", "socket,socket,id=c,path=/tmp/c.sock"],
        "--chardev socket,socket,id=c,path=/tmp/c.sock: Invalid parameter 'socket'",
    ),
    (
        ["--monitor", "chardev=c,pretty=maybe"],
        "--monitor chardev=c,pretty=maybe: Parameter 'pretty' expects 'on' or 'off'",
    ),
    (["--monitor", "chardev=c,foo=1"], "--monitor chardev=c,foo=1: Parameter 'foo' is unexpected"),
    (["--monitor", "pretty=on"], "--monitor pretty=on: Parameter 'chardev' is missing"),
]


def first_error(argv: list[str]) -> str | None:
    """Scan, then convert argv in order like main does, and return the error line (or None)."""
    schema = load_schema()
    try:
        options = list(iter_options(argv))
    except CliError as err:
        return str(err)
    for opt in options:
        if opt.arg is None or opt.name in ("pidfile", "argument"):
            continue
        try:
            command, args = convert_option(schema, opt.name, opt.arg)
            if command is not None:
                schema.check_command_args(command, args)
        except QMPError as err:
            return f"{opt.given}: {err.desc}"
    for opt in options:
        if opt.name == "argument":
            return f"{opt.arg}: Unexpected argument"
    return None


@pytest.mark.parametrize(("argv", "message"), CLI_ERRORS)
def test_cli_error_text(argv: list[str], message: str) -> None:
    assert first_error(argv) == message


def test_both_argument_spellings_and_abbreviations() -> None:
    opts = list(iter_options(["--blockdev", "a", "--export=b", "--obj", "c", "--daemonize"]))
    assert opts == [
        CliOption("blockdev", "a", "--blockdev a"),
        CliOption("export", "b", "--export=b"),
        CliOption("object", "c", "--obj c"),
        CliOption("daemonize", None, "--daemonize"),
    ]


def test_help_and_version() -> None:
    assert [o.name for o in iter_options(["-hV"])] == ["help", "version"]
    assert [o.name for o in iter_options(["--version", "--help"])] == ["version", "help"]
    for option in ("--blockdev", "--export", "--object", "--chardev", "--monitor", "io_uring",
                   "--nbd-server", "type=]nbd"):  # fmt: skip
        assert option in HELP_TEXT
    assert version_text().startswith("qsd-py version ")


def test_options_before_a_bad_one_are_yielded_first() -> None:
    it = iter_options(["--pidfile", "p", "--bogus"])
    assert next(it).name == "pidfile"
    with pytest.raises(CliError, match="unrecognized option '--bogus'"):
        next(it)


def test_bogus_with_value_and_separator() -> None:
    assert first_error(["--bogus=1"]) == "unrecognized option '--bogus=1'"
    assert first_error(["--", "x"]) == "x: Unexpected argument"


CONVERSIONS: list[tuple[str, str, str | None, dict[str, Any]]] = [
    (
        "blockdev",
        "raw,node-name=r,file.driver=file,file.filename=/x,,y,file.aio=io_uring,offset=0x200",
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "r",
            "file": {"driver": "file", "filename": "/x,y", "aio": "io_uring"},
            "offset": 512,
        },
    ),
    (
        "blockdev",
        "driver=raw,file=f0,read-only=on,cache.direct=off",
        "blockdev-add",
        {"driver": "raw", "file": "f0", "read-only": True, "cache": {"direct": False}},
    ),
    (
        "blockdev",
        "null-co,node-name=n,size=-1,read-zeroes=yes",
        "blockdev-add",
        {"driver": "null-co", "node-name": "n", "size": -1, "read-zeroes": True},
    ),
    (
        "blockdev",
        "qcow2,node-name=q,file=f,backing=b,overlap-check=none,cache-size=1048576,"
        "encrypt.format=luks,encrypt.key-secret=s0",
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": "f",
            "backing": "b",
            "overlap-check": "none",
            "cache-size": 1048576,
            "encrypt": {"format": "luks", "key-secret": "s0"},
        },
    ),
    (
        "blockdev",
        "qcow2,node-name=q,file=f,backing=null,overlap-check.template=all,"
        "overlap-check.active-l2=off",
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": "f",
            "backing": "null",
            "overlap-check": {"template": "all", "active-l2": False},
        },
    ),
    (
        "export",
        "fuse,id=e,node-name=n,mountpoint=/m,iothread.0=a,iothread.1=b,io-uring=on,queue-depth=32",
        "block-export-add",
        {
            "type": "fuse",
            "id": "e",
            "node-name": "n",
            "mountpoint": "/m",
            "iothread": ["a", "b"],
            "io_uring": True,
            "queue-depth": 32,
        },
    ),
    (
        "export",
        "type=fuse,id=e,node-name=n,mountpoint=/m,iothread=t,io_uring=off,writable=on",
        "block-export-add",
        {
            "type": "fuse",
            "id": "e",
            "node-name": "n",
            "mountpoint": "/m",
            "iothread": "t",
            "io_uring": False,
            "writable": True,
        },
    ),
    (
        "object",
        "iothread,id=t0,poll-max-ns=0",
        "object-add",
        {"qom-type": "iothread", "id": "t0", "poll-max-ns": 0},
    ),
    (
        "chardev",
        "socket,id=c,path=/tmp/s,server=on,wait=off",
        None,
        {"backend": "socket", "id": "c", "path": "/tmp/s", "server": True, "wait": False},
    ),
    (
        "chardev",
        "socket,id=c,path=/tmp/s,server,nowait",
        None,
        {"backend": "socket", "id": "c", "path": "/tmp/s", "server": True, "wait": False},
    ),
    (
        "chardev",
        "socket,id=c,host=127.0.0.1,port=4444",
        None,
        {"backend": "socket", "id": "c", "host": "127.0.0.1", "port": "4444"},
    ),
    ("monitor", "c,pretty=on", None, {"chardev": "c", "pretty": True}),
    (
        "monitor",
        "chardev=c,mode=control,id=m",
        None,
        {"chardev": "c", "mode": "control", "id": "m"},
    ),
]


@pytest.mark.parametrize(("name", "arg", "command", "args"), CONVERSIONS)
def test_conversion(name: str, arg: str, command: str | None, args: dict[str, Any]) -> None:
    schema = load_schema()
    got_command, got_args = convert_option(schema, name, arg)
    assert (got_command, got_args) == (command, args)
    if command is not None:
        assert schema.check_command_args(command, got_args) == args


def test_help_texts() -> None:
    schema = load_schema()
    with pytest.raises(CliHelp) as h:
        convert_option(schema, "object", "help")
    assert h.value.text == (
        "List of user creatable objects:\n  authz-list\n  authz-simple\n  iothread\n"
        "  secret\n  secret_keyring\n  throttle-group\n  tls-creds-anon\n  tls-creds-psk\n"
        "  tls-creds-x509\n"
    )
    with pytest.raises(CliHelp) as h:  # QEMU 11.1's: lines sorted as text, a struct by name
        convert_option(schema, "object", "throttle-group,help")
    lines = h.value.text.splitlines()
    assert lines[:5] == [
        "throttle-group options:", "  limits=<ThrottleLimits>",
        "  x-bps-read-max-length=<int>", "  x-bps-read-max=<int>", "  x-bps-read=<int>",
    ]  # fmt: skip
    with pytest.raises(CliHelp) as h:  # QEMU 11.1's text: QOM's C type for a sized integer
        convert_option(schema, "object", "secret_keyring,help")
    assert h.value.text == (
        "secret_keyring options:\n  format=<QCryptoSecretFormat>\n  iv=<string>\n"
        "  keyid=<string>\n  serial=<int32_t>\n"
    )
    with pytest.raises(CliHelp) as h:
        convert_option(schema, "object", "iothread,help")
    assert "  poll-max-ns=<int>\n" in h.value.text
    with pytest.raises(CliHelp) as h:  # QEMU 11.1's text
        convert_option(schema, "object", "authz-list,help")
    assert h.value.text == (
        "authz-list options:\n  policy=<QAuthZListPolicy>\n  rules=<QAuthZListRule>\n"
    )
    with pytest.raises(CliHelp) as h:
        convert_option(schema, "object", "tls-creds-psk,help")
    assert h.value.text == (
        "tls-creds-psk options:\n  dir=<string>\n  endpoint=<QCryptoTLSCredsEndpoint>\n"
        "  priority=<string>\n  username=<string>\n  verify-peer=<bool>\n"
    )
    with pytest.raises(CliHelp) as h:
        convert_option(schema, "chardev", "help")
    assert "socket" in h.value.text
