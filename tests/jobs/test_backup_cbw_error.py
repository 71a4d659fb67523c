"""A backup's ``on-cbw-error`` (cbw_error_script.py): guest writes whose copy before write
fails are failed (break-guest-write) or let through (break-snapshot), and the job fails
on its own copy of the range as QEMU 11.1's does, by blockdev-backup and by transaction."""

from __future__ import annotations

import json
from pathlib import Path

import cbw_error_script
import pytest


def test_transcript_is_qemus(tmp_path: Path) -> None:
    """Replies, events, the guest write's result and the target's bytes: QEMU 11.1's."""
    got = cbw_error_script.run_script(False, tmp_path)
    want = json.loads(cbw_error_script.DATA.read_text())
    assert [e for e in got if "io" in e] == [e for e in want if "io" in e]  # the first to read
    assert got == want


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("backup-cbw-error") as work:
        real = cbw_error_script.run_script(True, work)
        assert cbw_error_script.run_script(False, work) == real
