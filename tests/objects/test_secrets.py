"""Secret objects (``secret``, ``secret_keyring``): what they hold once made, QEMU 11.1's
texts for every way to get one wrong (the conversation below was held with QEMU's daemon;
tests/objects/test_realqsd_secrets.py holds it again, opt-in), and the lookups of users."""

from __future__ import annotations

import base64
import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from support import Qsd

from qsd_py.errors import QMPError
from qsd_py.objects.registry import ObjectRegistry

KEY = bytes(range(32))
IV = bytes(range(100, 116))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt(plain: bytes, key: bytes = KEY, iv: bytes = IV) -> bytes:
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()


def conversation(sec_file: Path) -> list[tuple[dict[str, Any], str | None]]:
    """object-add arguments and QEMU 11.1's error text (None: it succeeds), in order; the
    same ids as the real conversation, so each case sees the objects made before it."""
    k32 = b64(b"0123456789abcdef0123456789abcdef")
    zero_iv = "AAAAAAAAAAAAAAAAAAAAAA=="

    def sec(obj_id: str, **props: Any) -> dict[str, Any]:
        return {"qom-type": "secret", "id": obj_id, **props}

    return [
        (sec("s0", data="letmein"), None),
        (sec("s0", data="x"),
         "attempt to add duplicate property 's0' to object (type 'container')"),
        (sec("s1", data="bad!", format="base64"), "Base64 data contains invalid characters"),
        (sec("s2"), "Either 'file' or 'data' must be provided"),
        (sec("s3", data="a", file=str(sec_file)), "'file' and 'data' are mutually exclusive"),
        (sec("s4", file="/nonexist"),
         "Unable to read /nonexist: Failed to open file \u201c/nonexist\u201d: "
         "No such file or directory"),
        (sec("s5", file=str(sec_file)), None),
        (sec("s6", data="YWJj", format="base64"), None),
        (sec("s7", data="abc", keyid="nokey"), "No secret with id 'nokey'"),
        (sec("s8", data="abc", keyid="s0"), "Key should be 32 bytes in length"),
        (sec("k32", data=k32, format="base64"), None),
        (sec("e1", data="abc", keyid="k32"), "IV is required to decrypt secret"),
        (sec("e2", data="abc", keyid="k32", iv="AAAA"), "IV should be 16 bytes in length not 3"),
        (sec("e3", data="abc", keyid="k32", iv=zero_iv),
         "Length 3 must be a multiple of block size 16"),
        (sec("e4", data="0123456789abcdef", keyid="k32", iv=zero_iv),
         "Incorrect number of padding bytes (28) found on decrypted data"),
        (sec("e5", data="!!", format="base64", keyid="k32", iv=zero_iv),
         "Base64 data contains invalid characters"),
        (sec("e6", data="7u5x0c4F1wz6yM1bF0xWkw==", format="base64", keyid="k32", iv=zero_iv),
         "Incorrect number of padding bytes (174) found on decrypted data"),
        (sec("e7", data="abc", keyid="io0", iv=zero_iv), "Object with id 'io0' is not a secret"),
        ({"qom-type": "secret_keyring", "id": "k1", "serial": 1},
         "Unable to read serial key 00000001: Required key not available"),
        (sec("s10", data="abc", iv=zero_iv), None),
    ]  # fmt: skip


def test_object_add_answers_as_qemu(qsd: Callable[..., Qsd], tmp_path: Path) -> None:
    sec_file = tmp_path / "sec.txt"
    sec_file.write_bytes(b"filesecret")
    client = qsd("--object", "iothread,id=io0").qmp()
    try:
        for args, text in conversation(sec_file):
            reply = client.cmd_raw("object-add", args)
            if text is None:
                assert reply == {"return": {}}, args
            else:
                assert reply["error"] == {"class": "GenericError", "desc": text}, args
        assert client.cmd_raw("object-del", {"id": "s0"}) == {"return": {}}
        gone = client.cmd_raw("object-del", {"id": "s0"})
        assert gone["error"]["desc"] == "object 's0' not found"
    finally:
        client.close()


@pytest.fixture
def objects() -> Any:
    registry = ObjectRegistry()
    yield registry
    registry.stop_all()


def test_what_a_secret_holds(objects: ObjectRegistry, tmp_path: Path) -> None:
    """Clear text, base64, a file (bytes as they are, newline and all), and ciphertext
    decrypted with another secret as the key, given raw or in base64."""
    (tmp_path / "f").write_bytes(b"from a file\n\xff")
    objects.add({"qom-type": "secret", "id": "key", "data": b64(KEY), "format": "base64"})
    plain = "pässword"
    cipher = encrypt(plain.encode())
    cases = {
        "clear": ({"data": plain}, plain.encode()),
        "b64": ({"data": b64(b"\x00\x01bin"), "format": "base64"}, b"\x00\x01bin"),
        "file": ({"file": str(tmp_path / "f")}, b"from a file\n\xff"),
        "enc": ({"data": b64(cipher), "format": "base64", "keyid": "key", "iv": b64(IV)},
                plain.encode()),
        "enc-empty": ({"data": b64(encrypt(b"")), "format": "base64", "keyid": "key",
                       "iv": b64(IV)}, b""),
    }  # fmt: skip
    for obj_id, (props, want) in cases.items():
        objects.add({"qom-type": "secret", "id": obj_id, **props})
        assert objects.secret(obj_id).data == want, obj_id
    assert objects.secret("clear").as_utf8() == plain
    assert objects.secret("b64").as_base64() == b64(b"\x00\x01bin")
    with pytest.raises(QMPError, match="^Data from secret file is not valid UTF-8$"):
        objects.secret("file").as_utf8()


def test_a_wrong_key_is_caught_by_the_padding_check(objects: ObjectRegistry) -> None:
    """Decrypting with another key gives garbage whose last byte is almost never a valid
    padding length: QEMU's only check, and ours."""
    objects.add({"qom-type": "secret", "id": "other", "data": b64(bytes(32)), "format": "base64"})
    refused = 0
    for n in range(50):
        data = b64(encrypt(os.urandom(n)))
        props = {"data": data, "format": "base64", "keyid": "other", "iv": b64(IV)}
        try:
            objects.add({"qom-type": "secret", "id": f"x{n}", **props})
        except QMPError as err:
            assert err.desc.startswith("Incorrect number of padding bytes (")
            refused += 1
    assert refused >= 40


def test_secret_from_the_kernel_keyring(objects: ObjectRegistry) -> None:
    """``secret_keyring`` reads a key this process put into its own keyring."""
    libc = ctypes.CDLL(None, use_errno=True)
    payload = b"kernel-held secret"
    key_spec_process_keyring = -2
    serial = libc.syscall(248, b"user", b"qsd-py-test", payload, len(payload),
                          ctypes.c_int32(key_spec_process_keyring))  # fmt: skip
    assert serial > 0, os.strerror(ctypes.get_errno())
    objects.add({"qom-type": "secret_keyring", "id": "kr", "serial": serial})
    assert objects.secret("kr").data == payload


def test_lookups_by_users(objects: ObjectRegistry) -> None:
    objects.add({"qom-type": "iothread", "id": "io0"})
    with pytest.raises(QMPError, match="^No secret with id 'nope'$"):
        objects.secret("nope")
    with pytest.raises(QMPError, match="^Object with id 'io0' is not a secret$"):
        objects.secret("io0")
