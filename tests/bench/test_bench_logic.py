"""The benchmark's parsing and reporting logic, on a canned fio JSON and synthetic samples.

No daemon and no fio run here: those take minutes (``scripts/bench --quick``). What is checked
is what would silently corrupt the figures: the fields read from fio, the medians and ratios,
the CPU accounting from /proc, the daemon command line, and that the outputs are well formed.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
from benchlib import matrix
from benchlib.cleanup import Janitor
from benchlib.cli import main
from benchlib.fio import fio_command, load_fio_json, parse_fio_json
from benchlib.plot import plot_ratios
from benchlib.procstat import parse_stat, tree_cpu_seconds
from benchlib.results import (
    Sample,
    format_table,
    load_samples,
    ratios,
    summarise,
    summarise_startup,
    write_json,
)
from benchlib.runner import count_queues
from benchlib.targets import Libfuse, daemon_args

CANNED = Path(__file__).parent / "data" / "fio-randrw-mixed.json"


def test_parse_canned_fio_json() -> None:
    doc = load_fio_json(CANNED)
    fig = parse_fio_json(doc)
    mixed = doc["jobs"][0]["mixed"]
    assert fig.iops == pytest.approx(mixed["iops"])
    assert fig.mbps == pytest.approx(mixed["bw_bytes"] / 1e6)
    assert fig.lat_mean_us == pytest.approx(mixed["lat_ns"]["mean"] / 1e3)
    assert fig.lat_p99_us == pytest.approx(mixed["lat_ns"]["percentile"]["99.000000"] / 1e3)
    assert fig.total_ios == mixed["total_ios"]
    assert fig.fio_cpu_pct == pytest.approx(12.55 + 33.45)


def test_fio_output_with_warning_prefix(tmp_path: Path) -> None:
    noisy = tmp_path / "out.json"
    noisy.write_text("fio: some warning\n" + CANNED.read_text())
    assert parse_fio_json(load_fio_json(noisy)).total_ios == 644484


def test_failed_fio_job_raises() -> None:
    doc = load_fio_json(CANNED)
    doc["jobs"][0]["error"] = 5
    with pytest.raises(RuntimeError, match="error 5"):
        parse_fio_json(doc)


def test_fio_command_line() -> None:
    job = matrix.JOBS["randrw70-qd64"]
    argv = fio_command(job, "/mnt/x", runtime=8, ramp=2, output="/o.json")
    for opt in (
        "--direct=1",
        "--ioengine=io_uring",
        "--rw=randrw",
        "--rwmixread=70",
        "--iodepth=64",
        "--ramp_time=2",
        "--runtime=8",
        "--time_based",
        "--unified_rw_reporting=mixed",
        "--filename=/mnt/x",
        "--output=/o.json",
    ):
        assert opt in argv
    assert not any(
        a.startswith("--rwmixread") for a in fio_command(matrix.JOBS["read1m-qd4"], "f", 1, 1, "o")
    )


def test_matrix_names() -> None:
    assert [j.name for j in matrix.pick(None, matrix.JOBS, matrix.DEFAULT_JOBS)] == [
        j.name for j in matrix.JOBS.values() if j.tool == "fio"
    ]
    assert matrix.JOBS["randread-qd16x2"].label == "4k randread QD16x2"
    with pytest.raises(ValueError, match="nope"):
        matrix.pick("qemu,nope", matrix.TARGETS, matrix.DEFAULT_TARGETS)
    assert not matrix.applies(matrix.TARGETS["file"], matrix.BACKENDS["null"])
    assert matrix.applies(matrix.TARGETS["qemu"], matrix.BACKENDS["null"])


def test_daemon_args_null_uring_iothreads() -> None:
    args = daemon_args(matrix.TARGETS["qsd-py-uring-iot2"], matrix.BACKENDS["null"], "", "/m", "/p")
    assert "driver=null-co,node-name=d0,size=1073741824" in args
    export = args[args.index("--export") + 1]
    assert export == (
        "type=fuse,id=e0,node-name=d0,mountpoint=/m,writable=on,io_uring=on,"
        "iothread.0=bench-t0,iothread.1=bench-t1"
    )
    assert args.count("--object") == 2 and args[-2:] == ["--pidfile", "/p"]


def test_daemon_args_file_backend() -> None:
    args = daemon_args(
        matrix.TARGETS["qemu"], matrix.BACKENDS["disk"], "/i.img", "/m", "/p", ",aio=native"
    )
    assert args[:4] == [
        "--blockdev",
        "driver=file,node-name=f0,filename=/i.img,cache.direct=on,aio=native",
        "--blockdev",
        "driver=raw,node-name=d0,file=f0",
    ]
    assert "io_uring" not in " ".join(args) and "--object" not in args


def _samples() -> list[Sample]:
    def s(target: str, rnd: int, iops: float, cpu: float, error: str = "") -> Sample:
        return Sample(
            "tmpfs",
            "randread-qd1",
            target,
            rnd,
            iops=iops,
            mbps=iops * 4096 / 1e6,
            lat_mean_us=1e6 / iops,
            lat_p99_us=2e6 / iops,
            daemon_cpu_us_per_io=cpu,
            error=error,
        )

    return [
        s("qemu", 0, 10000, 40),
        s("qsd-py", 0, 18000, 20),
        s("file", 0, 50000, math.nan),
        s("qemu", 1, 12000, 44),
        s("qsd-py", 1, 14000, 30),
        s("file", 1, 1, math.nan, "boom"),
        s("qemu", 2, 11000, 42),
        s("qsd-py", 2, 16000, 25),
    ]


def test_summary_medians_and_ratios() -> None:
    summary = summarise(_samples())
    by = {r["target"]: r for r in summary}
    assert [r["target"] for r in summary] == ["qemu", "qsd-py", "file"]
    assert by["qemu"]["iops"] == 11000 and by["qsd-py"]["iops"] == 16000
    assert by["file"]["n"] == 1 and by["file"]["failed"] == 1 and by["file"]["iops"] == 50000
    assert math.isnan(by["file"]["daemon_cpu_us_per_io"])
    rows = {r["target"]: r for r in ratios(summary, "qemu")}
    assert set(rows) == {"qsd-py", "file"}
    assert rows["qsd-py"]["iops_ratio"] == pytest.approx(16000 / 11000)
    assert rows["qsd-py"]["cpu_ratio"] == pytest.approx(25 / 42)
    assert math.isnan(rows["file"]["cpu_ratio"])
    assert ratios(summary, "qemu-iot2") == []  # reference absent: no ratios at all


def test_table_text() -> None:
    summary = summarise(_samples())
    startup = summarise_startup({"qemu": [0.005, 0.006, 0.004], "qsd-py": [0.3]})
    assert startup["qemu"]["median_ms"] == pytest.approx(5.0)
    table = format_table(summary, ratios(summary, "qemu"), startup, "qemu")
    lines = table.splitlines()
    assert "x qemu" in lines[0] and "CPU us/IO" in lines[0]
    qsd = next(line for line in lines if " qsd-py " in line and "randread" in line)
    assert "16,000" in qsd and "1.45" in qsd and "0.60" in qsd and qsd.split()[-3] == "3"
    assert "1!1" in next(line for line in lines if " file " in line)  # 1 good run, 1 failed
    assert any(line.split()[:2] == ["qemu", "5.0"] for line in lines)


def test_json_round_trip_without_nan(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    startup = summarise_startup({"qemu": [0.005]})
    write_json(path, {"date": "now"}, startup, _samples(), "qemu")

    def no_nan(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    doc = json.loads(path.read_text(), parse_constant=no_nan)
    assert doc["reference"] == "qemu" and len(doc["samples"]) == 8
    again = load_samples(doc)
    assert again[0] == _samples()[0]
    assert math.isnan(again[2].daemon_cpu_us_per_io)


def test_report_renders_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"date": "now", "note": "test"}, {}, _samples(), "qemu")
    assert main(["--report", str(path)]) == 0
    assert "qsd-py" in capsys.readouterr().out
    assert (tmp_path / "table.txt").read_text().startswith("backend")
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_leaves_out_bare_file_and_needs_data(tmp_path: Path) -> None:
    only_file = [{"backend": "tmpfs", "job": "j", "target": "file", "iops_ratio": 5.0}]
    assert not plot_ratios(only_file, "qemu", "t", tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_parse_stat_with_awkward_name() -> None:
    text = "123 (a) b (c) R 45 1 1 0 -1 4194304 10 0 0 0 70 30 0 0 20 0 1 0 5 0 0"
    assert parse_stat(text) == (45, 70, 30)


def test_tree_cpu_seconds_counts_own_cpu() -> None:
    before = tree_cpu_seconds(os.getpid())
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    assert tree_cpu_seconds(os.getpid()) - before >= 0.05
    assert math.isnan(tree_cpu_seconds(2**22 + 7))  # beyond pid_max: no such process


def test_janitor_undoes_in_reverse_even_after_failure() -> None:
    done: list[str] = []

    def fail() -> None:
        done.append("fail")
        raise OSError("busy")

    jan = Janitor()
    jan.push("a", lambda: done.append("a"))
    with jan.scope():
        jan.push("b", lambda: done.append("b"))
        jan.push("c", fail)
    assert done == ["fail", "b"]
    jan.close()
    assert done == ["fail", "b", "a"]


def _queues(requests: tuple[int, int], linked: tuple[int, int]) -> list[dict]:
    """x-query-fuse-queues as qsd-py answers it (one export, a /dev/fuse queue, two rings)."""
    uring = [
        {"name": f"e0/uring-q{i}@cpu{i}", "requests": r, "linked-reads": n, "fast-path": "uring"}
        for i, (r, n) in enumerate(zip(requests, linked, strict=True))
    ]
    devfuse = [{"name": "e0/q0@main", "requests": 5, "fast-path": "threads"}]
    return [{"id": "e0", "transport": "io_uring", "queues": devfuse, "uring-queues": uring}]


def test_queue_counters_count_the_run_only() -> None:
    sample = Sample("disk", "randread-qd1", "qsd-py-uring", 0)
    text = count_queues(sample, _queues((100, 10), (40, 0)), _queues((1100, 510), (940, 480)))
    assert (sample.queue_requests, sample.linked_reads) == (1500, 1380)
    assert sample.fast_path == "uring"  # the /dev/fuse queue of an io_uring export is left out
    assert "1500 requests" in text and "1380 linked reads" in text


def test_daemon_args_with_qmp_monitor() -> None:
    args = daemon_args(matrix.TARGETS["qemu"], matrix.BACKENDS["null"], "", "/m", "/p", qmp="/s")
    assert args[:4] == [
        "--chardev",
        "socket,id=bench-qmp,path=/s,server=on,wait=off",
        "--monitor",
        "chardev=bench-qmp",
    ]


def test_libfuse_targets_serve_raw_files_only() -> None:
    """passthrough_hp serves files as they are: a raw image, never null-co or a qcow2 file."""
    for name in matrix.LIBFUSE_TARGETS:
        target = matrix.TARGETS[name]
        assert target.daemon == "libfuse" and name not in matrix.DEFAULT_TARGETS
        assert matrix.applies(target, matrix.BACKENDS["tmpfs"])
        assert matrix.applies(target, matrix.BACKENDS["disk"])
        assert not matrix.applies(target, matrix.BACKENDS["null"])
        assert not matrix.applies(target, matrix.BACKENDS["qcow2-tmpfs-allocated"])


def test_libfuse_command_lines(tmp_path: Path) -> None:
    """io_uring with libfuse's own depth, with qsd-py's, and /dev/fuse; never kernel passthrough."""
    lib = Libfuse(tmp_path)  # nothing built there
    assert not lib.probe() and "libfuse-anchor/build.sh" in lib.note
    argv = {n: lib.argv(matrix.TARGETS[n], "/src", "/mnt") for n in matrix.LIBFUSE_TARGETS}
    assert argv["libfuse-uring"][1:] == ["--foreground", "--nopassthrough", "-o", "io_uring",
                                         "/src", "/mnt"]  # fmt: skip
    assert argv["libfuse-uring-qd64"][5:7] == ["-o", "io_uring_q_depth=64"]
    assert argv["libfuse"][1:] == ["--foreground", "--nopassthrough", "/src", "/mnt"]


def test_baseline_targets_run_the_other_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The *-base targets run qsd-py from --baseline's tree (python -m imports from its
    working directory first); the others from this repository."""
    from benchlib import runner as runner_module
    from benchlib.runner import Options, Runner

    monkeypatch.setattr(runner_module, "WORK", tmp_path / "work")
    for sub in ("mnt", "run"):
        (tmp_path / "work" / sub).mkdir(parents=True)

    base = tmp_path / "old-tree"
    opts = Options(
        targets=[matrix.TARGETS["qsd-py-uring"], matrix.TARGETS["qsd-py-uring-base"]],
        backends=[matrix.BACKENDS["null"]],
        jobs=[matrix.JOBS["randread-qd1"]],
        runtime=1,
        ramp=0,
        rounds=1,
        startup_runs=0,
        out=tmp_path / "out",
        baseline=base,
    )
    runner = Runner(opts, Janitor())
    null = matrix.BACKENDS["null"]
    new = runner.make_daemon(matrix.TARGETS["qsd-py-uring"], null, "", "t")
    old = runner.make_daemon(matrix.TARGETS["qsd-py-uring-base"], null, "", "t")
    assert old.cwd == str(base) and new.cwd != str(base)
    assert old.argv[1:3] == new.argv[1:3] == ["-m", "qsd_py"]


