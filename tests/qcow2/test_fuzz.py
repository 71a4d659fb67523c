"""The driver against randomly damaged images (fuzz.py): a few seconds here; longer runs with
``QSD_QCOW2_FUZZ_SECONDS`` (and ``QSD_QCOW2_FUZZ_SEED``) or ``scripts/qcow2-fuzz``."""

from __future__ import annotations

import os
from pathlib import Path

import fuzz


async def test_damaged_images_fail_cleanly_and_write_only_where_they_may(tmp_path: Path) -> None:
    seconds = float(os.environ.get("QSD_QCOW2_FUZZ_SECONDS", "12"))
    seed = int(os.environ.get("QSD_QCOW2_FUZZ_SEED", "20250101"))
    report = await fuzz.run(seconds, seed, tmp_path)
    assert report.images >= 10
    assert not report.failures, "\n\n".join(report.failures)
