"""The PNG: each target's IOPS over the reference daemon's, per job, one panel per backend.

Ratios, not absolute numbers, because the machine changes and the comparison is what the
project promises (qsd-py io_uring >= 1.5x QEMU's daemon on every job and backend).
"""

from __future__ import annotations

import math
from pathlib import Path

GOAL = 1.5  # issue 5's target for qsd-py with io_uring against QEMU's daemon


def plot_ratios(
    ratio_rows: list[dict],
    reference: str,
    title: str,
    path: Path,
    skip: tuple[str, ...] = ("file",),
) -> bool:
    """Draw grouped bars of ``iops_ratio``; returns False (and draws nothing) without data.

    The bare file (``skip``) is left out: it is many times faster than any FUSE export and
    would flatten the bars that matter; its ratio stays in the table.
    """
    rows = [r for r in ratio_rows if r["target"] not in skip and _number(r["iops_ratio"])]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(len(backends), 1, figsize=(10, 3.2 * len(backends)), squeeze=False)
    width = 0.8 / len(targets)
    for ax, backend in zip(axes[:, 0], backends, strict=True):
        mine = [r for r in rows if r["backend"] == backend]
        jobs = list(dict.fromkeys(r["job"] for r in mine))
        for t_index, target in enumerate(targets):
            value = {r["job"]: r["iops_ratio"] for r in mine if r["target"] == target}
            offset = (t_index - (len(targets) - 1) / 2) * width
            xs = [j + offset for j, job in enumerate(jobs) if job in value]
            heights = [value[job] for job in jobs if job in value]
            bars = ax.bar(xs, heights, width, label=target, color=f"C{t_index}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(GOAL, color="red", linestyle="--", linewidth=0.8, label=f"goal {GOAL}x")
        ax.set_xticks(range(len(jobs)), jobs, fontsize=8)
        ax.set_ylabel(f"IOPS / {reference}")
        ax.set_ylim(0, max(GOAL, *(r["iops_ratio"] for r in mine)) * 1.15)
        ax.set_title(backend, fontsize=10, loc="left")
    axes[0, 0].legend(fontsize=8, ncol=min(len(targets) + 1, 4), loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _number(value: float | None) -> bool:
    return value is not None and not math.isnan(value)
