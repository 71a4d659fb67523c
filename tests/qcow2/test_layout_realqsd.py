"""The recorded images of data/qemu-11.1-layout.json are still what QEMU 11.1 makes, and
qsd-py makes the same (optional: needs --real-qsd). Runs every sequence of
``layout.SEQUENCES`` through QEMU's qemu-io (real-qsd) and through qsd-py on copies of one
starting image under /tmp/qsd-cmp, and compares the files."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import layout
import pytest
from realqsd_support import require_real_qsd

pytestmark = pytest.mark.realqsd


@pytest.fixture
def workdir() -> Iterator[Path]:
    layout.SHARE.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="layout-", dir=layout.SHARE))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("seq", layout.SEQUENCES, ids=lambda s: s.name)
def test_qemu_and_qsd_write_the_same_bytes(workdir: Path, seq: layout.Sequence) -> None:
    qemu, ours = layout.run_both(seq, workdir, require_real_qsd())
    theirs = layout.outputs(seq, qemu)
    record = layout.load()["sequences"][seq.name]
    assert layout.digest(workdir / "start" / layout.IMAGE) == record["start"]
    assert layout.recorded_outputs(seq, record) == theirs, "the record is out of date"
    assert layout.difference(layout.outputs(seq, ours), theirs) is None
