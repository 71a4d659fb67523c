"""Running the matrix: images, daemons, interleaved fio runs, start-up timing.

Per backend, every target is brought up at once (one image each, since each daemon locks its
image), then each job runs round by round over all targets, the order reversed every other
round (A/B/B/A...), so slow drift of the machine and the place in a round hit every target
alike; a fresh qcow2 image instead gets a new image and daemon for every run (the order is
schedule.py's). Start-up is timed separately, on null-co, alternating the daemons the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.ceph import POOL, BenchCluster
from benchlib.cleanup import Janitor, set_uring_knob
from benchlib.fio import fio_command, load_fio_json, parse_fio_json, run_fio
from benchlib.images import copy_image, make_image, qemu_img_version
from benchlib.matrix import BACKENDS, IMAGE_SIZE, Backend, Job, Target, applies, job_applies
from benchlib.nbdcopy import make_source, run_nbdcopy
from benchlib.procstat import CpuSampler
from benchlib.qmp import QmpError, qmp_command
from benchlib.results import Sample
from benchlib.schedule import FIO, IMAGE, START, STOP, Step, steps
from benchlib.targets import (
    REPO,
    TCP_PORTS,
    Daemon,
    DaemonFailed,
    Libfuse,
    QsdPy,
    RealQsd,
    daemon_args,
    nbd_uri,
)

# Under /tmp/qsd-cmp so QEMU's chrooted daemon sees the same mountpoints and disk images.
# QSD_BENCH_WORK (under /tmp too) lets two runs on one machine keep out of each other's way.
WORK = Path(os.environ.get("QSD_BENCH_WORK", "/tmp/qsd-cmp/qsd-bench"))
# A fresh-image run also makes the image and starts and stops a daemon (for the estimate).
FRESH_EXTRA_S = 0.5
# What nbdcopy's write jobs copy onto an export: on tmpfs, so the source costs nothing.
NBDCOPY_SOURCE = "/dev/shm/qsd-bench-nbdcopy-source.img"


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
    baseline: Path | None = None  # the tree the *-base targets run qsd-py from


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
        self.real, self.qsdpy, self.libfuse = RealQsd(), QsdPy(opts.python), Libfuse()
        self.ceph: BenchCluster | None = None  # started if an rbd backend is asked for
        self.outcome = Outcome()
        (opts.out / "logs").mkdir(parents=True, exist_ok=True)
        (opts.out / "fio").mkdir(parents=True, exist_ok=True)
        (opts.out / "queues").mkdir(parents=True, exist_ok=True)

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
        if any(t.daemon == "libfuse" for t in self.opts.targets):
            ok["libfuse"] = self.libfuse.probe()
            if ok["libfuse"]:
                self.outcome.versions["libfuse"] = self.libfuse.version
            else:
                self.note(f"libfuse targets skipped: {self.libfuse.note}")
        targets = [t for t in self.opts.targets if t.daemon is None or ok[t.daemon]]
        base = self.opts.baseline
        if any(t.baseline for t in targets) and not (base and (base / "qsd_py").is_dir()):
            self.note(f"baseline targets skipped: --baseline {base} is no qsd-py tree")
            targets = [t for t in targets if not t.baseline]
        if any(t.uring for t in targets):
            old = set_uring_knob(self.janitor)
            say(f"fuse enable_uring set to Y (was {old}; restored at exit)")
        return targets

    # --- workspace ----------------------------------------------------------------------

    def usable_backends(self) -> list[Backend]:
        """Drop the qcow2 backends (with a note) when there is no qemu-img to make images."""
        backends = self.opts.backends
        if any(b.kind == "rbd" for b in backends):
            cluster = BenchCluster()
            self.janitor.push("stop the mini-ceph cluster", cluster.stop)
            if cluster.start():
                self.ceph = cluster
                say(f"mini-ceph cluster up ({cluster.conf})")
            else:
                self.note(f"rbd backend skipped: {cluster.note}")
                backends = [b for b in backends if b.kind != "rbd"]
        if any(b.fmt == "qcow2" for b in backends):
            version = qemu_img_version()
            if version:
                self.outcome.versions["qemu-img"] = version
            else:
                self.note("qcow2 backends skipped: no qemu-img on the host (Debian: qemu-utils)")
                backends = [b for b in backends if b.fmt != "qcow2"]
        return backends

    def setup_workspace(self, backends: list[Backend]) -> None:
        for sub in ("mnt", "run"):
            (WORK / sub).mkdir(parents=True, exist_ok=True)
        self.janitor.push(f"remove {WORK}", lambda: shutil.rmtree(WORK, ignore_errors=True))
        for b in backends:
            if b.kind == "file":
                root = Path(b.root)
                root.mkdir(parents=True, exist_ok=True)
                self.janitor.push(f"remove {root}", lambda r=root: shutil.rmtree(r, True))

    def image_paths(self, backend: Backend, targets: list[Target]) -> dict[str, str]:
        """Where each target's image goes (the daemons lock their image: one each); for
        the rbd backend, each target's image name in the cluster."""
        if backend.kind == "rbd":
            return {t.name: f"bench-{t.name}" for t in targets}
        if backend.kind != "file":
            return {}
        suffix = "qcow2" if backend.fmt == "qcow2" else "img"
        return {t.name: str(Path(backend.root) / f"{t.name}.{suffix}") for t in targets}

    def make_target_image(self, backend: Backend, images: dict[str, str], target: Target) -> None:
        """A fresh image is made anew each time; any other the first time, then copied."""
        path = images[target.name]
        if backend.kind == "rbd":
            assert self.ceph is not None
            t0 = time.perf_counter()
            self.ceph.make_image(path, shared=target.export == "librbd")
            say(f"rbd: image {path} of {IMAGE_SIZE >> 20} MiB made in "
                f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
            return
        first = next(iter(images.values()))
        if backend.fresh or path == first:
            t0 = time.perf_counter()
            make_image(backend, path)
            if not backend.fresh:
                say(f"{backend.name}: image of {IMAGE_SIZE >> 20} MiB made in "
                    f"{time.perf_counter() - t0:.1f} s ({path})")  # fmt: skip
        else:
            copy_image(first, path)

    def remove_images(self, backend: Backend, images: dict[str, str]) -> None:
        if backend.kind == "rbd":
            if self.ceph is not None:
                for name in images.values():
                    self.ceph.remove_image(name)
            return
        _remove(images.values())

    def make_daemon(self, target: Target, backend: Backend, image: str, tag: str) -> Daemon:
        if target.daemon == "libfuse":
            return self.make_libfuse(target, backend, image, tag)
        endpoint = self.endpoint(target)
        pidfile = str(WORK / "run" / f"{target.name}.pid")
        qmp = str(WORK / "run" / f"{target.name}.qmp")
        args = daemon_args(target, backend, image, endpoint, pidfile, self.opts.file_opts, qmp)
        log = self.opts.out / "logs" / f"{target.name}-{tag}.log"
        host = self.real.host_path if target.daemon == "qemu" else str
        if target.daemon == "qemu":
            argv, qmp = self.real.argv(args), self.real.host_path(qmp)
        else:
            argv = self.qsdpy.argv(args)
        host_endpoint = endpoint if target.export == "nbd-tcp" else host(endpoint)
        # python -m qsd_py imports the package of its working directory first.
        cwd = str(self.opts.baseline if target.baseline else REPO)
        if not target.nbd:
            return Daemon(argv, host_endpoint, pidfile, log, cwd=cwd, qmp=qmp)
        uri = nbd_uri(target, host_endpoint)
        return Daemon(argv, uri, pidfile, log, cwd, qmp, nbd_endpoint=host_endpoint)

    def make_libfuse(self, target: Target, backend: Backend, image: str, tag: str) -> Daemon:
        """passthrough_hp serving the image's directory on a directory mountpoint."""
        mountpoint = WORK / "mnt" / target.name
        mountpoint.mkdir(exist_ok=True)
        argv = self.libfuse.argv(target, str(Path(image).parent), str(mountpoint))
        log = self.opts.out / "logs" / f"{target.name}-{tag}.log"
        pidfile = str(WORK / "run" / f"{target.name}.pid")  # passthrough_hp writes none
        fio_path = str(mountpoint / Path(image).name)
        return Daemon(argv, fio_path, pidfile, log, cwd=str(REPO), mount=str(mountpoint))

    @staticmethod
    def endpoint(target: Target) -> str:
        """Where the target's export appears, as the daemon sees it: a FUSE mountpoint (made
        here), an NBD socket path, or ``host:port``."""
        if target.export == "nbd-tcp":
            return f"127.0.0.1:{TCP_PORTS[target.name]}"
        if target.export == "nbd-unix":
            return str(WORK / "run" / f"{target.name}.sock")
        mountpoint = WORK / "mnt" / target.name
        mountpoint.touch()
        return str(mountpoint)

    # --- the matrix ---------------------------------------------------------------------

    def run_backend(self, backend: Backend, targets: list[Target]) -> None:
        targets = [t for t in targets if applies(t, backend)]
        by_name = {t.name: t for t in targets}
        images = self.image_paths(backend, targets)
        live: dict[str, Daemon] = {}
        failed: set[str] = set()
        with self.janitor.scope():
            self.janitor.push(f"{backend.name} images", lambda: self.remove_images(backend, images))
            self.janitor.push(f"{backend.name} daemons", lambda: _stop_all(live))
            for step in steps(backend, targets, self.opts.jobs, self.opts.rounds):
                if step.target in failed:
                    continue
                try:
                    self.do(step, backend, by_name[step.target], images, live)
                except (DaemonFailed, RuntimeError, OSError) as exc:
                    self.note(f"{backend.name}: {step.action} of {step.target} failed: {exc}")
                    failed.add(step.target)

    def do(
        self,
        step: Step,
        backend: Backend,
        target: Target,
        images: dict[str, str],
        live: dict[str, Daemon],
    ) -> None:
        """Carry out one step of the backend's schedule."""
        name = target.name
        if step.action == IMAGE:
            self.make_target_image(backend, images, target)
        elif step.action == START:
            daemon = self.make_daemon(target, backend, images.get(name, ""), backend.name)
            live[name] = daemon  # stopped on the way out even if it fails to start
            daemon.start(self.opts.mount_timeout)
        elif step.action == STOP:
            live.pop(name).stop()
        elif step.action == FIO:
            job = next(j for j in self.opts.jobs if j.name == step.job)
            daemon = live.get(name)
            path = daemon.fio_path if daemon is not None else images[name]
            if target.export == "librbd":
                path = f"rbd:{POOL}/{path}"
            counters = daemon is not None and target.daemon == "qsd-py" and target.uring
            self.run_one(backend, job, step.round, name, path, daemon, counters)

    def run_one(
        self,
        backend: Backend,
        job: Job,
        rnd: int,
        target: str,
        path: str,
        daemon: Daemon | None,
        counters: bool = False,
    ) -> Sample:
        """One fio run; ``counters``: also take qsd-py's queue counters before and after."""
        o = self.opts
        run_name = f"{backend.name}-{job.name}-{target}-r{rnd}"
        out = o.out / "fio" / f"{run_name}.json"
        sample = Sample(backend.name, job.name, target, rnd)
        before = self.queue_counters(daemon) if counters and daemon is not None else None
        sampler = None
        if daemon is not None and job.tool == "nbdcopy":
            sampler = CpuSampler(daemon.pid, 0.0, None).start()  # the whole copy
        elif daemon is not None:
            sampler = CpuSampler(daemon.pid, o.ramp + 0.3, max(o.runtime - 0.6, o.runtime / 2))
            sampler.start()
        osd = self.osd_sampler(backend, job)
        env, client = {}, None
        if self.ceph is not None and path.startswith("rbd:"):
            env = {"CEPH_CONF": str(self.ceph.conf)}

        def fio_is_client(pid: int) -> None:  # no daemon: fio with librbd in it is the client
            nonlocal client
            client = CpuSampler(pid, o.ramp + 0.3, max(o.runtime - 0.6, o.runtime / 2)).start()

        try:
            if job.tool == "nbdcopy":
                fig = run_nbdcopy(job, path, self.nbdcopy_source(), timeout=600)
            else:
                argv = fio_command(job, path, o.runtime, o.ramp, str(out))
                started = fio_is_client if env else None
                proc = run_fio(argv, o.ramp + o.runtime + 120, env=env, started=started)
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"fio exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
                    )
                fig = parse_fio_json(load_fio_json(out))
        except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            for each in (sampler, osd, client):
                if each is not None:
                    each.cancel()
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
            sample.daemon_main_util = window.main_utilisation
            if fig.iops > 0:
                sample.daemon_cpu_us_per_io = window.utilisation / fig.iops * 1e6
        elif client is not None:
            sample.daemon_util = client.finish().utilisation  # fio's and librbd's threads
            if fig.iops > 0:
                sample.daemon_cpu_us_per_io = sample.daemon_util / fig.iops * 1e6
        if osd is not None:
            osd_util = osd.finish().utilisation
            if fig.iops > 0:
                sample.osd_cpu_us_per_io = osd_util / fig.iops * 1e6
        queues = ""
        if before is not None and daemon is not None:
            after = self.queue_counters(daemon)
            if after is not None:
                (o.out / "queues" / f"{run_name}.json").write_text(
                    json.dumps({"before": before, "after": after}, indent=1) + "\n"
                )
                queues = count_queues(sample, before, after)
        self.outcome.samples.append(sample)
        cpu = sample.daemon_cpu_us_per_io
        text = (
            f"{backend.name:21} {job.name:17} {target:17} r{rnd}: {fig.iops:9.0f} IOPS "
            f"{fig.mbps:7.1f} MB/s p99 {fig.lat_p99_us:8.1f} us"
        )
        if cpu == cpu:
            text += f"  daemon {cpu:6.1f} us/IO, {sample.daemon_util:.2f} cores"
            text += f" ({sample.daemon_main_util:.2f} in its first process)"
        if sample.osd_cpu_us_per_io == sample.osd_cpu_us_per_io:
            text += f"  OSD {sample.osd_cpu_us_per_io:6.1f} us/IO"
        say(text + queues)
        return sample

    def osd_sampler(self, backend: Backend, job: Job) -> CpuSampler | None:
        """The rbd backend's OSD, sampled over the same window as the daemon (None for
        other backends): the OSD shares this machine's CPUs with the client."""
        pid = self.ceph.osd_pid() if self.ceph is not None and backend.kind == "rbd" else None
        if pid is None:
            return None
        o = self.opts
        if job.tool == "nbdcopy":
            return CpuSampler(pid, 0.0, None).start()
        return CpuSampler(pid, o.ramp + 0.3, max(o.runtime - 0.6, o.runtime / 2)).start()

    def nbdcopy_source(self) -> str:
        """The file nbdcopy's write jobs copy onto an export (on tmpfs, made once)."""
        path = Path(NBDCOPY_SOURCE)
        if not path.exists():
            self.janitor.push(f"remove {path}", lambda: path.unlink(missing_ok=True))
            make_source(path)
        return str(path)

    def queue_counters(self, daemon: Daemon) -> list[dict] | None:
        """qsd-py's ``x-query-fuse-queues`` answer, or None (with a note) if it failed."""
        try:
            return qmp_command(daemon.qmp, "x-query-fuse-queues")
        except (OSError, QmpError, ValueError) as exc:
            self.note(f"x-query-fuse-queues on {daemon.qmp} failed: {exc}")
            return None

    def measure_startup(self, targets: list[Target]) -> None:
        """Time process start to a serving export, null-co backend, daemons alternated
        (libfuse's passthrough serves directories, not a null-co node: not timed)."""
        daemons = [t for t in targets if t.daemon in ("qsd-py", "qemu")]
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
        backends = self.usable_backends()
        say(f"about {estimate_s(self.opts, targets, backends) / 60:.1f} min")
        self.setup_workspace(backends)
        if self.opts.startup_runs > 0:
            self.measure_startup(targets)
        for backend in backends:
            self.run_backend(backend, targets)
        return self.outcome


