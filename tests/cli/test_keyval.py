"""Edge cases of QEMU's keyval and QemuOpts syntaxes (behaviour checked on QEMU 11.1)."""

from __future__ import annotations

from typing import Any

import pytest

from qsd_py.cli.keyval import parse_keyval, parse_qemu_opts
from qsd_py.errors import QMPError


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("", {}),
        ("null-co", {"driver": "null-co"}),
        ("null-co,", {"driver": "null-co"}),
        ("a=1,a=2", {"a": "2"}),  # the last one wins
        ("a=x,,y,,", {"a": "x,y,"}),
        ("a=,b=", {"a": "", "b": ""}),
        ("a=b=c", {"a": "b=c"}),
        ("file.driver=file,file.filename=x", {"file": {"driver": "file", "filename": "x"}}),
        ("l.1=b,l.0=a", {"l": ["a", "b"]}),
        ("l.0.x=1,l.0.y=2", {"l": [{"x": "1", "y": "2"}]}),
        ("a.b.c=1", {"a": {"b": {"c": "1"}}}),
        ("x,y=1", {"driver": "x", "y": "1"}),
    ],
)
def test_keyval_trees(text: str, tree: dict[str, Any]) -> None:
    assert parse_keyval(text, "driver").tree == tree


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a", "Expected '=' after parameter 'a'"),
        ("x=1,,y,b", "Expected '=' after parameter 'b'"),
        ("=1", "Invalid parameter ''"),
        (",a=1", "Invalid parameter ''"),
        ("a..b=1", "Invalid parameter 'a..b'"),
        ("0=1", "Invalid parameter '0'"),
        ("x.0x=1", "Invalid parameter 'x.0x'"),
        ("_a=1", "Invalid parameter '_a'"),
        ("a" * 128 + "=1", f"Parameter '{'a' * 128}' is too long"),
        ("x." + "a" * 128 + "=1", f"Parameter fragment '{'a' * 128}' is too long"),
        ("a.b=1,a=2", "Parameters 'a.*' used inconsistently"),
        ("a=2,a.b=1", "Parameters 'a.*' used inconsistently"),
        ("a.0=1,a.b=2", "Parameters 'a.*' used inconsistently"),
        ("a.0=1,a.2=2", "Parameter 'a.1' missing"),
        ("a.x.1=1", "Parameter 'a.x.0' missing"),
    ],
)
def test_keyval_errors(text: str, error: str) -> None:
    with pytest.raises(QMPError) as err:
        parse_keyval(text)
    assert err.value.desc == error


def test_keyval_key_length_limit() -> None:
    assert parse_keyval("a" * 127 + "=1").tree == {"a" * 127: "1"}


def test_implied_value_cannot_contain_a_comma() -> None:
    with pytest.raises(QMPError, match="Invalid parameter ''"):
        parse_keyval("null-co,,x,node-name=a", "driver")


@pytest.mark.parametrize("text", ["help", "?", "iothread,help", "a=1,?"])
def test_keyval_help(text: str) -> None:
    assert parse_keyval(text, "qom-type").help


def test_qemu_opts_is_flat_with_short_booleans() -> None:
    parsed = parse_qemu_opts("socket,id=c,a.b=1,server,nowait,path=x,,y", "backend")
    assert parsed.tree == {
        "backend": "socket",
        "id": "c",
        "a.b": "1",
        "server": "on",
        "wait": "off",
        "path": "x,y",
    }
    assert parse_qemu_opts("help", "backend").help
