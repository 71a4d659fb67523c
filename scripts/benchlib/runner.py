"""Running the matrix: images, daemons, interleaved fio runs, start-up timing.

Per backend, every target is brought up at once (one image each, since each daemon locks its
image), then each job runs round by round over all targets in the same order (A/B/A/B...), so
slow drift of the machine hits every target alike. Start-up is timed separately, on null-co,
alternating the daemons the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.cleanup import Janitor, set_uring_knob
from benchlib.fio import fio_command, load_fio_json, parse_fio_json, run_fio
from benchlib.matrix import BACKENDS, IMAGE_SIZE, Backend, Job, Target, applies
from benchlib.procstat import CpuSampler
from benchlib.results import Sample
from benchlib.targets import REPO, Daemon, DaemonFailed, QsdPy, RealQsd, daemon_args

# Under /tmp/qsd-cmp so QEMU's chrooted daemon sees the same mountpoints and disk images.
WORK = Path("/tmp/qsd-cmp/qsd-bench")
FILL_CHUNK = 1 << 20


@dataclass
class Options:
    targets: list[Target]
    backends: list[Backend]
    jobs: list[Job]
    runtime: float
    ramp: float
    rounds: int
    startup_runs: int
    out: Path
    file_opts: str = ""
    python: str = sys.executable
    mount_timeout: float = 60.0


@dataclass
class Outcome:
    samples: list[Sample] = field(default_factory=list)
    startup: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, opts: Options, janitor: Janitor) -> None:
        self.opts, self.janitor = opts, janitor
        self.real, self.qsdpy = RealQsd(), QsdPy(opts.python)
        self.outcome = Outcome()
        (opts.out / "logs").mkdir(parents=True, exist_ok=True)
        (opts.out / "fio").mkdir(parents=True, exist_ok=True)

    def note(self, text: str) -> None:
        say(text)
        self.outcome.notes.append(text)

    # --- what can run -------------------------------------------------------------------

    def usable_targets(self) -> list[Target]:
        """Drop targets whose daemon is unavailable (with a note); set the io_uring knob."""
        ok: dict[str, bool] = {}
        if any(t.daemon == "qemu" for t in self.opts.targets):
            ok["qemu"] = self.real.probe()
            if ok["qemu"]:
                self.outcome.versions["qemu"] = self.real.version
            else:
                self.note(f"QEMU targets skipped: {self.real.note}")
        if any(t.daemon == "qsd-py" for t in self.opts.targets):
            ok["qsd-py"] = self.qsdpy.probe()
            if not ok["qsd-py"]:
                self.note(f"qsd-py targets skipped: {self.qsdpy.note}")
        targets = [t for t in self.opts.targets if t.daemon is None or ok[t.daemon]]
        if any(t.uring for t in targets):
            old = set_uring_knob(self.janitor)
            say(f"fuse enable_uring set to Y (was {old}; restored at exit)")
        return targets

    # --- workspace ----------------------------------------------------------------------

    def setup_workspace(self, backends: list[Backend]) -> None:
        for sub in ("mnt", "run"):
            (WORK / sub).mkdir(parents=True, exist_ok=True)
        self.janitor.push(f"remove {WORK}", lambda: shutil.rmtree(WORK, ignore_errors=True))
        for b in backends:
            if b.kind == "file":
                root = Path(b.root)
                root.mkdir(parents=True, exist_ok=True)
                self.janitor.push(f"remove {root}", lambda r=root: shutil.rmtree(r, True))

    def make_images(self, backend: Backend, targets: list[Target]) -> dict[str, str]:
        """One filled 1 GiB raw image per target (data, not holes: reads must touch storage)."""
        if backend.kind != "file":
            return {}
        root = Path(backend.root)
        paths = {t.name: str(root / f"{t.name}.img") for t in targets}
        first = None
        for path in paths.values():
            if first is None:
                _fill(path)
                first = path
            else:
                shutil.copyfile(first, path)
                _sync(path)
            self.janitor.push(f"remove {path}", lambda p=path: Path(p).unlink(missing_ok=True))
        say(f"{backend.name}: {len(paths)} image(s) of {IMAGE_SIZE >> 20} MiB in {root}")
        return paths

    def make_daemon(self, target: Target, backend: Backend, image: str, tag: str) -> Daemon:
        mountpoint = WORK / "mnt" / target.name
        mountpoint.touch()
        pidfile = str(WORK / "run" / f"{target.name}.pid")
        args = daemon_args(target, backend, image, str(mountpoint), pidfile, self.opts.file_opts)
        log = self.opts.out / "logs" / f"{target.name}-{tag}.log"
        if target.daemon == "qemu":
            argv, fio_path = self.real.argv(args), self.real.host_path(str(mountpoint))
        else:
            argv, fio_path = self.qsdpy.argv(args), str(mountpoint)
        return Daemon(argv, fio_path, pidfile, log, cwd=str(REPO))

    # --- the matrix ---------------------------------------------------------------------

    def run_backend(self, backend: Backend, targets: list[Target]) -> None:
        targets = [t for t in targets if applies(t, backend)]
        with self.janitor.scope():
            images = self.make_images(backend, targets)
            live: dict[str, tuple[str, Daemon | None]] = {}
            for t in targets:
                if t.daemon is None:
                    live[t.name] = (images[t.name], None)
                    continue
                daemon = self.make_daemon(t, backend, images.get(t.name, ""), backend.name)
                self.janitor.push(f"stop {t.name}", daemon.stop)
                try:
                    daemon.start(self.opts.mount_timeout)
                except DaemonFailed as exc:
                    self.note(f"{backend.name}: {t.name} did not start: {exc}")
                    continue
                live[t.name] = (daemon.fio_path, daemon)
            for job in self.opts.jobs:
                for rnd in range(self.opts.rounds):
                    for name, (path, daemon) in live.items():
                        self.run_one(backend, job, rnd, name, path, daemon)

    def run_one(
        self, backend: Backend, job: Job, rnd: int, target: str, path: str, daemon: Daemon | None
    ) -> Sample:
        o = self.opts
        out = o.out / "fio" / f"{backend.name}-{job.name}-{target}-r{rnd}.json"
        sample = Sample(backend.name, job.name, target, rnd)
        sampler = None
        if daemon is not None:
            sampler = CpuSampler(daemon.pid, o.ramp + 0.3, max(o.runtime - 0.6, o.runtime / 2))
            sampler.start()
        try:
            argv = fio_command(job, path, o.runtime, o.ramp, str(out))
            proc = run_fio(argv, timeout=o.ramp + o.runtime + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"fio exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
            fig = parse_fio_json(load_fio_json(out))
        except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            if sampler is not None:
                sampler.cancel()
            sample.error = str(exc)
            self.outcome.samples.append(sample)
            self.note(f"{backend.name} {job.name} {target} round {rnd}: {exc}")
            return sample
        sample.iops, sample.mbps = fig.iops, fig.mbps
        sample.lat_mean_us, sample.lat_p99_us = fig.lat_mean_us, fig.lat_p99_us
        sample.total_ios, sample.fio_cpu_pct = fig.total_ios, fig.fio_cpu_pct
        if sampler is not None:
            window = sampler.finish()
            sample.daemon_util = window.utilisation
            if fig.iops > 0:
                sample.daemon_cpu_us_per_io = window.utilisation / fig.iops * 1e6
        self.outcome.samples.append(sample)
        cpu = sample.daemon_cpu_us_per_io
        say(
            f"{backend.name:6} {job.name:17} {target:17} r{rnd}: {fig.iops:9.0f} IOPS "
            f"{fig.mbps:7.1f} MB/s p99 {fig.lat_p99_us:8.1f} us"
            + (f"  daemon {cpu:6.1f} us/IO" if cpu == cpu else "")
        )
        return sample

    def measure_startup(self, targets: list[Target]) -> None:
        """Time process start to a serving export, null-co backend, daemons alternated."""
        daemons = [t for t in targets if t.daemon is not None]
        null = BACKENDS["null"]
        failed: set[str] = set()
        for _ in range(self.opts.startup_runs):
            for t in daemons:
                if t.name in failed:
                    continue
                with self.janitor.scope():
                    daemon = self.make_daemon(t, null, "", "startup")
                    self.janitor.push(f"stop {t.name}", daemon.stop)
                    try:
                        times = daemon.start(self.opts.mount_timeout)
                    except DaemonFailed as exc:
                        self.note(f"start-up of {t.name} failed: {exc}")
                        failed.add(t.name)
                        continue
                self.outcome.startup.setdefault(t.name, []).append(times.mounted_s)
        for name, times in self.outcome.startup.items():
            say(f"start-up {name}: " + ", ".join(f"{t * 1e3:.1f}" for t in times) + " ms")

    def run(self) -> Outcome:
        targets = self.usable_targets()
        say(f"about {estimate_s(self.opts, targets) / 60:.1f} min")
        self.setup_workspace(self.opts.backends)
        if self.opts.startup_runs > 0:
            self.measure_startup(targets)
        for backend in self.opts.backends:
            self.run_backend(backend, targets)
        return self.outcome


def estimate_s(opts: Options, targets: list[Target]) -> float:
    """Rough duration: fio runs plus image filling; start-up timing is negligible."""
    runs = sum(
        len(opts.jobs) * opts.rounds for b in opts.backends for t in targets if applies(t, b)
    )
    files = sum(b.kind == "file" for b in opts.backends)
    return runs * (opts.runtime + opts.ramp + 0.4) + 5 * files


def _fill(path: str) -> None:
    """Write IMAGE_SIZE bytes of non-zero data and push them to storage before measuring."""
    chunk = os.urandom(FILL_CHUNK)
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE // FILL_CHUNK):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
