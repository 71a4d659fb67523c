"""blockdev-create's LUKS header against QEMU 11.1's qemu-img (optional: ``--real-qsd``):
the same image made by both, compared field by field apart from what is random or timed
(salts, master key digest, UUID, iteration counts), and the same sectors written before the
payload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from realqsd_support import require_real_qsd, shared_dir

from qsd_py.block.crypto import luks

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "jobs")]

pytestmark = pytest.mark.realqsd

SPECS: list[dict[str, Any]] = [
    {},
    {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv", "hash-alg": "sha1"},
    {"cipher-alg": "aes-128", "cipher-mode": "xts", "ivgen-alg": "plain"},
    {"cipher-alg": "aes-256", "cipher-mode": "ecb"},
    {"cipher-alg": "aes-256", "cipher-mode": "ctr", "hash-alg": "sha512"},
    {"cipher-alg": "cast5-128", "cipher-mode": "cbc", "ivgen-alg": "plain64"},
    {"cipher-alg": "sm4", "cipher-mode": "ecb"},
]


def _written_runs(data: bytes) -> list[tuple[int, int]]:
    """The runs of sectors that are not all zero, as (first offset, last offset)."""
    runs: list[tuple[int, int]] = []
    for off in range(0, len(data), 512):
        if any(data[off : off + 512]):
            if runs and runs[-1][1] == off - 512:
                runs[-1] = (runs[-1][0], off)
            else:
                runs.append((off, off))
    return runs


def _fields(h: luks.LuksHeader) -> dict[str, Any]:
    return {
        "cipher": (h.cipher_name, h.cipher_mode, h.hash_spec),
        "payload": h.payload_offset,
        "key_bytes": h.key_bytes,
        "slots": [(s.active, s.key_offset, s.stripes, s.iterations > 0) for s in h.slots],
        "free_salts": {s.salt for s in h.slots[1:]},
    }


def _qsd_py_create(workdir: Path, path: Path, spec: dict[str, Any]) -> None:
    from conversation import Daemon

    path.write_bytes(b"")
    d = Daemon(workdir, False, ["--object", "secret,id=s0,data=a", "--blockdev",
                                f"driver=file,node-name=f0,filename={path}"])  # fmt: skip
    try:
        options = {"driver": "luks", "file": "f0", "size": 1 << 20, "key-secret": "s0",
                   "iter-time": 10, **spec}  # fmt: skip
        d.cmd("blockdev-create", {"job-id": "c", "options": options})
        d.settle("c")
        (job,) = d.cmd("query-jobs")["return"]
        assert job.get("error") is None, job
    finally:
        d.close()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.values()) or "defaults")
def test_header_layout_as_qemu_img(spec: dict[str, Any]) -> None:
    with shared_dir("luks-layout") as share:
        real, ours = share / "real.luks", share / "py.luks"
        opts = ",".join(["key-secret=s0", "iter-time=10", *(f"{k}={v}" for k, v in spec.items())])
        subprocess.run(
            [str(require_real_qsd()), "run", "qemu-img", "create", "-q", "-f", "luks",
             "--object", "secret,id=s0,data=a", "-o", opts, str(real), "1M"], check=True,
        )  # fmt: skip
        _qsd_py_create(share, ours, spec)
        a, b = real.read_bytes(), ours.read_bytes()
        ha, hb = luks.parse_header(a), luks.parse_header(b)
        assert len(a) == len(b)
        assert _fields(ha) == _fields(hb)
        assert ha.mk_digest_iter >= luks.MIN_ITERS and hb.mk_digest_iter >= luks.MIN_ITERS
        assert a[luks.HEADER_SIZE : 4096] == b[luks.HEADER_SIZE : 4096]
        assert _written_runs(a[: ha.payload_bytes]) == _written_runs(b[: hb.payload_bytes])
