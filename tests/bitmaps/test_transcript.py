"""The dirty bitmap conversation (bitmap_script.py) held with qsd-py gives QEMU 11.1's
transcript, recorded in data/bitmaps.json; with --real-qsd, live against QEMU's daemon too,
and each daemon reads back the bitmaps the other stored (same sha256)."""

from __future__ import annotations

import json
import shutil
import subprocess
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
        # QEMU 11.1's qemu-img finds the same bitmaps and no error in both images.
        tool = str(require_real_qsd())
        seen = []
        for image in ("stored-by-qsd", "stored-by-qemu"):
            path = str(work / f"{image}.qcow2")
            check = subprocess.run([tool, "run", "qemu-img", "check", path],
                                   capture_output=True, text=True)  # fmt: skip
            assert check.returncode == 0, check.stdout + check.stderr
            info = subprocess.run([tool, "run", "qemu-img", "info", "--output=json", path],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            seen.append(json.loads(info.stdout)["format-specific"]["data"]["bitmaps"])
        assert seen[0] == seen[1]
