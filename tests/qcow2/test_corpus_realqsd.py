"""QEMU 11.1 still says what data/qemu-11.1-open.json records (optional: needs --real-qsd).

Regenerates every expectation with QEMU's qemu-storage-daemon and qemu-io (through
../shared/tools/real-qsd) and compares; ``scripts/qcow2-corpus-expectations`` rewrites the file.
"""

from __future__ import annotations

import expectations
import pytest
from realqsd_support import require_real_qsd

pytestmark = pytest.mark.realqsd


def test_qemu_agrees_with_the_recorded_expectations() -> None:
    require_real_qsd()
    fresh = expectations.gather_all()
    recorded = expectations.load()
    assert fresh["qemu"].startswith("11.1")
    differing = {
        did: (record, recorded["damages"].get(did))
        for did, record in fresh["damages"].items()
        if record != recorded["damages"].get(did)
    }
    assert differing == {}
    assert sorted(fresh["damages"]) == sorted(recorded["damages"])
