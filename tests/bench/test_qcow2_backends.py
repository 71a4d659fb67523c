"""The qcow2 backends of the benchmark: which targets they get, the command line, the order of
the work (a fresh image per fio run), the images qemu-img makes, and the qcow2/raw ratio.

No daemon, fio or root here; the image tests need the host's qemu-img (Debian: qemu-utils),
which the qcow2 tests use as well.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from benchlib import matrix
from benchlib.images import make_image
from benchlib.results import Sample, format_table, ratios, raw_ratios, summarise, write_json
from benchlib.schedule import FIO, IMAGE, START, STOP, steps
from benchlib.targets import daemon_args

QCOW2 = [b for b in matrix.BACKENDS.values() if b.fmt == "qcow2"]
DAEMONS = [t for t in matrix.TARGETS.values() if t.daemon in ("qsd-py", "qemu")]
DEFAULT_TARGETS = matrix.pick(None, matrix.TARGETS, matrix.DEFAULT_TARGETS)
JOBS = [matrix.JOBS["randread-qd16x2"], matrix.JOBS["write1m-qd4"]]


def test_four_qcow2_backends_each_with_its_raw_peer() -> None:
    names = {(b.root, b.state): b.name for b in QCOW2}
    assert sorted(names.values()) == [
        "qcow2-disk-allocated",
        "qcow2-disk-fresh",
        "qcow2-tmpfs-allocated",
        "qcow2-tmpfs-fresh",
    ]
    for b in QCOW2:
        raw = matrix.BACKENDS[b.raw]
        assert raw.fmt == "raw" and raw.kind == "file" and raw.root == b.root
        assert b.fresh == (b.state == "fresh")
    assert matrix.raw_peers()["qcow2-tmpfs-fresh"] == "tmpfs"
    assert set(matrix.raw_peers()) == {b.name for b in QCOW2}
    assert {b.name for b in QCOW2} <= set(matrix.DEFAULT_BACKENDS)


def test_bare_file_only_on_raw_images() -> None:
    bare = matrix.TARGETS["file"]
    for b in QCOW2:
        assert not matrix.applies(bare, b), b.name
        assert all(matrix.applies(t, b) for t in DAEMONS), b.name
    assert matrix.applies(bare, matrix.BACKENDS["disk"])
    assert matrix.applies(bare, matrix.BACKENDS["tmpfs"])


def test_daemon_args_qcow2_chain() -> None:
    target, backend = matrix.TARGETS["qsd-py-uring"], matrix.BACKENDS["qcow2-disk-fresh"]
    args = daemon_args(target, backend, "/i.qcow2", "/m", "/p")
    assert args[:4] == [
        "--blockdev",
        "driver=file,node-name=f0,filename=/i.qcow2,cache.direct=on",
        "--blockdev",
        "driver=qcow2,node-name=d0,file=f0",
    ]
    assert args[5] == "type=fuse,id=e0,node-name=d0,mountpoint=/m,writable=on,io_uring=on"
    # Both daemons get the very same options.
    assert daemon_args(matrix.TARGETS["qemu"], backend, "/i.qcow2", "/m", "/p")[:4] == args[:4]


def test_allocated_image_serves_all_runs_with_daemons_up_throughout() -> None:
    backend = matrix.BACKENDS["qcow2-tmpfs-allocated"]
    plan = steps(backend, DEFAULT_TARGETS, JOBS, rounds=2)
    names = ["qsd-py", "qsd-py-uring", "qemu", "qemu-iot2"]  # no bare file on qcow2
    assert [s.target for s in plan if s.action == IMAGE] == names
    assert [s.target for s in plan if s.action == START] == names
    fio = [s for s in plan if s.action == FIO]
    assert [(s.job, s.round, s.target) for s in fio[:8]] == [
        ("randread-qd16x2", r, n) for r in (0, 1) for n in (names if r == 0 else names[::-1])
    ]
    assert len(fio) == len(JOBS) * 2 * len(names)
    first_fio = plan.index(fio[0])
    assert {s.action for s in plan[:first_fio]} == {IMAGE, START}
    assert [s.target for s in plan[plan.index(fio[-1]) + 1 :]] == names[::-1]


def test_fresh_image_is_made_again_for_every_run() -> None:
    backend = matrix.BACKENDS["qcow2-disk-fresh"]
    plan = steps(backend, DEFAULT_TARGETS, JOBS, rounds=3)
    names = ["qsd-py", "qsd-py-uring", "qemu", "qemu-iot2"]
    fio = [i for i, s in enumerate(plan) if s.action == FIO]
    assert len(fio) == len(JOBS) * 3 * len(names)
    assert len(plan) == 4 * len(fio)  # image, start, fio, stop: nothing else
    for i in fio:
        target = plan[i].target
        assert [(s.action, s.target) for s in plan[i - 2 : i + 2]] == [
            (IMAGE, target),
            (START, target),
            (FIO, target),
            (STOP, target),
        ]
    # Targets take turns, in reverse order every other round (no target always first).
    order = [plan[i].target for i in fio]
    assert order == (names + names[::-1] + names) * len(JOBS)


def test_null_backend_makes_no_image() -> None:
    plan = steps(matrix.BACKENDS["null"], DEFAULT_TARGETS, JOBS, rounds=1)
    assert not any(s.action == IMAGE for s in plan)
    assert "file" not in {s.target for s in plan}


def _qemu_img_json(*args: str) -> dict:
    out = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    return json.loads(out.stdout)


def test_fresh_image_is_empty_again_after_being_written(tmp_path: Path) -> None:
    path = str(tmp_path / "f.qcow2")
    backend = matrix.BACKENDS["qcow2-tmpfs-fresh"]
    make_image(backend, path, 4 << 20)
    info = _qemu_img_json("info", "--output=json", path)
    assert info["format"] == "qcow2" and info["cluster-size"] == 65536
    assert info["virtual-size"] == 4 << 20
    assert _qemu_img_json("check", "--output=json", path).get("allocated-clusters", 0) == 0
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 192k", path], check=True,
                   capture_output=True)  # fmt: skip
    assert _qemu_img_json("check", "--output=json", path)["allocated-clusters"] == 3
    make_image(backend, path, 4 << 20)  # what the runner does before the next run
    assert _qemu_img_json("check", "--output=json", path).get("allocated-clusters", 0) == 0


def test_allocated_image_has_every_cluster_once(tmp_path: Path) -> None:
    path = str(tmp_path / "a.qcow2")
    size = (4 << 20) + (64 << 10)  # not a multiple of the fill chunk
    make_image(matrix.BACKENDS["qcow2-disk-allocated"], path, size)
    assert not Path(path + ".raw").exists()  # the raw source is gone
    info = _qemu_img_json("info", "--output=json", path)
    assert info["virtual-size"] == size and info["cluster-size"] == 65536
    assert "snapshots" not in info and "backing-filename" not in info
    check = _qemu_img_json("check", "--output=json", path)
    # A clean check with no snapshot means each cluster is referenced once (refcount 1).
    assert check["check-errors"] == 0 and "leaks" not in check and "corruptions" not in check
    assert check["allocated-clusters"] == check["total-clusters"] == size // 65536
    extents = _qemu_img_json("map", "--output=json", path)
    assert all(e["data"] and not e["zero"] for e in extents)
    assert sum(e["length"] for e in extents) == size


def _sample(backend: str, target: str, iops: float, job: str = "randread-qd16x2") -> Sample:
    return Sample(backend, job, target, 0, iops=iops, daemon_cpu_us_per_io=10.0)


def _qcow2_and_raw_samples() -> list[Sample]:
    return [
        _sample("tmpfs", "qsd-py-uring", 300_000),
        _sample("tmpfs", "qemu", 25_000),
        _sample("qcow2-tmpfs-allocated", "qsd-py-uring", 255_000),
        _sample("qcow2-tmpfs-allocated", "qemu", 20_000),
        _sample("qcow2-tmpfs-fresh", "qsd-py-uring", 60_000),
        _sample("qcow2-tmpfs-fresh", "qemu", 20_000),
        _sample("qcow2-disk-allocated", "qsd-py-uring", 50_000),  # no raw disk in this run
        _sample("qcow2-tmpfs-allocated", "qsd-py-uring", math.nan, job="read1m-qd4"),
        _sample("tmpfs", "qsd-py-uring", 3_000, job="read1m-qd4"),
    ]


def test_raw_ratio_same_target_same_job_same_storage() -> None:
    summary = summarise(_qcow2_and_raw_samples())
    rows = {
        (r["backend"], r["job"], r["target"]): r for r in raw_ratios(summary, matrix.raw_peers())
    }
    alloc = rows[("qcow2-tmpfs-allocated", "randread-qd16x2", "qsd-py-uring")]
    assert alloc["raw_backend"] == "tmpfs" and alloc["raw_ratio"] == pytest.approx(0.85)
    assert rows[("qcow2-tmpfs-allocated", "randread-qd16x2", "qemu")]["raw_ratio"] == 0.8
    assert rows[("qcow2-tmpfs-fresh", "randread-qd16x2", "qsd-py-uring")]["raw_ratio"] == 0.2
    assert math.isnan(rows[("qcow2-tmpfs-allocated", "read1m-qd4", "qsd-py-uring")]["raw_ratio"])
    # Raw rows have no ratio to themselves; a qcow2 row without its raw backend has none.
    assert not any(b == "tmpfs" for b, _, _ in rows)
    assert not any(b == "qcow2-disk-allocated" for b, _, _ in rows)
    # The ratio against QEMU needs nothing new: same backend, same job.
    vs_qemu = {(r["backend"], r["target"]): r for r in ratios(summary, "qemu")}
    assert vs_qemu[("qcow2-tmpfs-fresh", "qsd-py-uring")]["iops_ratio"] == 3.0


def test_table_shows_raw_column_only_with_qcow2(tmp_path: Path) -> None:
    samples = _qcow2_and_raw_samples()
    summary = summarise(samples)
    raw = raw_ratios(summary, matrix.raw_peers())
    table = format_table(summary, ratios(summary, "qemu"), {}, "qemu", raw)
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["x", "raw"]
    line = next(
        x for x in lines if x.startswith("qcow2-tmpfs-allocated  randread") and "qsd-py-uring" in x
    )
    assert line.split()[-3:] == ["12.75", "1.00", "0.85"]  # x qemu, CPU x, x raw
    raw_line = next(x for x in lines if x.startswith("tmpfs ") and "qsd-py-uring" in x)
    assert raw_line.split()[-2:] == ["12.00", "1.00"]  # no x raw for the raw image itself
    plain = [s for s in samples if not s.backend.startswith("qcow2")]
    plain_summary = summarise(plain)
    assert "x raw" not in format_table(plain_summary, ratios(plain_summary, "qemu"), {}, "qemu")
    doc = write_json(tmp_path / "r.json", {}, {}, samples, "qemu", matrix.raw_peers())
    assert len(doc["raw_ratios"]) == len(raw) == 5
