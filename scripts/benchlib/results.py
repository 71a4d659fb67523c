"""Samples, their medians, the ratios against the reference daemon (and, for qcow2, against
the raw image on the same storage), and the text/JSON outputs.

Pure data handling (no processes, no plotting) so it is tested on canned input and can
re-render the reports of an earlier run (``scripts/bench --report results.json``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FIGURES = (
    "iops",
    "mbps",
    "lat_mean_us",
    "lat_p99_us",
    "daemon_cpu_us_per_io",
    "daemon_util",
    "daemon_main_util",
    "fio_cpu_pct",
    "osd_cpu_us_per_io",
)

NAN = float("nan")


@dataclass
class Sample:
    """One fio run of one job against one target on one backend."""

    backend: str
    job: str
    target: str
    round: int
    iops: float = NAN
    mbps: float = NAN
    lat_mean_us: float = NAN
    lat_p99_us: float = NAN
    total_ios: int = 0
    daemon_cpu_us_per_io: float = NAN  # daemon CPU (utime+stime) per I/O; NaN: no daemon
    daemon_util: float = NAN  # daemon cores busy during the run
    daemon_main_util: float = NAN  # of which its first process (qsd-py: not its queue workers)
    fio_cpu_pct: float = NAN
    osd_cpu_us_per_io: float = NAN  # the rbd backend's OSD: its CPU per I/O of this run
    error: str = ""
    # qsd-py io_uring exports: its queues' counters over the run (x-query-fuse-queues)
    fast_path: str = ""  # the queues' fast-path kinds ("uring", "threads", "none"...)
    queue_requests: int = 0  # FUSE requests the io_uring queues took
    linked_reads: int = 0  # READs answered by a read SQE linked to the commit (fast path)


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else NAN


def summarise(samples: list[Sample]) -> list[dict]:
    """Median of every figure per (backend, job, target), in first-seen order; errors skipped."""
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.backend, s.job, s.target), []).append(s)
    summary = []
    for (backend, job, target), runs in groups.items():
        good = [r for r in runs if not r.error]
        row: dict = {"backend": backend, "job": job, "target": target, "n": len(good)}
        row["failed"] = len(runs) - len(good)
        for name in FIGURES:
            row[name] = _median([getattr(r, name) for r in good])
        summary.append(row)
    return summary


def ratios(summary: list[dict], reference: str, versus: dict[str, str] | None = None) -> list[dict]:
    """Per (backend, job): each target's median IOPS and CPU/IO over the reference target's.

    ``versus`` gives some targets their own reference (an NBD export against QEMU's NBD
    export); a target that is its own reference gets no ratio. ``iops_ratio`` > 1 means
    faster than the reference; ``cpu_ratio`` < 1 means cheaper.
    """
    by_key = {(r["backend"], r["job"], r["target"]): r for r in summary}
    out = []
    for row in summary:
        ref_name = (versus or {}).get(row["target"], reference)
        ref = by_key.get((row["backend"], row["job"], ref_name))
        if row["target"] == ref_name or ref is None:
            continue
        out.append(
            {
                "backend": row["backend"],
                "job": row["job"],
                "target": row["target"],
                "reference": ref_name,
                "iops_ratio": _div(row["iops"], ref["iops"]),
                "cpu_ratio": _div(row["daemon_cpu_us_per_io"], ref["daemon_cpu_us_per_io"]),
            }
        )
    return out


def raw_ratios(summary: list[dict], peers: dict[str, str]) -> list[dict]:
    """Per (backend, job, target) of a qcow2 backend: its median IOPS over the same target's on
    the same job on the raw backend of the same storage (``peers``: backend -> raw backend).

    What qcow2's mapping costs the daemon that serves it, in the same run: ``raw_ratio`` 1.0
    means as fast as the raw image. Rows whose raw counterpart was not measured are left out.
    """
    by_key = {(r["backend"], r["job"], r["target"]): r for r in summary}
    out = []
    for row in summary:
        peer = peers.get(row["backend"], "")
        raw = by_key.get((peer, row["job"], row["target"]))
        if raw is None:
            continue
        out.append(
            {
                "backend": row["backend"],
                "job": row["job"],
                "target": row["target"],
                "raw_backend": peer,
                "raw_ratio": _div(row["iops"], raw["iops"]),
            }
        )
    return out


def _div(a: float, b: float) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return NAN
    return a / b


def summarise_startup(runs: dict[str, list[float]]) -> dict[str, dict]:
    """Median (and spread) of the start-to-mounted times per target, in milliseconds."""
    return {
        target: {
            "runs_ms": [round(t * 1e3, 3) for t in times],
            "median_ms": _median([t * 1e3 for t in times]),
            "min_ms": min(times) * 1e3 if times else NAN,
            "max_ms": max(times) * 1e3 if times else NAN,
        }
        for target, times in runs.items()
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


COLUMNS = (
    ("backend", "backend", 21),  # qcow2-tmpfs-allocated
    ("job", "job", 16),
    ("target", "target", 17),
    ("iops", "IOPS", 9),
    ("mbps", "MB/s", 7),
    ("lat_mean_us", "lat us", 8),
    ("lat_p99_us", "p99 us", 8),
    ("daemon_cpu_us_per_io", "CPU us/IO", 9),
    ("daemon_util", "cores", 5),
    ("n", "n", 2),
)


def format_table(
    summary: list[dict],
    ratio_rows: list[dict],
    startup: dict[str, dict],
    reference: str,
    raw_rows: list[dict] | None = None,
) -> str:
    """The text table printed at the end of a run (and saved next to the JSON).

    With ``raw_rows`` (qcow2 backends and their raw ones measured), a last column ``x raw``
    gives each qcow2 row's IOPS over the raw image's, same target and job. When the rbd
    backend's OSD was sampled, a last column ``OSD us/IO`` gives its CPU per request."""
    by_key = {(r["backend"], r["job"], r["target"]): r for r in ratio_rows}
    raw_by_key = {(r["backend"], r["job"], r["target"]): r for r in raw_rows or []}
    header = [
        f"{title:>{w}}" if i > 2 else f"{title:<{w}}" for i, (_, title, w) in enumerate(COLUMNS)
    ]
    lines = ["  ".join(header) + f"  {'x ' + reference:>8}  {'CPU x':>6}"]
    if raw_by_key:
        lines[0] += f"  {'x raw':>6}"
    osd = any(_fmt(r.get("osd_cpu_us_per_io")) != "-" for r in summary)
    if osd:
        lines[0] += f"  {'OSD us/IO':>9}"
    previous = None
    for row in summary:
        if previous is not None and (row["backend"], row["job"]) != previous:
            lines.append("")
        previous = (row["backend"], row["job"])
        cells = []
        for i, (key, _, width) in enumerate(COLUMNS):
            value = row[key]
            if isinstance(value, str):
                text = value
            elif key == "n":  # good runs, then "!failed" when some runs failed
                text = f"{value}!{row['failed']}" if row.get("failed") else str(value)
            else:
                text = _fmt(value, 2 if key == "daemon_util" else 1)
            cells.append(f"{text:<{width}}" if i <= 2 else f"{text:>{width}}")
        rat = by_key.get((row["backend"], row["job"], row["target"]))
        ratio_text = _fmt(rat["iops_ratio"], 2) if rat else ""
        cpu_text = _fmt(rat["cpu_ratio"], 2) if rat else ""
        line = "  ".join(cells) + f"  {ratio_text:>8}  {cpu_text:>6}"
        if raw_by_key:
            raw = raw_by_key.get((row["backend"], row["job"], row["target"]))
            line += f"  {_fmt(raw['raw_ratio'], 2) if raw else '':>6}"
        if osd:
            line += f"  {_fmt(row.get('osd_cpu_us_per_io')):>9}"
        lines.append(line)
    if startup:
        lines += ["", "start-up, process start to mounted export (median, min-max, ms):"]
        for target, s in startup.items():
            lines.append(
                f"  {target:<17} {_fmt(s['median_ms'], 1):>8}   "
                f"({_fmt(s['min_ms'], 1)}-{_fmt(s['max_ms'], 1)}, n={len(s['runs_ms'])})"
            )
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _clean(value: object) -> object:
    """JSON has no NaN: write null instead, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(
    path: Path,
    meta: dict,
    startup: dict,
    samples: list[Sample],
    reference: str,
    peers: dict[str, str] | None = None,
    versus: dict[str, str] | None = None,
) -> dict:
    """Write the full results (raw samples included) and return the document written.

    ``peers`` maps qcow2 backends to their raw ones (``raw_ratios``); ``versus`` the targets
    with a reference of their own (:func:`ratios`)."""
    summary = summarise(samples)
    doc = {
        "meta": meta,
        "reference": reference,
        "startup": startup,
        "summary": summary,
        "ratios": ratios(summary, reference, versus),
        "raw_ratios": raw_ratios(summary, peers or {}),
        "samples": [asdict(s) for s in samples],
    }
    path.write_text(json.dumps(_clean(doc), indent=1) + "\n")
    return doc


def load_samples(doc: dict) -> list[Sample]:
    """Rebuild Sample objects from a results document (nulls back to NaN)."""
    names = {f.name for f in fields(Sample)}
    samples = []
    for raw in doc["samples"]:
        values = {k: (NAN if v is None else v) for k, v in raw.items() if k in names}
        samples.append(Sample(**values))
    return samples
