"""QMP output bytes as QEMU 11.1 writes them (compact and ``pretty=on``)."""

from __future__ import annotations

from qsd_py.qmp.jsonout import dumps, quote

VERSION = {
    "return": {"qemu": {"micro": 3, "minor": 1, "major": 11}, "package": "P"},
    "id": [1, {"a": []}, {}],
}


def test_compact() -> None:
    assert dumps(VERSION) == (
        b'{"return": {"qemu": {"micro": 3, "minor": 1, "major": 11}, "package": "P"}, '
        b'"id": [1, {"a": []}, {}]}\r\n'
    )
    assert dumps({"return": {}}) == b'{"return": {}}\r\n'


def test_pretty_like_qemu() -> None:
    # read from QEMU 11.1 with --monitor chardev=m,pretty=on
    assert dumps(VERSION, pretty=True) == (
        b'{\r\n    "return": {\r\n        "qemu": {\r\n            "micro": 3,\r\n'
        b'            "minor": 1,\r\n            "major": 11\r\n        },\r\n'
        b'        "package": "P"\r\n    },\r\n    "id": [\r\n        1,\r\n        {\r\n'
        b'            "a": [\r\n            ]\r\n        },\r\n        {\r\n        }\r\n'
        b"    ]\r\n}\r\n"
    )
    assert dumps({"return": {}}, pretty=True) == b'{\r\n    "return": {\r\n    }\r\n}\r\n'


def test_numbers_like_qemu() -> None:
    values = [1.5, 0.1, 1e5, -0.0, 1e300, float("inf"), 2.5e-7, 100.0, 18446744073709551615]
    assert dumps(values) == (
        b"[1.5, 0.10000000000000001, 100000, -0, 1.0000000000000001e+300, inf, "
        b"2.4999999999999999e-07, 100, 18446744073709551615]\r\n"
    )


def test_string_escapes_like_qemu() -> None:
    assert quote('a/b"\\\t\n\b\f\r\x7f') == '"a/b\\"\\\\\\t\\n\\b\\f\\r\\u007F"'
    assert quote("\u00e9\x01\U0001f600") == '"\\u00E9\\u0001\\uD83D\\uDE00"'
    assert quote("\\u00e9 is literal") == '"\\\\u00e9 is literal"'  # not an escape to upcase
