"""``scripts/bench-jobs``: block jobs of qsd-py against QEMU's qemu-storage-daemon.

Two measurements, both daemons in the same run, rounds interleaved (A/B/A/B):

* **copy**: ``blockdev-mirror`` (sync full, until ``BLOCK_JOB_READY``; then a soft
  ``block-job-cancel`` until ``BLOCK_JOB_COMPLETED``) and ``blockdev-backup`` (sync full,
  until ``BLOCK_JOB_COMPLETED``) of a 1 GiB raw image, full of data or half sparse, to a new
  raw or qcow2 target on the same storage (tmpfs, disk); wall time from the command to the
  event, and the daemon's CPU seconds over it.
* **fio under a mirror**: fio (4 KiB, QD16, its ``nbd`` engine) through the daemon's NBD
  export of the source, alone and while a mirror of that source runs, restarted as soon as
  it is ready so that it copies all the time; the ratio of the two IOPS.

Each daemon serves its own copy of the source (the daemons lock their images) with
``cache.direct=on`` on every file node, as ``scripts/bench`` does. Targets are made anew for
every job (a sparse raw file, or an empty qcow2 image by the host's qemu-img) and added and
deleted over QMP.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchlib.cleanup import Janitor
from benchlib.cli import git_rev, loadavg, machine
from benchlib.fio import fio_command, fio_version, load_fio_json, parse_fio_json
from benchlib.images import FILL_CHUNK, fill_raw, qemu_img_version, sync
from benchlib.matrix import IMAGE_SIZE, TARGETS, Backend, Job, Target
from benchlib.procstat import tree_cpu_seconds
from benchlib.qmp import QmpError, QmpSession
from benchlib.targets import REPO, Daemon, QsdPy, RealQsd, daemon_args, nbd_uri

WORK = Path("/tmp/qsd-cmp/qsd-bench-jobs")  # sockets and pidfiles (seen by the chroot)
ROOTS = {"tmpfs": "/dev/shm/qsd-bench-jobs", "disk": "/tmp/qsd-cmp/qsd-bench-jobs/disk"}
# Their NBD targets; qsd-py-base runs qsd-py from the tree --baseline names (before/after).
DAEMONS = {"qsd-py": "qsd-py-nbd-unix", "qemu": "qemu-nbd-unix", "qsd-py-base": "qsd-py-nbd-unix"}
IMAGES = ("data", "half-sparse")
# name: (QMP command, target format)
COPIES = {
    "mirror-raw": ("blockdev-mirror", "raw"),
    "mirror-qcow2": ("blockdev-mirror", "qcow2"),
    "backup-raw": ("blockdev-backup", "raw"),
    "backup-qcow2": ("blockdev-backup", "qcow2"),
}
FIO_JOBS = {
    j.name: j
    for j in (
        Job("randwrite-qd16", "randwrite", "4k", 16),
        Job("randrw70-qd16", "randrw", "4k", 16, mix=70),
    )
}
JOB_TIMEOUT = 900.0


def say(text: str) -> None:
    print(f"bench-jobs: {text}", file=sys.stderr, flush=True)


@dataclass
class CopySample:
    backend: str
    image: str
    copy: str
    daemon: str
    round: int
    seconds: float = float("nan")  # command to READY (mirror) or COMPLETED (backup)
    end_seconds: float = float("nan")  # command to COMPLETED (mirror: after the cancel)
    cpu_s: float = float("nan")  # daemon CPU over ``end_seconds``
    error: str = ""


@dataclass
class FioSample:
    backend: str
    job: str
    daemon: str
    round: int
    mirror: bool
    speed: int = 0  # the mirror's speed limit, bytes/s (0: none)
    iops: float = float("nan")
    lat_p99_us: float = float("nan")
    cpu_s: float = float("nan")
    passes: int = 0  # mirrors that reached ready during the run
    error: str = ""


@dataclass
class Outcome:
    copies: list[CopySample] = field(default_factory=list)
    fio: list[FioSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


# --- images --------------------------------------------------------------------------------
def make_source(path: str, kind: str, size: int = IMAGE_SIZE) -> None:
    """A raw image full of data, or one whose every other MiB is a hole (``half-sparse``)."""
    Path(path).unlink(missing_ok=True)
    if kind == "data":
        fill_raw(path, size)
    else:
        chunk = os.urandom(FILL_CHUNK)
        with open(path, "wb") as f:
            for off in range(0, size, 2 * FILL_CHUNK):
                f.seek(off)
                f.write(chunk[: min(FILL_CHUNK, size - off)])
            f.truncate(size)
    sync(path)


def make_target(path: str, fmt: str, size: int = IMAGE_SIZE) -> None:
    """A new, empty target: a sparse raw file, or a qcow2 image made by qemu-img."""
    Path(path).unlink(missing_ok=True)
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)],
            check=True,
            capture_output=True,
        )


def compare(source: str, target: str, fmt: str) -> str:
    """``qemu-img compare`` of the source and a finished copy (the daemon still holds the
    source: shared); "" when equal, else what qemu-img said."""
    argv = ["qemu-img", "compare", "-U", "-f", "raw", "-F", fmt, source, target]
    out = subprocess.run(argv, capture_output=True, text=True)
    return "" if out.returncode == 0 else f"copy differs: {(out.stdout + out.stderr).strip()}"


# --- one daemon ----------------------------------------------------------------------------
class JobDaemon:
    """A daemon serving ``source`` as node ``d0`` over NBD, with a QMP session."""

    def __init__(self, name: str, runner: Runner, backend: Backend, source: str) -> None:
        self.name, self.backend, self.source = name, backend, source
        target: Target = TARGETS[DAEMONS[name]]
        run = WORK / "run"
        pidfile, qmp = str(run / f"{name}.pid"), str(run / f"{name}.qmp")
        sock = str(run / f"{name}.sock")
        args = daemon_args(target, backend, source, sock, pidfile, "", qmp)
        log = runner.out / "logs" / f"{name}-{backend.name}.log"
        if name == "qemu":
            host = runner.real.host_path
            argv, qmp, sock = runner.real.argv(args), host(qmp), host(sock)
        else:
            argv = runner.qsdpy.argv(args)
        # python -m qsd_py imports the package of its working directory first.
        cwd = str(runner.args.baseline if name == "qsd-py-base" else REPO)
        self.daemon = Daemon(argv, nbd_uri(target, sock), pidfile, log, cwd, qmp, sock)
        self.qmp: QmpSession | None = None

    def start(self) -> None:
        self.daemon.start(60)
        self.qmp = QmpSession(self.daemon.qmp)

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        self.daemon.stop()

    @property
    def cpu(self) -> float:
        return tree_cpu_seconds(self.daemon.pid)

    def add_target(self, path: str, fmt: str) -> None:
        assert self.qmp is not None
        file = {"driver": "file", "filename": path, "cache": {"direct": True}}
        self.qmp.execute("blockdev-add", {"driver": fmt, "node-name": "t0", "file": file})

    def del_target(self) -> None:
        assert self.qmp is not None
        self.qmp.execute("blockdev-del", {"node-name": "t0"})

    def start_job(self, command: str, speed: int = 0) -> float:
        """Start the job ``j0`` from d0 to t0; the time just before the command went out."""
        assert self.qmp is not None
        self.qmp.drop_events()
        args = {"job-id": "j0", "device": "d0", "target": "t0", "sync": "full"}
        if speed:
            args["speed"] = speed
        t0 = time.perf_counter()
        self.qmp.execute(command, args)
        return t0

    def wait(self, *events: str, timeout: float = JOB_TIMEOUT) -> float:
        assert self.qmp is not None
        when, msg = self.qmp.wait_event(events, timeout)
        if msg["event"] == "BLOCK_JOB_COMPLETED" and "error" in msg.get("data", {}):
            raise QmpError(f"job failed: {msg['data']['error']}")
        if msg["event"] == "BLOCK_JOB_ERROR":
            raise QmpError(f"job error: {msg['data']}")
        return when

    def end_mirror(self) -> float:
        """Soft-cancel a ready mirror (it completes, the source stays in use)."""
        assert self.qmp is not None
        self.qmp.execute("block-job-cancel", {"device": "j0"})
        return self.wait("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


# --- the runs ------------------------------------------------------------------------------
class Runner:
    def __init__(self, args: argparse.Namespace, janitor: Janitor) -> None:
        self.args, self.janitor = args, janitor
        self.out: Path = args.out
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        (self.out / "fio").mkdir(parents=True, exist_ok=True)
        self.real, self.qsdpy = RealQsd(), QsdPy(args.python)
        self.outcome = Outcome()

    def note(self, text: str) -> None:
        say(text)
        self.outcome.notes.append(text)

    def daemons(self) -> list[str]:
        names = []
        for name in self.args.daemons.split(","):
            probe = self.real if name == "qemu" else self.qsdpy
            if name == "qsd-py-base" and not (self.args.baseline / "qsd_py").is_dir():
                self.note(f"qsd-py-base skipped: --baseline {self.args.baseline} is no qsd-py tree")
            elif probe.probe():
                names.append(name)
            else:
                self.note(f"{name} skipped: {probe.note}")
        if self.real.version:
            self.outcome.versions["qemu"] = self.real.version
        self.outcome.versions["qemu-img"] = qemu_img_version()
        return names

    def run(self) -> Outcome:
        names = self.daemons()
        (WORK / "run").mkdir(parents=True, exist_ok=True)
        for bname in self.args.backends.split(","):
            backend = Backend(bname, "file", ROOTS[bname])
            Path(backend.root).mkdir(parents=True, exist_ok=True)
            with self.janitor.scope():
                self.janitor.push(f"remove {backend.root}", lambda r=backend.root: _rmtree(r))
                for image in self.args.images.split(","):
                    if self.args.copies:
                        self.copy_runs(backend, image, names)
                if self.args.fio_jobs:
                    self.fio_runs(backend, names)
        return self.outcome

    def up(self, backend: Backend, image: str, names: list[str]) -> dict[str, JobDaemon]:
        """A source per daemon (a copy of the first) and the daemons on them."""
        live: dict[str, JobDaemon] = {}
        self.janitor.push(f"{backend.name} daemons", lambda: _stop_all(live))
        first = ""
        for name in names:
            src = f"{backend.root}/src-{name}.img"
            if not first:
                t0 = time.perf_counter()
                make_source(src, image)
                say(f"{backend.name}: {image} source made in {time.perf_counter() - t0:.1f} s")
                first = src
            else:
                subprocess.run(["cp", "--sparse=always", first, src], check=True)
                sync(src)
            live[name] = JobDaemon(name, self, backend, src)
            live[name].start()
        return live

    def copy_runs(self, backend: Backend, image: str, names: list[str]) -> None:
        with self.janitor.scope():
            live = self.up(backend, image, names)
            for rnd in range(self.args.rounds):
                for copy in self.args.copies.split(","):
                    for name in names:
                        sample = self.one_copy(live[name], image, copy, rnd)
                        self.outcome.copies.append(sample)
                        say(f"{backend.name} {image} {copy} {name} r{rnd}: "
                            f"{sample.seconds:.2f} s (end {sample.end_seconds:.2f} s, "
                            f"cpu {sample.cpu_s:.2f} s) {sample.error}")  # fmt: skip

    def one_copy(self, d: JobDaemon, image: str, copy: str, rnd: int) -> CopySample:
        command, fmt = COPIES[copy]
        sample = CopySample(d.backend.name, image, copy, d.name, rnd)
        tgt = f"{d.backend.root}/tgt-{d.name}.{fmt}"
        try:
            make_target(tgt, fmt)
            d.add_target(tgt, fmt)
            try:
                c0 = d.cpu
                t0 = d.start_job(command)
                if command == "blockdev-mirror":
                    sample.seconds = d.wait("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED") - t0
                    sample.end_seconds = d.end_mirror() - t0
                else:
                    sample.seconds = sample.end_seconds = d.wait("BLOCK_JOB_COMPLETED") - t0
                sample.cpu_s = d.cpu - c0
            finally:
                d.del_target()
            if rnd == 0 and self.args.verify:
                sample.error = compare(d.source, tgt, fmt)
        except (QmpError, OSError, subprocess.CalledProcessError) as exc:
            sample.error = str(exc)
            self.note(f"{copy} on {d.name}: {exc}")
        finally:
            Path(tgt).unlink(missing_ok=True)
        return sample

    # --- fio under a mirror ----------------------------------------------------------------
    def fio_runs(self, backend: Backend, names: list[str]) -> None:
        with self.janitor.scope():
            live = self.up(backend, "data", names)
            for rnd in range(self.args.rounds):
                for jname in self.args.fio_jobs.split(","):
                    for name in names:
                        for mirror in (None, *self.speeds):
                            s = self.one_fio(live[name], FIO_JOBS[jname], rnd, mirror)
                            self.outcome.fio.append(s)
                            say(f"{backend.name} fio {jname} {name} r{rnd} mirror={mirror}: "
                                f"{s.iops:.0f} IOPS, {s.passes} passes {s.error}")  # fmt: skip

    @property
    def speeds(self) -> list[int]:
        """The mirror speeds of the fio runs under a mirror (0: no limit)."""
        return [int(v) for v in self.args.mirror_speeds.split(",") if v]

    def one_fio(self, d: JobDaemon, job: Job, rnd: int, speed: int | None) -> FioSample:
        """One fio run: alone (``speed`` None) or under a mirror at ``speed`` bytes/s."""
        mirror = speed is not None
        sample = FioSample(d.backend.name, job.name, d.name, rnd, mirror, speed or 0)
        what = f"mirror{speed}" if mirror else "alone"
        tag = f"{d.backend.name}-{job.name}-{d.name}-r{rnd}-{what}"
        out = self.out / "fio" / f"{tag}.json"
        a = self.args
        argv = fio_command(job, d.daemon.fio_path, a.runtime, a.ramp, str(out))
        tgt = f"{d.backend.root}/tgt-{d.name}.raw"
        try:
            if mirror:
                make_target(tgt, "raw")
                d.add_target(tgt, "raw")
            c0 = d.cpu
            try:
                fio = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True)  # fmt: skip
                if speed is not None:
                    sample.passes = self.mirror_loop(d, fio, speed)
                _, err = fio.communicate(timeout=a.runtime + a.ramp + 120)
            finally:
                if mirror:
                    d.del_target()
            sample.cpu_s = d.cpu - c0
            if fio.returncode != 0:
                raise RuntimeError(f"fio exited {fio.returncode}: {err.strip()[-300:]}")
            fig = parse_fio_json(load_fio_json(out))
            sample.iops, sample.lat_p99_us = fig.iops, fig.lat_p99_us
        except (QmpError, OSError, RuntimeError, ValueError, KeyError) as exc:
            sample.error = str(exc)
            self.note(f"fio {job.name} on {d.name}: {exc}")
        finally:
            Path(tgt).unlink(missing_ok=True)
        return sample

    def mirror_loop(self, d: JobDaemon, fio: subprocess.Popen, speed: int) -> int:
        """Mirror d0 to t0 again and again while fio runs; the mirrors that got ready."""
        passes = 0
        while fio.poll() is None:
            d.start_job("blockdev-mirror", speed)
            while fio.poll() is None:
                try:
                    d.wait("BLOCK_JOB_READY", timeout=0.2)
                    passes += 1
                    break
                except QmpError as exc:
                    if "within" not in str(exc):
                        raise
            if d.qmp is not None and fio.poll() is not None:
                status = {j["id"]: j["status"] for j in d.qmp.execute("query-jobs")}
                if status.get("j0") != "ready":
                    d.qmp.execute("block-job-cancel", {"device": "j0", "force": True})
                    d.wait("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                    break
            d.end_mirror()
        return passes


# --- reports -------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    good = [v for v in values if v == v]
    return statistics.median(good) if good else float("nan")


def copy_table(samples: list[CopySample]) -> str:
    groups: dict[tuple[str, str, str], dict[str, list[CopySample]]] = {}
    for s in samples:
        if not s.error:
            groups.setdefault((s.backend, s.image, s.copy), {}).setdefault(s.daemon, []).append(s)
    lines = [f"{'backend':7} {'image':11} {'copy':13} {'daemon':7} {'n':>2} {'ready/done s':>12} "
             f"{'end s':>7} {'MiB/s':>7} {'cpu s':>6} {'time x qemu':>11}"]  # fmt: skip
    for (backend, image, copy), by in groups.items():
        ref = _median([s.seconds for s in by.get("qemu", [])])
        for daemon, runs in by.items():
            sec = _median([s.seconds for s in runs])
            end = _median([s.end_seconds for s in runs])
            cpu = _median([s.cpu_s for s in runs])
            rate = (IMAGE_SIZE >> 20) / sec if sec == sec and sec > 0 else float("nan")
            ratio = sec / ref if ref == ref and ref > 0 else float("nan")
            lines.append(f"{backend:7} {image:11} {copy:13} {daemon:7} {len(runs):2} {sec:12.2f} "
                         f"{end:7.2f} {rate:7.0f} {cpu:6.2f} {ratio:11.2f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def fio_table(samples: list[FioSample]) -> str:
    """Per backend, job and daemon: IOPS alone, and under a mirror at each speed."""
    groups: dict[tuple[str, str, str], dict[int | None, list[FioSample]]] = {}
    for s in samples:
        if not s.error:
            key = s.speed if s.mirror else None
            groups.setdefault((s.backend, s.job, s.daemon), {}).setdefault(key, []).append(s)
    lines = [f"{'backend':7} {'job':15} {'daemon':11} {'mirror MiB/s':>12} {'n':>2} "
             f"{'IOPS':>7} {'x alone':>7} {'passes':>6} {'cpu s':>6}"]  # fmt: skip
    for (backend, job, daemon), by in groups.items():
        alone = _median([s.iops for s in by.get(None, [])])
        for speed, runs in by.items():
            iops = _median([s.iops for s in runs])
            ratio = iops / alone if alone == alone and alone > 0 else float("nan")
            label = "-" if speed is None else ("unlimited" if not speed else f"{speed >> 20}")
            passes = _median([float(s.passes) for s in runs])
            cpu = _median([s.cpu_s for s in runs])
            lines.append(f"{backend:7} {job:15} {daemon:11} {label:>12} {len(runs):2} "
                         f"{iops:7.0f} {ratio:7.2f} {passes:6.1f} {cpu:6.2f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench-jobs",
        description="blockdev-mirror/-backup of a 1 GiB image and fio through the NBD export "
        "under a mirror: qsd-py against QEMU's qemu-storage-daemon, rounds interleaved.",
    )
    p.add_argument("--daemons", default="qsd-py,qemu", help="comma list of qsd-py,qemu,qsd-py-base")
    p.add_argument("--backends", default="tmpfs,disk", help="comma list of tmpfs,disk")
    p.add_argument("--images", default=",".join(IMAGES), help=f"comma list of {','.join(IMAGES)}")
    p.add_argument("--copies", default=",".join(COPIES), help=f"comma list of {','.join(COPIES)} "
                   "('' skips the copy runs)")  # fmt: skip
    p.add_argument("--fio-jobs", default=",".join(FIO_JOBS),
                   help=f"comma list of {','.join(FIO_JOBS)} ('' skips fio)")  # fmt: skip
    p.add_argument("--mirror-speeds", default="0,104857600",
                   help="the mirror's speeds under fio (bytes/s, 0: no limit)")  # fmt: skip
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip qemu-img compare of each copy of round 0")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=10.0, help="fio's measured seconds")
    p.add_argument("--ramp", type=float, default=2.0, help="fio's warm-up seconds")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs qsd_py")
    p.add_argument("--baseline", type=Path, default=Path("/nonexistent"),
                   help="a qsd-py tree (e.g. git archive of an older commit) that the "
                   "qsd-py-base daemon runs")  # fmt: skip
    p.add_argument("--note", default="", help="free text recorded with the results")
    p.add_argument("--out", type=Path, help="output directory (default bench-out/jobs-DATE-TIME)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (the real-qsd chroot)")
        return 2
    args.out = args.out or REPO / "bench-out" / time.strftime("jobs-%Y%m%d-%H%M%S")
    say(f"output in {args.out}")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["scripts/bench-jobs", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine(),
        "fio": fio_version(),
        "qsd_py_rev": git_rev(),
        "loadavg_start": loadavg(),
    }
    status = 0
    with Janitor() as janitor:
        runner = Runner(args, janitor)
        janitor.push(f"remove {WORK}", lambda: _rmtree(str(WORK)))
        try:
            outcome = runner.run()
        except KeyboardInterrupt:
            say("interrupted: cleaning up, writing what was measured")
            outcome, status = runner.outcome, 130
    meta.update(loadavg_end=loadavg(), notes=outcome.notes, versions=outcome.versions)
    doc = {
        "meta": meta,
        "copies": [asdict(s) for s in outcome.copies],
        "fio": [asdict(s) for s in outcome.fio],
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    table = copy_table(outcome.copies) + "\n" + fio_table(outcome.fio)
    (args.out / "table.txt").write_text(table)
    print(table)
    return status


def _stop_all(live: dict[str, JobDaemon]) -> None:
    while live:
        live.popitem()[1].stop()


def _rmtree(path: str) -> None:
    subprocess.run(["rm", "-rf", path], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
