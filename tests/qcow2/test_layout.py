"""qsd-py's qcow2 images are QEMU 11.1's, byte for byte, after the same operations.

Each sequence of ``layout.SEQUENCES`` starts from an image made by the host's qemu-img and runs
its qemu-io commands on an in-process qcow2 node; the file must then equal what QEMU 11.1's
qemu-io made of the same image (recorded in data/qemu-11.1-layout.json by
``scripts/qcow2-layout --record``; test_layout_realqsd.py checks the record against QEMU).
A difference names the first structure that differs (header field, table entry, cluster).
"""

from __future__ import annotations

from pathlib import Path

import layout
import pytest

RECORDS = layout.load()


@pytest.mark.parametrize("seq", layout.SEQUENCES, ids=lambda s: s.name)
async def test_same_bytes_as_qemu(tmp_path: Path, seq: layout.Sequence) -> None:
    record = RECORDS["sequences"][seq.name]
    img = layout.prepare(seq, tmp_path)
    assert layout.digest(img) == record["start"], "the host's qemu-img made another image"
    await layout.run_qsd_async(seq, img)
    qemu = layout.recorded_outputs(seq, record)
    assert layout.difference(layout.outputs(seq, img), qemu) is None


def test_every_sequence_is_recorded() -> None:
    assert RECORDS["qemu"].startswith("11.1")
    assert sorted(RECORDS["sequences"]) == sorted(s.name for s in layout.SEQUENCES)


def test_a_difference_is_named() -> None:
    """The report names the structure at the first differing byte in both images."""
    record = RECORDS["sequences"]["fresh-sequential"]
    qemu = layout.recorded_image(record)
    ours = bytearray(qemu)
    l1_offset = int.from_bytes(qemu[40:48], "big")
    ours[l1_offset + 7] ^= 0x40  # L1 entry 0's low byte
    text = layout.first_difference(bytes(ours), qemu)
    assert text is not None
    assert f"first difference at {l1_offset + 7:#x} (1 clusters differ)" in text
    assert "ours: L1 entry 0" in text and "QEMU: L1 entry 0" in text
    shorter = layout.first_difference(qemu[:-512], qemu)
    assert shorter is not None and f"file sizes: ours {len(qemu) - 512:#x}" in shorter
