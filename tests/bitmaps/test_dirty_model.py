"""DirtyBitmap against a model: a set of dirty chunk numbers, changed by random marks,
clears, merges and resizes; the bitmap's count, runs, QEMU serialization and hash must be
what the model says. The model's serialization is built bit by bit, the way QEMU's hbitmap
keeps its last level (chunk i in bit i of little-endian 64-bit words)."""

from __future__ import annotations

import hashlib
import random

import pytest

from qsd_py.block.dirty import DirtyBitmap


class Model:
    def __init__(self, length: int, granularity: int) -> None:
        self.length, self.granularity = length, granularity
        self.dirty: set[int] = set()

    def chunks(self, offset: int, length: int) -> range:
        end = min(offset + length, self.length)
        if length <= 0 or offset >= end:
            return range(0)
        return range(offset // self.granularity, (end - 1) // self.granularity + 1)

    def mark(self, offset: int, length: int) -> None:
        self.dirty.update(self.chunks(offset, length))

    def clear(self, offset: int, length: int) -> None:
        self.dirty.difference_update(self.chunks(offset, length))

    def resize(self, length: int) -> None:
        self.length = length
        nchunks = -(-length // self.granularity)
        self.dirty = {c for c in self.dirty if c < nchunks}

    def count(self) -> int:
        return len(self.dirty) * self.granularity

    def serialized(self) -> bytes:
        nchunks = -(-self.length // self.granularity)
        out = bytearray(8 * max(1, -(-nchunks // 64)))
        for c in self.dirty:
            out[c // 8] |= 1 << (c % 8)
        return bytes(out)

    def runs(self) -> list[tuple[int, int, bool]]:
        """Byte runs of equal state over the whole length."""
        out: list[tuple[int, int, bool]] = []
        g = self.granularity
        for c in range(-(-self.length // g)):
            start, end, dirty = c * g, min((c + 1) * g, self.length), c in self.dirty
            if out and out[-1][2] == dirty:
                out[-1] = (out[-1][0], end - out[-1][0], dirty)
            else:
                out.append((start, end - start, dirty))
        return out


def check(bitmap: DirtyBitmap, model: Model) -> None:
    assert bitmap.count == model.count()
    assert bitmap.serialize() == model.serialized()
    assert bitmap.sha256() == hashlib.sha256(model.serialized()).hexdigest()
    assert list(bitmap.runs(0, bitmap.length)) == model.runs()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_random_marks_clears_resizes(seed: int, shared: bool) -> None:
    """``shared``: the bytes in a memfd mapping (the user's bitmaps), resized anew."""
    rng = random.Random(seed)
    granularity = 1 << rng.randint(9, 16)
    length = rng.randint(1, 300) * 512 + rng.choice([0, granularity * 70])
    bitmap, model = DirtyBitmap(length, granularity), Model(length, granularity)
    if shared:
        bitmap.share()
    for _ in range(200):
        op = rng.random()
        offset = rng.randrange(0, length + granularity)
        size = rng.randint(0, 5 * granularity)
        if op < 0.6:
            bitmap.mark(offset, size)
            model.mark(offset, size)
        elif op < 0.9:
            bitmap.clear(offset, size)
            model.clear(offset, size)
        else:
            new = max(512, length + rng.randint(-20, 20) * 512)
            old = bitmap.resize(new)
            if old is not None:
                old.close()
            model.resize(new)
            length = new
        check(bitmap, model)
    assert (bitmap.shared is not None) == shared
    bitmap.unshare()
    check(bitmap, model)


@pytest.mark.parametrize("seed", range(4))
def test_serialize_round_trip(seed: int) -> None:
    """What serialize writes, deserialize reads back (the qcow2 store and load)."""
    rng = random.Random(seed)
    length = rng.randint(1, 5000) * 512
    bitmap = DirtyBitmap(length, 512)
    for _ in range(50):
        bitmap.mark(rng.randrange(length), rng.randint(1, 8192))
    other = DirtyBitmap(length, 512)
    other.deserialize(bitmap.serialize() + b"\xff" * 64)  # bytes past the end are ignored
    assert other.serialize() == bitmap.serialize()
    assert other.count == bitmap.count


def test_merge_across_granularities() -> None:
    """A dirty source chunk marks every target chunk it overlaps."""
    src = DirtyBitmap(1 << 20, 512)
    src.mark(70_000, 1)
    src.mark(200_000, 700)
    dst = DirtyBitmap(1 << 20, 65536)
    dst.merge_from(src)
    assert [r[:2] for r in dst.runs(0, 1 << 20) if r[2]] == [(65536, 65536), (196608, 65536)]
    back = DirtyBitmap(1 << 20, 512)
    back.merge_from(dst)
    assert back.count == 2 * 65536


def test_empty_hash_is_qemus() -> None:
    """QEMU 11.1 gives this hash for a new bitmap of a 1000000-byte null-co node."""
    bitmap = DirtyBitmap(1000448, 65536)
    assert bitmap.sha256() == "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
    # ... and this one for a 4 MiB qcow2 image's 64 KiB bitmap after three writes
    bitmap = DirtyBitmap(4 << 20, 65536)
    for offset, length in ((0, 65536), (1 << 20, 100 << 10), (3999 << 10, 1024)):
        bitmap.mark(offset, length)
    assert bitmap.sha256() == "075d78dcafb549081c2e80a654dbb954e9d558532bf0a9f70befaccd1e7e2af1"
    assert bitmap.count == 262144
