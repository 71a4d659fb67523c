"""qsd-py's sector ciphers against QEMU 11.1's own ciphertext (data/cipher_vectors.json, from
cipher_vectors.py): for every cipher qsd-py serves, the bytes QEMU wrote at a payload sector
decrypt to the plaintext it was given and the plaintext encrypts to them; and a LUKS image
qsd-py makes with each of them (small iteration counts) opens with its passphrase and reads
back what was written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qsd_py.block.crypto import luks
from qsd_py.block.crypto.cipher import CipherError, SectorCipher, check_spec, parse_spec

VECTORS = json.loads((Path(__file__).parent / "data" / "cipher_vectors.json").read_text())


@pytest.mark.parametrize("v", VECTORS, ids=[v["opts"] for v in VECTORS])
def test_sector_ciphers_as_qemu(v: dict[str, str]) -> None:
    mode, ivgen, ivhash = parse_spec(v["mode"])
    cipher = SectorCipher(v["cipher"], mode, ivgen, ivhash, bytes.fromhex(v["key"]))
    data, plain = bytes.fromhex(v["cipher-text"]), bytes.fromhex(v["plain"])
    assert cipher.decrypt(data, 3) == plain
    assert cipher.encrypt(plain, 3) == data
    if mode != "ecb":
        assert cipher.decrypt(data, 4) != plain  # the sector number is in the IV


@pytest.mark.parametrize("v", VECTORS, ids=[v["opts"] for v in VECTORS])
def test_headers_made_with_each_cipher_unlock(v: dict[str, str]) -> None:
    """qsd-py's own header for the cipher (1000 iterations: the floor) unlocks and its
    payload cipher round-trips a sector."""
    key_bytes = len(v["key"]) // 2
    hash_name = dict(o.split("=") for o in v["opts"].split(",")).get("hash-alg", "sha256")
    header, payload = luks.build_image_header(
        b"pw", v["cipher"], v["mode"], hash_name, key_bytes, 0, os.urandom, "u"
    )
    h = luks.parse_header(header)
    assert payload == h.payload_bytes and h.slots[0].iterations == luks.MIN_ITERS
    master = luks.unlock(h, b"pw", lambda off, n: header[off : off + n])
    cipher = luks.payload_cipher(h, master)
    sector = os.urandom(512)
    assert cipher.decrypt(cipher.encrypt(sector, 9), 9) == sector
    with pytest.raises(luks.LuksError, match="Invalid password"):
        luks.unlock(h, b"wrong", lambda off, n: header[off : off + n])


@pytest.mark.parametrize(
    "spec, text",
    [
        (("serpent", "xts", "plain64", 64), "Unsupported cipher algorithm serpent-256"),
        (("twofish", "cbc", "plain64", 16), "Unsupported cipher algorithm twofish-128"),
        (("sm4", "xts", "plain64", 32), "Unsupported cipher mode xts"),
        (("cast5", "xts", "plain64", 32), "Unsupported cipher mode xts"),
        (("des", "cbc", "plain64", 8), "Algorithm 'des' with key size 8 bytes not supported"),
        (("aes", "gcm", "plain64", 32), "Cipher mode 'gcm' not supported"),
    ],
)
def test_refused_ciphers(spec: tuple[str, str, str, int], text: str) -> None:
    with pytest.raises(CipherError) as err:
        check_spec(*spec)
    assert str(err.value) == text
