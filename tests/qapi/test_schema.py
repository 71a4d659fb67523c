"""The schema files, their parser and model, the derived JSON Schema and introspection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsd_py.errors import QMPError
from qsd_py.qapi.jsonschema import type_schema
from qsd_py.qapi.model import QAPISemError, build_model
from qsd_py.qapi.parser import QAPIParseError, parse_schema
from qsd_py.qapi.schema import load_schema

COMMANDS = {
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-qmp-schema",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "block_resize",
    "transaction",
    "query-block",
    "query-blockstats",
    "block-set-write-threshold",
    "x-debug-query-block-graph",
    "x-blockdev-change",
    "x-blockdev-set-iothread",
    "object-add",
    "object-del",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "nbd-server-remove",
    "x-query-fuse-queues",  # qsd-py extension (issue 4: per-queue FUSE counters)
    "chardev-add",
    "chardev-change",
    "chardev-remove",
    "chardev-send-break",
    "query-chardev",
    "query-chardev-backends",
    "ringbuf-read",
    "ringbuf-write",
    "qom-list",
    "qom-get",
    "qom-set",
    "qom-list-get",
    "qom-list-properties",
    "qom-list-types",
    "query-jobs",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-dismiss",
    "job-finalize",
    "query-block-jobs",
    "block-job-set-speed",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-dismiss",
    "block-job-finalize",
    "block-job-change",
    "blockdev-create",
    "blockdev-backup",
    "drive-backup",
    "blockdev-mirror",
    "drive-mirror",
    "block-stream",
    "block-commit",
    "change-backing-file",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "blockdev-reopen",
    "blockdev-set-active",
    "x-blockdev-amend",
}


EVENTS = {
    "SHUTDOWN",
    "BLOCK_EXPORT_DELETED",
    "BLOCK_IMAGE_CORRUPTED",
    "BLOCK_WRITE_THRESHOLD",
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_PENDING",
}


def test_exactly_the_supported_commands() -> None:
    schema = load_schema()
    assert set(schema.command_names()) == COMMANDS
    assert all(schema.has_command(c) for c in COMMANDS)
    assert not schema.has_command("human-monitor-command")
    assert set(schema.event_names()) == EVENTS


def test_load_is_cached() -> None:
    """Loaded once per process (start-up time is measured by scripts/startup-time, not here)."""
    load_schema.cache_clear()
    schema = load_schema()
    assert load_schema() is schema


def test_introspection_lists_every_command_and_event() -> None:
    info = load_schema().introspect()
    commands = {e["name"]: e for e in info if e["meta-type"] == "command"}
    assert set(commands) == COMMANDS
    events = {e["name"] for e in info if e["meta-type"] == "event"}
    assert events == EVENTS
    names = {e["name"] for e in info}
    for entry in info:  # every type named anywhere is described
        for key in ("arg-type", "ret-type", "element-type"):
            if key in entry:
                assert entry[key] in names
        for m in entry.get("members", []):
            if "type" in m:
                assert m["type"] in names
        for v in entry.get("variants", []):
            assert v["type"] in names


def test_introspection_masks_type_names_like_qemu() -> None:
    info = load_schema().introspect()
    by_name = {e["name"]: e for e in info}
    for entry in info:
        if entry["meta-type"] in ("enum", "object", "alternate"):
            assert entry["name"].isdigit()
    assert by_name["int"] == {"name": "int", "meta-type": "builtin", "json-type": "int"}
    assert "ChardevOptions" not in by_name and "MonitorOptions" not in by_name
    add = by_name[by_name["block-export-add"]["arg-type"]]
    assert add["tag"] == "type"
    members = {m["name"]: m for m in add["members"]}
    assert "default" in members["iothread"] and "default" not in members["id"]
    alternate = by_name[members["iothread"]["type"]]
    assert alternate["meta-type"] == "alternate"
    assert [m["type"] for m in alternate["members"]] == ["str", "[str]"]
    variants = {v["case"]: v["type"] for v in add["variants"]}
    assert list(variants) == ["nbd", "fuse"]  # BlockExportType's order, as QEMU's
    fuse = by_name[variants["fuse"]]
    assert [m["name"] for m in fuse["members"]] == [
        "mountpoint",
        "growable",
        "allow-other",
        "io_uring",
        "queue-depth",
    ]
    # commands without arguments or result use the one empty object
    quit_cmd = by_name["quit"]
    assert by_name[quit_cmd["arg-type"]] == {
        "name": quit_cmd["arg-type"],
        "meta-type": "object",
        "members": [],
    }


def test_introspection_answer_validates_against_schema_info() -> None:
    schema = load_schema()
    schema.check_type_value("SchemaInfoList", schema.introspect())


def test_json_schema_of_a_union() -> None:
    doc = load_schema().json_schema("blockdev-add")
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    options = doc["$defs"]["BlockdevOptions"]
    assert options["unevaluatedProperties"] is False
    assert {c["if"]["properties"]["driver"]["const"] for c in options["allOf"]} == {
        "blkdebug",
        "copy-before-write",
        "copy-on-read",
        "file",
        "host_device",
        "luks",
        "nbd",
        "null-co",
        "qcow2",
        "raw",
        "rbd",
        "snapshot-access",
        "throttle",
    }
    assert doc["$defs"]["BlockdevRef"] == {
        "anyOf": [{"$ref": "#/$defs/BlockdevOptions"}, {"type": "string"}]
    }


def test_json_schema_rejects_a_member_of_another_variant() -> None:
    from jsonschema import Draft202012Validator

    schema = load_schema()
    v = Draft202012Validator(type_schema(schema.command("blockdev-add").arg_type))
    assert v.is_valid({"driver": "file", "filename": "/x"})
    assert not v.is_valid({"driver": "null-co", "filename": "/x"})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{ 'enum': 'E', 'data': [ 'a' ] }\n{ 'struct': 'S' 'data': {} }", "s.json:2:17: expected"),
        ("{ 'enum': 'E',\n  'data': [ 'a ] }", "s.json:2:13: missing terminating"),
        ("{ 'enum': 'E', 'data': [ 1 ] }", "s.json:1:26: stray '1'"),
        ("{ 'enum': 'E', 'enum': 'F' }", "s.json:1:16: duplicate key 'enum'"),
    ],
)
def test_parse_errors_name_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(QAPIParseError) as err:
        parse_schema(_write(tmp_path, text))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\n{ 'struct': 'S', 'data': { 'a': 'Nope' } }", ":2: member 'a' of 'S' uses unknown type"),
        ("{ 'struct': 'S', 'data': {} }\n{ 'struct': 'S', 'data': {} }", ":2: type 'S' is already"),
        (
            "{ 'alternate': 'A', 'data': { 'x': 'int', 'y': 'number' } }",
            ":1: alternate 'A' has ambiguous branches",
        ),
        (
            "{ 'enum': 'E', 'data': ['a'] }\n{ 'struct': 'B', 'data': {} }\n"
            "{ 'union': 'U', 'base': { 'k': 'E' }, 'discriminator': 'k', 'data': { 'b': 'B' } }",
            ":3: branch 'b' is not a value of E",
        ),
        (
            "{ 'struct': 'S', 'data': { 'a': 'int' }, 'aliases': { 'b': 'c' } }",
            ":1: alias 'b' must name a member",
        ),
        ("{ 'struct': 'S', 'data': {}, 'bogus': true }", ":1: struct has unknown key 'bogus'"),
    ],
)
def test_model_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(QAPISemError) as err:
        build_model(parse_schema(_write(tmp_path, text)))
    assert message in str(err.value)


def test_include_reads_each_file_once(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{ 'include': 'b.json' }\n{ 'enum': 'A', 'data': ['x'] }")
    (tmp_path / "b.json").write_text("# comment\n{ 'enum': 'B', 'data': ['y'] }")
    top = _write(tmp_path, "{ 'include': 'a.json' }\n{ 'include': 'b.json' }")
    model = build_model(parse_schema(top))
    assert "A" in model.types and "B" in model.types


# query-named-block-nodes answers recorded from QEMU 11.1's daemon (a backing chain, internal
# snapshots, persistent bitmaps): the schema must describe every member QEMU sends.
QEMU_NODE_INFO = json.loads((Path(__file__).parent / "qemu_node_info.json").read_text())


def test_qemu_node_info_fits_the_schema() -> None:
    schema = load_schema()
    top = QEMU_NODE_INFO["chain-top"]
    assert schema.check_type_value("BlockDeviceInfo", top) == top
    base = top["image"]["backing-image"]["backing-image"]
    assert base["filename"].endswith("base.qcow2")
    assert schema.check_type_value("ImageInfo", base) == base
    image = QEMU_NODE_INFO["snapshot-image"]
    assert schema.check_type_value("ImageInfo", image) == image


def test_node_info_without_format_specific_type_is_refused() -> None:
    image = dict(QEMU_NODE_INFO["snapshot-image"], **{"format-specific": {"data": {}}})
    with pytest.raises(QMPError, match="'format-specific.type' is missing"):
        load_schema().check_type_value("ImageInfo", image)


def test_enum_value_features_are_introspected() -> None:
    """QEMU lists a value's features in the enum's members: ``memory`` is deprecated."""
    info = {e["name"]: e for e in load_schema().introspect()}
    add = info[info["chardev-add"]["arg-type"]]
    backend = info[next(m["type"] for m in add["members"] if m["name"] == "backend")]
    kinds = info[backend["members"][0]["type"]]
    assert kinds["members"][-1] == {"name": "memory", "features": ["deprecated"]}
    assert kinds["members"][0] == {"name": "file"}
    assert kinds["values"][-1] == "memory"
