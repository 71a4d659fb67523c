"""Incremental backup (incremental_script.py) with qsd-py: each backup's chain equals the
source at its transaction, and the transcript (events, bitmap bits and counts after each
bitmap-mode, succeeding and failing) is QEMU 11.1's, recorded in
data/incremental_events.json; with --real-qsd, live against QEMU's daemon too."""

from __future__ import annotations

import json
from pathlib import Path

import incremental_script
import pytest


def _compares(transcript: list) -> list:
    return [e["result"] for e in transcript if e.get("tool", [""])[0] == "!compare"]


def test_chain_equals_source_and_transcript_is_qemus(tmp_path: Path) -> None:
    """The backups' part (SCRIPT) and the bitmap modes' part (MODES: each bitmap-mode
    after a failed and a succeeding backup, the bitmap's bits and count)."""
    got = incremental_script.run_script(False, tmp_path)
    assert _compares(got) == [[0, "Images are identical."]] * 3
    want = json.loads(incremental_script.DATA.read_text())
    for step, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert mine == theirs, step


@pytest.mark.realqsd
def test_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("incremental-live") as work:
        real = incremental_script.run_script(True, work)
        assert _compares(real) == [[0, "Images are identical."]] * 3
        mine = incremental_script.run_script(False, work)
        assert mine == real
