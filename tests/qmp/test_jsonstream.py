"""The streaming JSON parser against what QEMU 11.1 answers for the same bytes.

Every expected error below was read from QEMU 11.1.3's qemu-storage-daemon, each input sent
on a fresh connection right after ``{"execute":"qmp_capabilities"}`` (30 bytes, hence the
columns from 31).  A value in the expectations stands for "parsed as this value".
"""

from __future__ import annotations

import time

import pytest

from qsd_py.qmp.jsonstream import JSONError, JSONStream, decode_string

PREFIX = b'{"execute":"qmp_capabilities"}'
Q = {"q": 1}


def E(text: str) -> JSONError:  # noqa: N802 - reads like the expectation it builds
    return JSONError(text)


def P(where: str, what: str) -> JSONError:  # noqa: N802
    return JSONError(f"{where}: JSON parse error, {what}")


CASES: list[tuple[bytes, list[object]]] = [
    # syntax errors, and what survives them
    (b"}", [P("1:31", "expecting value")]),
    (b"]]]" + b'{"q":1}', [P("1:31", "expecting value"), P("1:32", "expecting value"),
                           P("1:33", "expecting value"), Q]),
    (b'garbage{"q":1}', [P("1:31", "invalid keyword 'garbage'"), Q]),
    (b'garbage\n{"q":1}', [P("1:31", "invalid keyword 'garbage'"), Q]),
    (b'{"a" 1}{"q":1}', [P("1:36", "expecting ':'"), Q]),
    (b'{"a" 1, "b": {"c": 2}} {"q":1}', [P("1:36", "expecting ':'"), Q]),
    (b'{"a" 1 {"q":1}', [P("1:36", "expecting ':'")]),  # the broken value swallows it
    (b"\n\n  }", [P("3:3", "expecting value")]),
    (b'{"q":1}\n }', [Q, P("2:2", "expecting value")]),
    (b"[1,]", [P("1:34", "expecting value")]),
    (b'{"a":1,}', [P("1:38", "expecting key")]),
    (b"{1:2}", [P("1:32", "expecting key")]),
    (b"[1 2]", [P("1:34", "expected ',' or ']'")]),
    (b'{"a":1 2}', [P("1:38", "expected ',' or '}'")]),
    (b'{"a":1,"a":2} {"q":1}', [P("1:42", "duplicate key"), Q]),
    (b'{"a":1,"a":{}} ]', [P("1:43", "duplicate key"), P("1:46", "expecting value")]),
    (b'{"a":1,"a":{"b":[1]}} ]', [P("1:50", "duplicate key"), P("1:53", "expecting value")]),
    (b'{"a" 1 ]} {"q":1}', [P("1:36", "expecting ':'"), P("1:39", "expecting value"), Q]),
    (b'{"a" 1 ]]} {"q":1}', [P("1:36", "expecting ':'"), P("1:39", "expecting value"),
                             P("1:40", "expecting value"), Q]),
    (b'{"a" [1 } ] } {"q":1}', [P("1:36", "expecting ':'"), P("1:43", "expecting value"), Q]),
    (b"[1,{\"a\" 2}, 3] ]", [P("1:39", "expecting ':'"), P("1:46", "expecting value")]),
    (b'{"execute": garbage, "id": 5} {"q":1}', [P("1:43", "invalid keyword 'garbage'"), Q]),
    (b'["a" 1 ] {"q":1}', [P("1:36", "expected ',' or ']'"), Q]),
    (b"[0e5]", [P("1:33", "expected ',' or ']'")]),
    # lexical errors: recovery skips to a structural or control character
    (b'@{"q":1}', [P("1:31", "stray '@'"), Q]),
    (b'@ 1 {"q":1}', [P("1:31", "stray '@'"), Q]),
    (b'@abc {"q":1}', [P("1:31", "stray '@'"), Q]),
    (b'@@@{"q":1}', [P("1:31", "stray '@'"), Q]),
    (b'@]{"q":1}', [P("1:31", "stray '@'"), P("1:33", "expecting value"), Q]),
    (b"@ ]]", [P("1:31", "stray '@'"), P("1:34", "expecting value"), P("1:34", "expecting value")]),
    (b"@\n}", [P("1:31", "stray '@'"), P("2:1", "expecting value")]),
    (b"@\n }", [P("1:31", "stray '@'"), P("2:2", "expecting value")]),
    (b"@\t}", [P("1:31", "stray '@'"), P("1:34", "expecting value")]),
    (b"@ \x01}", [P("1:31", "stray '@'"), P("1:34", "stray '\x01'"), P("1:35", "expecting value")]),
    (b'{"a" @ } {"q":1}', [P("1:36", "stray '@'"), P("1:39", "expecting value"), Q]),
    (b'{"a" @ } ]', [P("1:36", "stray '@'"), P("1:39", "expecting value"),
                     P("1:40", "expecting value")]),
    (b'"abc\ndef" {"q":1}', [P("1:31", "stray '\"abc\n'"), Q]),
    (b'"abc\r" ]', [P("1:31", "stray '\"abc\r'"), P("1:39", "expecting value")]),
    (b"[tRue]", [P("1:32", "invalid keyword 't'"), P("1:37", "expecting value")]),
    (b"[True]", [P("1:32", "stray 'T'"), P("1:37", "expecting value")]),
    (b"[Infinity]", [P("1:32", "stray 'I'"), P("1:41", "expecting value")]),
    (b"[NaN]", [P("1:32", "stray 'N'"), P("1:36", "expecting value")]),
    (b"%d ]", [P("1:31", "stray '%'"), P("1:35", "expecting value")]),
    (b"\xfe]", [P("1:31", "stray '\ufffd'"), P("1:33", "expecting value")]),
    (b'\xff {"q":1}', [P("1:31", "stray '\ufffd'"), Q]),
    (b'\x00 {"q":1}', [P("1:31", "stray ''"), Q]),
    (b'-} {"q":1}', [P("1:31", "stray '-}'"), Q]),
    (b'1.} {"q":1}', [P("1:31", "stray '1.}'"), Q]),
    (b'01 {"q":1}', [P("1:31", "stray '01'"), Q]),
    (b"[-01]", [P("1:32", "stray '-01'"), P("1:36", "expecting value")]),
    (b"[1.5.]", [P("1:36", "stray '.'"), P("1:37", "expecting value")]),
    (b"[0E1, -0.5e1, 1E+2]", [P("1:34", "stray 'E'"), P("1:36", "expecting value"), -5.0,
                             P("1:44", "expecting value"), 100.0, P("1:50", "expecting value")]),
    (b"[1, @ 2, 3", [P("1:35", "stray '@'"), P("1:39", "expecting value")]),
    (b'"\xff"]', [P("1:31", "stray '\"\ufffd'"), P("1:35", "expecting value")]),
    (b'"\xfe" ]', [P("1:31", "stray '\"\ufffd'"), P("1:36", "expecting value")]),
    (b'"\\\x01" ]', [P("1:31", "stray '\"\\\x01'"), P("1:37", "expecting value")]),
    (b'"a\\x\xff" ]', [P("1:31", "stray '\"a\\x\ufffd'"), P("1:39", "expecting value")]),
    # lookahead: a token right after a number or keyword is one column further
    (b"1]", [1, P("1:33", "expecting value")]),
    (b"1 ]", [1, P("1:33", "expecting value")]),
    (b"tru]", [P("1:31", "invalid keyword 'tru'"), P("1:35", "expecting value")]),
    (b"tru\n]", [P("1:31", "invalid keyword 'tru'"), P("2:1", "expecting value")]),
    (b'[1"x" ]', [P("1:34", "expected ',' or ']'")]),
    (b'"a"]', ["a", P("1:34", "expecting value")]),
    # strings
    (b'"\\u12" ]', [P("1:31", '\\u12" is not a valid Unicode character'),
                   P("1:38", "expecting value")]),
    (b'"\\uZZZZ"]', [P("1:31", "\\uZZZZ is not a valid Unicode character"),
                    P("1:39", "expecting value")]),
    (b'"\\ud800"]', [P("1:31", "\\ud800 is not a valid Unicode character"),
                    P("1:39", "expecting value")]),
    (b'"\\ud83d\\u0041" ]', [P("1:31", "\\ud83d is not a valid Unicode character"),
                            P("1:46", "expecting value")]),
    (b'"\\ude00" ]', [P("1:31", "\\ude00 is not a valid Unicode character"),
                     P("1:40", "expecting value")]),
    (b'"\\uffff" ]', [P("1:31", "\\uffff is not a valid Unicode character"),
                     P("1:40", "expecting value")]),
    (b'"\\ufdd0" ]', [P("1:31", "\\ufdd0 is not a valid Unicode character"),
                     P("1:40", "expecting value")]),
    (b'"\\u00" ]', [P("1:31", '\\u00" is not a valid Unicode character'),
                   P("1:38", "expecting value")]),
    (b'{"a":"\\x"} {"q":1}', [P("1:36", "invalid escape sequence in string"), Q]),
    (b'"\\\xc3\xa9" ]', [P("1:31", "invalid escape sequence in string"),
                        P("1:37", "expecting value")]),
    (b'"\xc3(" ]', [P("1:31", "invalid UTF-8 sequence in string"), P("1:36", "expecting value")]),
    (b'"\xc3(\\x" ]', [P("1:31", "invalid UTF-8 sequence in string"),
                      P("1:38", "expecting value")]),
    (b'"\xed\xa0\x80"]', [P("1:31", "invalid UTF-8 sequence in string"),
                         P("1:36", "expecting value")]),
    (b'"\xef\xbf\xbf" ]', [P("1:31", "invalid UTF-8 sequence in string"),
                          P("1:37", "expecting value")]),
    (b'"\xf4\x90\x80\x80" ]', [P("1:31", "invalid UTF-8 sequence in string"),
                              P("1:38", "expecting value")]),
    (b'"\xc1\xbf" ]', [P("1:31", "invalid UTF-8 sequence in string"),
                      P("1:36", "expecting value")]),
    (b'"\xf8" ]', [P("1:31", "invalid UTF-8 sequence in string"), P("1:35", "expecting value")]),
    (b'"\xc0\x80"', ["\x00"]),  # QEMU's modified UTF-8
    (b'"\xf0\x9f\x98\x80"', ["\U0001f600"]),
    (b'"\x7f"', ["\x7f"]),
    (b'["\\u0000", "\\ud83d\\ude00", "\\u00e9", "\\\'", "\\/"]',
     [["\x00", "\U0001f600", "\u00e9", "'", "/"]]),
    (b"{'execute': 'query-version', 'id': 'sq'}", [{"execute": "query-version", "id": "sq"}]),
    (b"'a\"b'", ['a"b']),
    # numbers and keywords
    (b"[1e5, 1.5E-3, -0, 18446744073709551615, 18446744073709551616, "
     b"-9223372036854775809, 1e400, true, false, null]",
     [[100000.0, 0.0015, 0, 18446744073709551615, 18446744073709551616.0,
       -9223372036854775809.0, float("inf"), True, False, None]]),
]  # fmt: skip


