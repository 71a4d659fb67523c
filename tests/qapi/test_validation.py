"""QMP argument checking: every text below was observed on QEMU 11.1's qemu-storage-daemon."""

from __future__ import annotations

from typing import Any

import pytest

from qsd_py.errors import QMPError
from qsd_py.qapi.schema import load_schema

# (command, arguments, QEMU's error text)
QMP_ERRORS: list[tuple[str, Any, str]] = [
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n"},
        "Parameter 'mountpoint' is missing",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "writable": "yes"},
        "Invalid parameter type for 'writable', expected: boolean",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "foo": 1},
        "Parameter 'foo' is unexpected",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "allow-other": "maybe"},
        "Parameter 'allow-other' does not accept value 'maybe'",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "foo": 1},
        "Parameter 'mountpoint' is missing",
    ),
    ("block-export-add", {}, "Parameter 'type' is missing"),
    ("block-export-add", None, "Parameter 'type' is missing"),
    ("block-export-add", {"type": "fuse", "foo": 1}, "Parameter 'id' is missing"),
    ("block-export-add", {"type": 5}, "Invalid parameter type for 'type', expected: string"),
    ("block-export-add", {"type": None}, "Invalid parameter type for 'type', expected: string"),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "iothread": 5},
        "Invalid parameter type for 'iothread', expected: BlockExportIothreads",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "iothread": [1]},
        "Invalid parameter type for 'iothread[0]', expected: string",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "iothread": None},
        "Invalid parameter type for 'iothread', expected: BlockExportIothreads",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "iothread": {}},
        "Invalid parameter type for 'iothread', expected: BlockExportIothreads",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "writable": None},
        "Invalid parameter type for 'writable', expected: boolean",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": 5},
        "Invalid parameter type for 'mountpoint', expected: string",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "writable": 1},
        "Invalid parameter type for 'writable', expected: boolean",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "allow-other": 1},
        "Invalid parameter type for 'allow-other', expected: string",
    ),
    (
        "block-export-add",
        {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/x", "writable": "on"},
        "Invalid parameter type for 'writable', expected: boolean",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": {"driver": "file"}},
        "Parameter 'file.filename' is missing",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": {"driver": "bogus"}},
        "Parameter 'driver' does not accept value 'bogus'",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": {}},
        "Parameter 'file.driver' is missing",
    ),
    (
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "a",
            "file": {"driver": "file", "filename": "/x", "aio": "bad"},
        },
        "Parameter 'aio' does not accept value 'bad'",
    ),
    (
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "a",
            "file": {"driver": "file", "filename": "/x", "cache": {"direct": "x"}},
        },
        "Invalid parameter type for 'file.cache.direct', expected: boolean",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "/x", "foo": 1}},
        "Parameter 'file.foo' is unexpected",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": {"driver": "raw", "file": {"driver": "file"}}},
        "Parameter 'file.file.filename' is missing",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": 5},
        "Invalid parameter type for 'file', expected: BlockdevRef",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": None},
        "Invalid parameter type for 'file', expected: BlockdevRef",
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "a", "file": []},
        "Invalid parameter type for 'file', expected: BlockdevRef",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "size": "1"},
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "size": 1.5},
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "size": 1000.0},
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "size": 18446744073709551615},
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "size": 99999999999999999999},
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "size": True},
        "Invalid parameter type for 'size', expected: integer",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "cache": 5},
        "Invalid parameter type for 'cache', expected: object",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "cache": {"direct": True, "foo": 1}},
        "Parameter 'cache.foo' is unexpected",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": "a", "discard": "x", "foo": 1},
        "Parameter 'discard' does not accept value 'x'",
    ),
    (
        "blockdev-add",
        {"driver": "null-co", "node-name": 5, "foo": 1},
        "Invalid parameter type for 'node-name', expected: string",
    ),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q"}, "Parameter 'file' is missing"),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "backing": 1},
        "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "backing": {"driver": "qcow2"}},
        "Parameter 'backing.file' is missing",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "data-file": None},
        "Invalid parameter type for 'data-file', expected: BlockdevRef",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "overlap-check": "bogus"},
        "Parameter 'overlap-check' does not accept value 'bogus'",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "overlap-check": {"template": "x"}},
        "Parameter 'template' does not accept value 'x'",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "overlap-check": {"l2": True}},
        "Parameter 'overlap-check.l2' is unexpected",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "overlap-check": 3},
        "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "cache-size": "1M"},
        "Invalid parameter type for 'cache-size', expected: integer",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "pass-discard-request": "on"},
        "Invalid parameter type for 'pass-discard-request', expected: boolean",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "encrypt": {"key-secret": "s"}},
        "Parameter 'encrypt.format' is missing",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "encrypt": {"format": "bogus"}},
        "Parameter 'format' does not accept value 'bogus'",
    ),
    (
        "blockdev-add",
        {"driver": "qcow2", "node-name": "q", "file": "f", "encrypt": {"format": "aes", "x": 1}},
        "Parameter 'encrypt.x' is unexpected",
    ),
    ("blockdev-add", {"node-name": "a", "foo": 1}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "null-co", "foo": 1, "bar": 2}, "Parameter 'bar' is unexpected"),
    ("blockdev-del", {}, "Parameter 'node-name' is missing"),
    ("blockdev-del", {"node-name": "x", "z": 1, "a": 2}, "Parameter 'z' is unexpected"),
    ("block_resize", {"size": "x"}, "Invalid parameter type for 'size', expected: integer"),
    ("block_resize", {}, "Parameter 'size' is missing"),
    (
        "block-export-del",
        {"id": "x", "mode": "soft"},
        "Parameter 'mode' does not accept value 'soft'",
    ),
    (
        "object-add",
        {"qom-type": "iothread", "id": "t", "poll-max-ns": "x"},
        "Invalid parameter type for 'poll-max-ns', expected: integer",
    ),
    ("object-add", {"qom-type": "iothread"}, "Parameter 'id' is missing"),
    ("object-add", {"qom-type": "bogus"}, "Parameter 'qom-type' does not accept value 'bogus'"),
    ("qmp_capabilities", {"enable": ["bogus"]}, "Parameter 'null' does not accept value 'bogus'"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ("query-version", {"x": 1}, "Parameter 'x' is unexpected"),
    (
        "query-named-block-nodes",
        {"flat": 1},
        "Invalid parameter type for 'flat', expected: boolean",
    ),
]