def test_librbd_target_reads_rbd_images_only() -> None:
    """fio's rbd engine is the client itself: it applies to the rbd backend alone, and no
    bare file nor libfuse target is run against an RBD image."""
    librbd, rbd = matrix.TARGETS["librbd"], matrix.BACKENDS["rbd"]
    assert librbd.daemon is None and "librbd" not in matrix.DEFAULT_TARGETS
    assert matrix.applies(librbd, rbd)
    assert not matrix.applies(librbd, matrix.BACKENDS["tmpfs"])
    assert not matrix.applies(matrix.TARGETS["file"], rbd)
    assert not matrix.applies(matrix.TARGETS["libfuse-uring"], rbd)
    assert matrix.applies(matrix.TARGETS["qemu"], rbd)
    argv = fio_command(matrix.JOBS["randwrite-qd16x2"], "rbd:rbd/bench-librbd", 3, 1, "o")
    engine = argv.index("--ioengine=rbd")
    assert engine < argv.index("--pool=rbd") and engine < argv.index("--rbdname=bench-librbd")
    assert not any(a.startswith(("--filename", "--direct")) for a in argv)


def test_table_osd_column_only_when_sampled() -> None:
    samples = _samples()
    assert "OSD us/IO" not in format_table(summarise(samples), [], {}, "qemu")
    for s in samples:
        s.osd_cpu_us_per_io = 61.5 if s.target == "qemu" else math.nan
    table = format_table(summarise(samples), [], {}, "qemu")
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["OSD", "us/IO"]
    assert next(ln for ln in lines[1:] if " qemu " in ln).split()[-1] == "61.5"
    assert next(ln for ln in lines[1:] if " qsd-py " in ln).split()[-1] == "-"
