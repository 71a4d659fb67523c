"""The bitmap actions of ``transaction`` (txn_script.py) held with qsd-py give QEMU 11.1's
transcript, recorded in data/txn_bitmaps.json; with --real-qsd, live against QEMU's too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import txn_script


def test_transcript_is_qemus(tmp_path: Path) -> None:
    want = json.loads(txn_script.DATA.read_text())
    got = txn_script.run_script(False, tmp_path)
    for step, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert mine == theirs, step


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("txn-bitmaps-live") as work:
        assert txn_script.run_script(False, work) == txn_script.run_script(True, work)
