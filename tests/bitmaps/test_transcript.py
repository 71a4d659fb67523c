"""The dirty bitmap conversation (bitmap_script.py) held with qsd-py gives QEMU 11.1's
transcript, recorded in data/bitmaps.json; with --real-qsd, live against QEMU's daemon too,
and each daemon reads back the bitmaps the other stored (same sha256)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitmap_script
import pytest


def test_transcript_is_qemus(tmp_path: Path) -> None:
    want = json.loads(bitmap_script.DATA.read_text())
    got = bitmap_script.run_script(False, tmp_path)
    for step, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert mine == theirs, step


@pytest.mark.realqsd
def test_transcript_live_against_qemu() -> None:
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("bitmaps-live") as work:
        real = bitmap_script.run_script(True, work)
        shutil.copyfile(work / "i.qcow2", work / "stored-by-qemu.qcow2")
        mine = bitmap_script.run_script(False, work)
        assert mine == real
        # Each daemon opens the image the other stored: the same bits.
        shutil.copyfile(work / "i.qcow2", work / "stored-by-qsd.qcow2")
        hashes = {}
        for real_daemon, image in ((True, "stored-by-qsd"), (False, "stored-by-qemu")):
            hashes[real_daemon] = bitmap_script.hashes(real_daemon, work, image)
        assert hashes[True] == hashes[False]
        assert len(hashes[True]) == 3