def run(data: bytes, chunk: int | None = None) -> list[object]:
    stream = JSONStream()
    data = PREFIX + data
    out: list[object] = []
    step = chunk or len(data)
    for i in range(0, len(data), step):
        out += stream.feed(data[i : i + step])
    assert out[0] == {"execute": "qmp_capabilities"}
    return out[1:]


@pytest.mark.parametrize("data, expected", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_like_qemu(data: bytes, expected: list[object]) -> None:
    assert run(data) == expected


@pytest.mark.parametrize("data, expected", CASES[::3], ids=[repr(c[0])[:40] for c in CASES[::3]])
def test_byte_by_byte_is_the_same(data: bytes, expected: list[object]) -> None:
    assert run(data, chunk=1) == expected


def test_objects_without_separators_and_split_anywhere() -> None:
    data = b'{"execute":"a","id":1}{"execute":"b","arguments":{"x":[1,2.5,"\\u00e9"]}}'
    whole = JSONStream().feed(data)
    assert whole == [
        {"execute": "a", "id": 1},
        {"execute": "b", "arguments": {"x": [1, 2.5, "\u00e9"]}},
    ]
    for cut in range(1, len(data)):
        stream = JSONStream()
        assert stream.feed(data[:cut]) + stream.feed(data[cut:]) == whole


def test_number_waits_for_its_end() -> None:
    stream = JSONStream()
    assert stream.feed(b"12") == []
    assert stream.feed(b"34 ") == [1234]


def test_lines_counted_across_reads() -> None:
    stream = JSONStream()
    for _ in range(1000):
        assert stream.feed(b'{"a":1}\n') == [{"a": 1}]
    assert stream.feed(b"  }") == [P("1001:3", "expecting value")]


def test_nesting_limit() -> None:
    ok = b"[" * 1024 + b"]" * 1024
    assert len(run(ok)) == 1
    too_deep = b"[" * 1025 + b"]" * 1025 + b'{"q":1}'
    assert run(too_deep) == [E("JSON nesting depth limit exceeded"), Q]
    objects = b'{"a":' * 1025 + b"1" + b"}" * 1025 + b'{"q":1}'
    assert run(objects) == [E("JSON nesting depth limit exceeded"), Q]


def test_token_count_limit() -> None:
    under = b"[" + b"1," * ((2 << 20) // 2 - 2) + b"1]"
    assert len(run(under)[0]) == (2 << 20) // 2 - 1  # type: ignore[arg-type]
    over = b"[" + b"1," * (2 << 20) + b"1]" + b'{"q":1}'
    assert run(over, chunk=65536) == [E("JSON token count limit exceeded"), Q]


def test_token_size_limit_and_memory() -> None:
    two_halves = b'["' + b"A" * (33 << 20) + b'", "' + b"A" * (33 << 20) + b'"]{"q":1}'
    assert run(two_halves, chunk=1 << 20) == [E("JSON token size limit exceeded"), Q]
    stream = JSONStream()
    out = stream.feed(b'"')
    for _ in range(70):
        out += stream.feed(b"A" * (1 << 20))
        assert len(stream._buf) < (66 << 20)  # an endless string is dropped, not hoarded
    out += stream.feed(b'"{"q":1}')
    assert out == [E("JSON token size limit exceeded"), Q]


def test_ten_megabytes_is_fast() -> None:
    data = b'{"execute":"x","arguments":{"x":"' + b"A" * (10 << 20) + b'"},"id":9}'
    stream = JSONStream()
    start = time.perf_counter()
    out: list[object] = []
    for i in range(0, len(data), 65536):
        out += stream.feed(data[i : i + 65536])
    elapsed = time.perf_counter() - start
    assert out[0]["id"] == 9  # type: ignore[index]
    assert len(out[0]["arguments"]["x"]) == 10 << 20  # type: ignore[index]
    assert elapsed < 2.0, f"10 MiB took {elapsed:.2f}s"


def test_huge_number_does_not_crash() -> None:
    assert run(b"[" + b"1" * 100_000 + b"]") == [[float("inf")]]


def test_decode_string() -> None:
    assert decode_string(b'"\\t\\n\\"\\\\"') == '\t\n"\\'
    assert decode_string(b"'it\\'s'") == "it's"
    with pytest.raises(ValueError, match="invalid escape sequence in string"):
        decode_string(b'"\\q"')
