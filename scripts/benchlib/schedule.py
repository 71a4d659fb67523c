"""The order of one backend's work, as data: which image is made, which daemon started or
stopped, which fio run comes next.

Kept apart from the runner so the order can be checked without root, daemons or fio: every
target's runs interleave round by round (A/B/A/B...), and a fresh qcow2 image is never
measured twice (each fio run gets a new image and a daemon that opened it).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchlib.matrix import Backend, Job, Target, applies, job_applies

IMAGE = "image"  #: make the target's image (a fresh one, or a copy of the first)
START = "start"  #: start the target's daemon on its image
FIO = "fio"  #: one fio run of ``job``, round ``round``
STOP = "stop"  #: stop the target's daemon


@dataclass(frozen=True)
class Step:
    action: str
    target: str
    job: str = ""
    round: int = -1


def steps(backend: Backend, targets: list[Target], jobs: list[Job], rounds: int) -> list[Step]:
    """Everything the runner does for ``backend``, in order.

    Images that keep their state (raw, allocated qcow2) are made once per target and all
    daemons serve them at once for the whole backend. A fresh qcow2 image stops being fresh
    with the first write, so each fio run gets its own: new image, daemon started on it, fio,
    daemon stopped.

    The targets take turns, in reverse order every other round: a target that always ran
    first measured up to 18% below the same tree running second (an A/A run,
    docs/benchmarks.rst), so a fixed order biases every before/after.
    """
    targets = [t for t in targets if applies(t, backend)]
    runs = [
        (job, rnd, t)
        for job in jobs
        for rnd in range(rounds)
        for t in (targets if rnd % 2 == 0 else targets[::-1])
        if job_applies(job, t)
    ]
    if backend.fresh:
        return [step for job, rnd, t in runs for step in _one_run(t, job, rnd)]
    out = [Step(IMAGE, t.name) for t in targets] if backend.kind != "null" else []
    out += [Step(START, t.name) for t in targets if t.daemon is not None]
    out += [Step(FIO, t.name, job.name, rnd) for job, rnd, t in runs]
    out += [Step(STOP, t.name) for t in reversed(targets) if t.daemon is not None]
    return out


def _one_run(target: Target, job: Job, rnd: int) -> list[Step]:
    """A fio run on a new image, with a daemon that lives only for it."""
    fio = Step(FIO, target.name, job.name, rnd)
    if target.daemon is None:
        return [Step(IMAGE, target.name), fio]
    return [Step(IMAGE, target.name), Step(START, target.name), fio, Step(STOP, target.name)]