@pytest.mark.parametrize(("command", "args", "desc"), QMP_ERRORS)
def test_qmp_error_text(command: str, args: Any, desc: str) -> None:
    with pytest.raises(QMPError) as err:
        load_schema().check_command_args(command, args)
    assert err.value.desc == desc
    assert err.value.error_class == "GenericError"


VALID: list[tuple[str, dict[str, Any]]] = [
    ("qmp_capabilities", {}),
    ("qmp_capabilities", {"enable": ["oob"]}),
    ("blockdev-add", {"driver": "file", "node-name": "f", "filename": "/x", "aio": "io_uring"}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f", "offset": 512}),
    (
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "r",
            "file": {"driver": "file", "filename": "/x", "cache": {"direct": True}},
            "read-only": True,
            "discard": "unmap",
        },
    ),
    ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 30, "read-zeroes": True}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f", "backing": None}),
    (
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "q",
            "file": {"driver": "file", "filename": "/top.qcow2"},
            "backing": {
                "driver": "qcow2",
                "file": {"driver": "file", "filename": "/base.qcow2"},
                "backing": None,
            },
            "data-file": "d",
            "lazy-refcounts": True,
            "pass-discard-request": True,
            "pass-discard-snapshot": False,
            "pass-discard-other": True,
            "discard-no-unref": True,
            "overlap-check": {"template": "constant", "active-l2": True, "bitmap-directory": False},
            "cache-size": 1 << 20,
            "l2-cache-size": 1 << 19,
            "l2-cache-entry-size": 4096,
            "cache-clean-interval": 0,
            "encrypt": {"format": "luks", "key-secret": "s0"},
        },
    ),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f", "overlap-check": "all"}),
    ("block_resize", {"node-name": "n", "size": 4096}),
    ("object-add", {"qom-type": "iothread", "id": "t0", "poll-max-ns": 0}),
    ("block-export-add", {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/m"}),
    (
        "block-export-add",
        {
            "type": "fuse",
            "id": "e",
            "node-name": "n",
            "mountpoint": "/m",
            "iothread": ["t0", "t1"],
            "writable": True,
            "allow-other": "off",
            "io_uring": True,
            "queue-depth": 128,
        },
    ),
    ("block-export-del", {"id": "e", "mode": "hard"}),
    ("query-named-block-nodes", {"flat": True}),
]


@pytest.mark.parametrize(("command", "args"), VALID)
def test_valid_arguments_pass_unchanged(command: str, args: dict[str, Any]) -> None:
    schema = load_schema()
    assert schema.check_command_args(command, args) == args
    # the JSON Schema agrees with the walk
    assert schema.validator(schema.command(command).arg_type).is_valid(args)


@pytest.mark.parametrize(("command", "args", "desc"), QMP_ERRORS)
def test_json_schema_rejects_what_qemu_rejects(command: str, args: Any, desc: str) -> None:
    schema = load_schema()
    assert not schema.validator(schema.command(command).arg_type).is_valid(args or {})


def test_none_means_no_arguments() -> None:
    assert load_schema().check_command_args("query-block-exports", None) == {}


def test_io_uring_alias_is_normalised() -> None:
    args = {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/m", "io-uring": True}
    checked = load_schema().check_command_args("block-export-add", args)
    assert checked["io_uring"] is True
    assert "io-uring" not in checked
    assert "io-uring" in args  # the caller's dict is left alone


def test_io_uring_alias_and_name_together_are_refused() -> None:
    args = {
        "type": "fuse",
        "id": "e",
        "node-name": "n",
        "mountpoint": "/m",
        "io-uring": True,
        "io_uring": False,
    }
    with pytest.raises(QMPError, match="aliases of each other"):
        load_schema().check_command_args("block-export-add", args)


def test_io_uring_alias_type_error_names_the_member() -> None:
    args = {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/m", "io-uring": "on"}
    with pytest.raises(QMPError) as err:
        load_schema().check_command_args("block-export-add", args)
    assert err.value.desc == "Invalid parameter type for 'io_uring', expected: boolean"


def test_nested_union_errors_come_in_visit_order() -> None:
    # the inline child is visited (and rejected) before the parent's later members
    args = {
        "driver": "raw",
        "node-name": "r",
        "file": {"driver": "file", "filename": "/x", "foo": 1},
        "size": "big",
    }
    with pytest.raises(QMPError) as err:
        load_schema().check_command_args("blockdev-add", args)
    assert err.value.desc == "Parameter 'file.foo' is unexpected"


def test_missing_member_is_reported_before_unexpected_ones() -> None:
    args = {"type": "fuse", "id": "e", "node-name": "n", "zzz": 1}
    with pytest.raises(QMPError) as err:
        load_schema().check_command_args("block-export-add", args)
    assert err.value.desc == "Parameter 'mountpoint' is missing"


def test_integer_widths_are_checked() -> None:
    schema = load_schema()
    with pytest.raises(QMPError, match="expects uint8_t"):
        schema.check_type_value("uint8", 300)
    assert schema.check_type_value("uint8", 255) == 255
