"""Known answers for every LUKS cipher qsd-py serves, taken from images QEMU 11.1's qemu-img
made (test_luks_ciphers.py checks qsd-py's sector ciphers against them in CI, where QEMU
is absent). ``python cipher_vectors.py`` records them into data/cipher_vectors.json (needs
real-qsd): for each qemu-img option set, the header's cipher, the master key (unlocked by
qsd-py), and 64 bytes of plaintext with what QEMU wrote for them at sector 3 of the payload.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "cipher_vectors.json"
SECTOR = 3


def record() -> list[dict[str, str]]:
    from realqsd_support import shared_dir
    from test_luks_ciphers_realqsd import SECRET, SERVED, _real

    from qsd_py.block.crypto import luks

    out = []
    with shared_dir("luks-vectors") as share:
        for opts in SERVED:
            path = share / "v.luks"
            path.unlink(missing_ok=True)
            _real("qemu-img", "create", "-q", "-f", "luks", "--object", SECRET, "-o",
                  f"key-secret=s0,iter-time=10,{opts}", str(path), "64k")  # fmt: skip
            plain = os.urandom(64)
            src = share / "p.raw"
            src.write_bytes(bytes(SECTOR * 512) + plain + bytes(65536 - SECTOR * 512 - 64))
            target = f"driver=luks,key-secret=s0,file.filename={path}"
            _real("qemu-img", "convert", "-n", "--object", SECRET, "-f", "raw", str(src),
                  "--target-image-opts", target)  # fmt: skip
            raw = path.read_bytes()
            h = luks.parse_header(raw)
            master = luks.unlock(h, b"pw", lambda off, n, raw=raw: raw[off : off + n])
            at = h.payload_bytes + SECTOR * 512
            out.append({"opts": opts, "cipher": h.cipher_name, "mode": h.cipher_mode,
                        "key": master.hex(), "plain": plain.hex(),
                        "cipher-text": raw[at : at + 64].hex()})  # fmt: skip
    return out


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    DATA.write_text(json.dumps(record(), indent=1) + "\n")
    print(f"wrote {DATA}")
