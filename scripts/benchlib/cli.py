"""``scripts/bench``: the command line, the run's metadata, and writing the three outputs."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchlib import matrix
from benchlib.cleanup import Janitor
from benchlib.fio import fio_version
from benchlib.plot import plot_ratios
from benchlib.results import (
    format_table,
    load_samples,
    raw_ratios,
    summarise,
    summarise_startup,
    write_json,
)
from benchlib.runner import Options, Runner, say
from benchlib.targets import REPO

QUICK = {"runtime": 2.0, "ramp": 1.0, "rounds": 2, "startup_runs": 3}
FULL = {"runtime": 8.0, "ramp": 2.0, "rounds": 2, "startup_runs": 5}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="fio matrix: bare file vs qsd-py (/dev/fuse, io_uring) vs QEMU's "
        "qemu-storage-daemon, interleaved; writes results.json, table.txt, ratios.png.",
    )
    p.add_argument("--quick", action="store_true", help="~2-minute subset for development")
    p.add_argument(
        "--targets",
        help=f"comma list (default: {','.join(matrix.DEFAULT_TARGETS)}; "
        f"all: {','.join(matrix.TARGETS)})",
    )
    p.add_argument("--backends", help=f"comma list of {','.join(matrix.BACKENDS)}")
    p.add_argument("--jobs", help=f"comma list of {','.join(matrix.JOBS)}")
    p.add_argument("--runtime", type=float, help="seconds measured per run (after the ramp)")
    p.add_argument("--ramp", type=float, help="seconds of unmeasured warm-up per run")
    p.add_argument("--rounds", type=int, help="runs per target and job (A/B/B/A rounds)")
    p.add_argument("--startup-runs", type=int, help="start-up timings per daemon (0: skip)")
    p.add_argument("--reference", default=matrix.REFERENCE_TARGET, help="target ratios divide by")
    p.add_argument(
        "--file-opts", default="", help="appended to both daemons' file node, e.g. ',aio=io_uring'"
    )
    p.add_argument("--python", default=sys.executable, help="interpreter that runs qsd_py")
    p.add_argument(
        "--baseline",
        type=Path,
        help="a qsd-py tree (e.g. a git worktree of an older commit) that the *-base targets run",
    )
    p.add_argument(
        "--note",
        default="",
        help="free text recorded with the results (e.g. 'machine busy with other work')",
    )
    p.add_argument("--out", type=Path, help="output directory (default bench-out/DATE-TIME)")
    p.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: re-render table and plot from an earlier results.json",
    )
    return p


def options(args: argparse.Namespace) -> Options:
    base = QUICK if args.quick else FULL

    def get(name: str) -> float:
        value = getattr(args, name)
        return base[name] if value is None else value

    backends = args.backends or (",".join(matrix.QUICK_BACKENDS) if args.quick else None)
    jobs = args.jobs or (",".join(matrix.QUICK_JOBS) if args.quick else None)
    out = args.out or REPO / "bench-out" / time.strftime("%Y%m%d-%H%M%S")
    targets = matrix.pick(args.targets, matrix.TARGETS, matrix.DEFAULT_TARGETS)
    # nbdcopy's jobs join the default set when an NBD export is measured.
    default_jobs = tuple(matrix.JOBS) if any(t.nbd for t in targets) else matrix.DEFAULT_JOBS
    return Options(
        targets=targets,
        backends=matrix.pick(backends, matrix.BACKENDS, matrix.DEFAULT_BACKENDS),
        jobs=matrix.pick(jobs, matrix.JOBS, default_jobs),
        runtime=get("runtime"),
        ramp=get("ramp"),
        rounds=int(get("rounds")),
        startup_runs=int(get("startup_runs")),
        out=out,
        file_opts=args.file_opts,
        python=args.python,
        baseline=args.baseline,
    )


def machine() -> dict:
    """What the figures depend on, recorded with them."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
    }


def git_rev() -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return out.stdout.strip()


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def render(doc: dict, out: Path) -> None:
    """Print and save the table, draw the plot, from a results document."""
    summary = summarise(load_samples(doc))
    startup = doc.get("startup", {})
    # Results written before qcow2 backends existed have no raw ratios: work them out.
    raw = doc.get("raw_ratios")
    if raw is None:
        raw = raw_ratios(summary, matrix.raw_peers())
    table = format_table(summary, doc["ratios"], startup, doc["reference"], raw)
    (out / "table.txt").write_text(table)
    print(table)
    meta = doc["meta"]
    title = f"{meta.get('date', '')}  {meta.get('note', '')}".strip()
    ratios = [
        {**r, "iops_ratio": float("nan") if r["iops_ratio"] is None else r["iops_ratio"]}
        for r in doc["ratios"]
    ]
    if plot_ratios(ratios, doc["reference"], title, out / "ratios.png"):
        say(f"plot: {out / 'ratios.png'}")
    else:
        say("no ratios to plot (reference target missing?)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.report:
        doc = json.loads(args.report.read_text())
        render(doc, args.report.parent)
        return 0
    if os.geteuid() != 0:
        say("needs root (FUSE mounts, chroot, umount, the enable_uring knob)")
        return 2
    try:
        opts = options(args)
    except ValueError as exc:
        say(str(exc))
        return 2
    say(f"output in {opts.out}")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine(),
        "fio": fio_version(),
        "qsd_py_rev": git_rev(),
        "loadavg_start": loadavg(),
        "options": {
            "runtime_s": opts.runtime,
            "ramp_s": opts.ramp,
            "rounds": opts.rounds,
            "startup_runs": opts.startup_runs,
            "file_opts": opts.file_opts,
            "targets": [t.name for t in opts.targets],
            "backends": [b.name for b in opts.backends],
            "jobs": {j.name: j.label for j in opts.jobs},
        },
    }
    status = 0
    with Janitor() as janitor:
        runner = Runner(opts, janitor)
        try:
            outcome = runner.run()
        except KeyboardInterrupt:
            say("interrupted: cleaning up, writing what was measured")
            outcome, status = runner.outcome, 130
    meta.update(
        loadavg_end=loadavg(), notes=outcome.notes, versions=outcome.versions, complete=status == 0
    )
    doc = write_json(
        opts.out / "results.json",
        meta,
        summarise_startup(outcome.startup),
        outcome.samples,
        args.reference,
        matrix.raw_peers(),
        matrix.versus(),
    )
    say(f"results: {opts.out / 'results.json'}")
    render(doc, opts.out)
    return status