def estimate_s(opts: Options, targets: list[Target], backends: list[Backend]) -> float:
    """Rough duration: fio runs, fresh images' restarts, image filling; start-up timing is
    negligible."""
    total = 0.0
    for b in backends:
        runs = opts.rounds * sum(
            applies(t, b) and job_applies(j, t) for t in targets for j in opts.jobs
        )
        per_run = opts.runtime + opts.ramp + 0.4 + (FRESH_EXTRA_S if b.fresh else 0.0)
        total += runs * per_run + (5 if b.kind == "file" and not b.fresh else 0)
    return total


def count_queues(sample: Sample, before: list[dict], after: list[dict]) -> str:
    """Put the io_uring queues' counters over the run into ``sample``; return them as text.

    Counters are cumulative, so the run's share is ``after`` less ``before``, queue by queue
    (matched by name)."""
    old = {q["name"]: q for export in before for q in export.get("uring-queues", [])}
    kinds: dict[str, None] = {}
    for export in after:
        for q in export.get("uring-queues", []):
            prev = old.get(q["name"], {})
            sample.queue_requests += q["requests"] - prev.get("requests", 0)
            sample.linked_reads += q.get("linked-reads", 0) - prev.get("linked-reads", 0)
            kinds[q.get("fast-path", "?")] = None
    sample.fast_path = ",".join(kinds)
    return (
        f"  queues: fast-path {sample.fast_path or '-'}, {sample.queue_requests} requests, "
        f"{sample.linked_reads} linked reads"
    )


def _stop_all(live: dict[str, Daemon]) -> None:
    while live:
        live.popitem()[1].stop()


def _remove(paths: Iterable[str]) -> None:
    for path in list(paths):
        Path(path).unlink(missing_ok=True)
