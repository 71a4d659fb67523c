"""qsd-py's parsers against what QEMU 11.1 said of each damaged image (data/qemu-11.1-open.json).

The images are made anew here with the host's qemu-img and the byte edits of ``damage.py``; the
texts were recorded once with QEMU's own daemon (``scripts/qcow2-corpus-expectations``), so these
tests need no QEMU 11.1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import damage
import expectations
import pytest
from walk import Image

from qsd_py.block.qcow2 import entries as e
from qsd_py.block.qcow2.compress import CompressedClusterError
from qsd_py.block.qcow2.entries import corruption_report
from qsd_py.block.qcow2.header import (
    CRYPT_LUKS,
    NO_KEY_TEXT,
    Qcow2Error,
    Qcow2Header,
    parse_header,
    serialize_header,
)
from qsd_py.block.qcow2.snapshots import Qcow2Snapshot, SnapshotTableShort, parse_snapshot_table

EXPECTED = expectations.load()["damages"]
MODES = [("read-write", False), ("read-only", True)]


def ids_of(*kinds: str) -> list[str]:
    return [did for did, record in EXPECTED.items() if record["kind"] in kinds]


def first_cluster(img: Path) -> bytes:
    with open(img, "rb") as f:
        return f.read(2 << 20)


def open_outcome(did: str, img: Path, read_only: bool) -> str:
    """ "ok" or the error text of qsd-py's header checks, then its snapshot table's."""
    given = "data-file" in damage.DAMAGES[did].options
    try:
        h = parse_header(first_cluster(img), read_only=read_only, data_file_given=given)
        read_snapshot_table(img, h)
    except Qcow2Error as err:
        return str(err)
    if h.crypt_method == CRYPT_LUKS:  # the node asks for the key (test_corpus_driver.py)
        return NO_KEY_TEXT
    return "ok"


def read_snapshot_table(img: Path, h: Qcow2Header) -> list[Qcow2Snapshot]:
    """The table read as a driver would: more bytes each time the parser asks, zeroes past
    the end of the file."""
    needed = 512
    with open(img, "rb") as f:
        while True:
            f.seek(h.snapshots_offset)
            data = f.read(needed)
            data += bytes(needed - len(data))
            try:
                return parse_snapshot_table(data, h.nb_snapshots, h.size & ~511)
            except SnapshotTableShort as short:
                assert short.needed > needed
                needed = max(short.needed, 2 * needed)


def test_every_damage_has_an_expectation() -> None:
    assert sorted(EXPECTED) == sorted(damage.DAMAGES)
    for did, record in EXPECTED.items():
        assert record["kind"] == damage.DAMAGES[did].kind


@pytest.mark.parametrize("did", ids_of("header", "snapshot"))
@pytest.mark.parametrize(("mode", "read_only"), MODES)
def test_open_checks_give_qemus_text(did: str, mode: str, read_only: bool, tmp_path: Path) -> None:
    img = damage.DAMAGES[did].make(tmp_path)
    assert open_outcome(did, img, read_only) == EXPECTED[did][mode]


OPENED = [did for did in ids_of("header") if EXPECTED[did]["read-write"] == "ok"]


@pytest.mark.parametrize("did", OPENED)
def test_header_rewritten_on_open_as_by_qemu(did: str, tmp_path: Path) -> None:
    """QEMU rewrites the header on a read-write open exactly when parse_header says so (or the
    image is dirty: the driver repairs it and clears the bit), and serialize_header then gives
    the very cluster QEMU wrote."""
    record = EXPECTED[did]
    img = damage.DAMAGES[did].make(tmp_path)
    given = "data-file" in damage.DAMAGES[did].options
    h = parse_header(first_cluster(img), read_only=False, data_file_given=given)
    qemu_rewrote = "read-write rewrote header" in record
    assert (h.needs_rewrite or h.dirty) == qemu_rewrote
    if qemu_rewrote and not h.dirty:
        written = serialize_header(h)
        assert hashlib.sha256(written).hexdigest() == record["read-write rewrote header"]
    assert not parse_header(first_cluster(img), read_only=True, data_file_given=given).needs_rewrite


@pytest.mark.parametrize("did", ids_of("runtime", "open"))
@pytest.mark.parametrize(("mode", "read_only"), MODES)
def test_header_of_later_damages_passes(
    did: str, mode: str, read_only: bool, tmp_path: Path
) -> None:
    """Damages QEMU meets after the header (or not at all on open) pass the header checks."""
    img = damage.DAMAGES[did].make(tmp_path)
    assert open_outcome(did, img, read_only) == "ok"
    if damage.DAMAGES[did].kind == "runtime":
        assert EXPECTED[did][mode] == "ok"


MARKED = "qcow2: Marking image as corrupt: "
REPORTED = "qcow2: Image is corrupt: "
READS = [did for did in ids_of("runtime") if f"qemu-io {damage.READ}" in EXPECTED[did]]


def corruption_text(lines: list[str]) -> str | None:
    for line in lines:
        for prefix in (MARKED, REPORTED):
            if line.startswith(prefix):
                return line.removeprefix(prefix).split("; further ")[0]
    return None


@pytest.mark.parametrize("did", READS)
def test_read_path_checks_give_qemus_text(did: str, tmp_path: Path) -> None:
    """Reading the first cluster: the same corruption text as QEMU (from entries.py's text
    functions and QEMU's order of checks), and the same failure of the read."""
    img = damage.DAMAGES[did].make(tmp_path)
    image = Image(img)
    problem = image.read_problem(0)
    key_rw = f"qemu-io {damage.READ}"
    for key, writable in ((f"qemu-io {damage.READ}", True), (f"qemu-io -r {damage.READ}", False)):
        lines = EXPECTED[did][key]["output"]
        assert corruption_text(lines) == problem
        if problem is not None:
            assert corruption_report(problem, writable) in lines
    read_failed = "read failed: Input/output error" in EXPECTED[did][key_rw]["output"]
    if problem is None:
        try:
            image.guest_bytes()
            failed = False
        except CompressedClusterError:
            failed = True
        assert failed == read_failed
    else:
        assert read_failed


def test_write_path_texts_are_qemus() -> None:
    """The write-path corruption texts recorded for the damages, rebuilt with entries.py."""
    expected = {
        ("l2-entry-unaligned", damage.WRITE): e.data_cluster_unaligned_text(0x50200, 0),
        ("zero-cluster-unaligned", damage.WRITE): e.zero_cluster_unaligned_text(0x50200, 0),
        ("extended-l2-alloc-and-zero", damage.WRITE): e.invalid_entry_on_write_text(0x40000, 0),
        ("reftable-entry-unaligned", damage.ALLOCATE): e.refblock_unaligned_text(0x20200, 0),
        ("l2-table-at-l1", damage.WRITE): e.overlap_text("active L1 table"),
        ("l2-entry-at-refcount-table", damage.WRITE): e.overlap_text("refcount table"),
        ("l2-entry-at-own-table", damage.WRITE): e.overlap_text("active L2 table"),
        ("l1-at-zero-io", damage.WRITE): e.overlap_text("qcow2_header"),
        ("refblock-past-eof", damage.ALLOCATE): e.overlap_text("qcow2_header"),
    }
    for (did, command), text in expected.items():
        lines = EXPECTED[did][f"qemu-io {command}"]["output"]
        assert e.corruption_report(text, writable=True) in lines, did
        assert EXPECTED[did][f"qemu-io {command}"]["incompatible after"] & 2


def test_corrupt_marking_sets_the_bit_only_when_writable() -> None:
    for did in READS:
        record = EXPECTED[did]
        rw, ro = record[f"qemu-io {damage.READ}"], record[f"qemu-io -r {damage.READ}"]
        if any(line.startswith(MARKED) for line in rw["output"]) and rw["incompatible after"]:
            assert rw["incompatible after"] & 2
            assert not ro["incompatible after"] & 2
