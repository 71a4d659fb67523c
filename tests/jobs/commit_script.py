"""The block-commit and change-backing-file conversation both daemons are held to
(tests/jobs/test_commit.py), on chains base <- mid <- top made with qemu-img/qemu-io (one of
them with its base's writes failing through blkdebug); normalised as mirror_script does, the
images' backing file names (as qemu-img reads them) appended.
``python commit_script.py`` records QEMU 11.1's transcript into data/commit_events.json."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "commit_events.json"
IMAGES = ("base", "mid", "top", "ebase", "emid", "etop", "rbase", "rmid", "rtop", "small")
IMAGES += ("pmid", "ptop")  # over pbase.raw, a protocol node as base
IMAGES += ("wbase", "wmid", "wtop")
IMAGES += ("cbase", "cmid", "ctop")  # opened from the command line, the chain from headers


def make_chains(workdir: Path) -> None:
    """base (0-512K: 1s) <- mid (256K-512K: 2s) <- top (768K-832K: 3s), 1 MiB each; the
    same again as ebase <- emid <- etop and rbase <- rmid <- rtop; small: a lone 512 KiB
    image."""

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=workdir)

    for name in IMAGES:
        (workdir / f"{name}.qcow2").unlink(missing_ok=True)
    for p in ("", "e", "r", "w", "c"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", f"{p}base.qcow2", "1M")
        sh("qemu-io", "-c", "write -P 1 0 512k", f"{p}base.qcow2")
        for name, below, write in (("mid", "base", "2 256k 256k"), ("top", "mid", "3 768k 64k")):
            img, back = f"{p}{name}.qcow2", f"{p}{below}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img)
            sh("qemu-io", "-c", f"write -P {write}", img)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "small.qcow2", "512k")
    (workdir / "pbase.raw").unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "raw", "pbase.raw", "1M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "pbase.raw", "-F", "raw", "pmid.qcow2")
    sh("qemu-io", "-c", "write -P 9 0 64k", "pmid.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "pmid.qcow2", "-F", "qcow2", "ptop.qcow2")


def _q(name: str, backing: str | None = None, file: Any = None) -> list[Any]:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": name,
        "file": file or {"driver": "file", "filename": f"{name}.qcow2"},
    }
    if backing is not None:
        opts["backing"] = backing
    return ["blockdev-add", opts]


def _c(**args: Any) -> list[Any]:
    return ["block-commit", {k.replace("_", "-"): v for k, v in args.items()}]


def _failing(name: str) -> dict[str, Any]:
    """A file whose first write fails with EIO (blkdebug's default errno, once)."""
    rule = {"event": "write_aio", "once": True}
    return {
        "driver": "blkdebug",
        "inject-error": [rule],
        "image": {"driver": "file", "filename": f"{name}.qcow2"},
    }


ERRORS: list[list[Any]] = [
    _c(job_id="c", device="nope"),
    _c(job_id="c", device="mid"),
    _c(job_id="c", device="base"),
    _c(job_id="c", device="top", top="x", top_node="mid"),
    _c(job_id="c", device="top", top_node="nope"),
    _c(job_id="c", device="top", top_node="small"),
    _c(job_id="c", device="top", top="nope.qcow2"),
    _c(job_id="c", device="top", base="x", base_node="base"),
    _c(job_id="c", device="top", base_node="nope"),
    _c(job_id="c", device="top", base_node="small"),
    _c(job_id="c", device="top", base="nope.qcow2"),
    _c(job_id="c", device="top", top_node="base"),
    _c(job_id="c", device="top", top_node="mid", base_node="mid"),
    _c(job_id="c", device="top", top_node="base", base_node="mid"),
    _c(job_id="c", device="top", base_node="top"),
    _c(job_id="c", device="top", backing_file="x"),
    _c(job_id="c", device="top", top_node="mid", speed=-1),
    _c(job_id="c", device="top", speed=-1),
    _c(device="top", top_node="mid"),
    _c(device="top"),
    _c(job_id="c", device="top", top="mid.qcow2", base="base.qcow2", filter_node_name="top"),
    _c(job_id="c", device="top", filter_node_name="top"),
    ["change-backing-file", {"device": "nope", "image-node-name": "mid", "backing-file": "x"}],
    ["change-backing-file", {"device": "top", "image-node-name": "nope", "backing-file": "x"}],
    ["change-backing-file", {"device": "top", "image-node-name": "small", "backing-file": "x"}],
    ["change-backing-file", {"device": "mid", "image-node-name": "mid", "backing-file": "x"}],
    ["change-backing-file", {"device": "top", "image-node-name": "emid", "backing-file": "x"}],
]

JOBS: list[list[Any]] = [
    # an intermediate commit held back by its speed: what it blocks, pause, resume, cancel
    _c(job_id="c1", device="top", top_node="mid", speed=1),
    ["query-block-jobs", {}],
    ["block-job-change", {"id": "c1", "type": "mirror", "copy-mode": "write-blocking"}],
    ["block-job-change", {"id": "c1", "type": "commit"}],
    ["block-job-set-speed", {"device": "c1", "speed": -1}],
    ["block-job-complete", {"device": "c1"}],
    _c(job_id="c2", device="top"),
    ["block-stream", {"job-id": "s", "device": "top"}],
    ["blockdev-del", {"node-name": "mid"}],
    ["blockdev-del", {"node-name": "base"}],
    ["change-backing-file", {"device": "top", "image-node-name": "mid", "backing-file": "x"}],
    ["block-job-pause", {"device": "c1"}],
    ["settle", "c1"],
    ["block-job-cancel", {"device": "c1"}],
    ["block-job-resume", {"device": "c1"}],
    ["until", ["c1", "running"]],
    ["block-job-cancel", {"device": "c1"}],
    ["settle-gone", "c1"],
    # the same to its end, finalized and dismissed by hand
    _c(job_id="c1", device="top", top_node="mid", auto_finalize=False, auto_dismiss=False),
    ["settle", "c1"],
    ["query-block-jobs", {}],
    ["job-finalize", {"id": "c1"}],
    ["settle", "c1"],
    ["job-dismiss", {"id": "c1"}],
    ["blockdev-del", {"node-name": "mid"}],
    # active commit: ready, then pivot on complete
    _c(job_id="a", device="top"),
    ["settle", "a"],
    ["block-job-change", {"id": "a", "type": "mirror", "copy-mode": "write-blocking"}],
    ["block-job-set-speed", {"device": "a", "speed": 100}],
    ["query-block-jobs", {}],
    _c(job_id="a2", device="top"),
    ["blockdev-del", {"node-name": "base"}],
    ["block-job-complete", {"device": "a"}],
    ["settle-past-ready", "a"],
    ["change-backing-file", {"device": "top", "image-node-name": "top", "backing-file": "f.qcow2"}],
    # errors on the base: stop (then resume: the write is tried again), report
    _c(job_id="e1", device="etop", top_node="emid", on_error="stop"),
    ["settle", "e1"],
    ["query-block-jobs", {}],
    ["block-job-resume", {"device": "e1"}],
    ["settle-gone", "e1"],
    ["blockdev-del", {"node-name": "etop"}],
    ["blockdev-del", {"node-name": "emid"}],
    ["blockdev-del", {"node-name": "ebase"}],
    _q("ebase", file=_failing("ebase")),
    _q("emid", "ebase"),
    _q("etop", "emid"),
    _c(job_id="e2", device="etop", top_node="emid"),
    ["settle-gone", "e2"],
    # an active commit whose base fails once: ignore goes on
    _c(job_id="e3", device="etop", on_error="ignore"),
    ["settle", "e3"],
    ["block-job-cancel", {"device": "e3"}],
    ["settle-past-ready", "e3"],
    ["change-backing-file", {"device": "etop", "image-node-name": "emid", "backing-file": ""}],
]


def _ro(name: str, backing: str | None = None) -> list[Any]:
    cmd = _q(name, backing)
    cmd[1]["read-only"] = True
    return cmd


# a read-only base (as libvirt opens backing images) is made writable for the job and
# read-only again after it, unless an active commit pivoted onto it; likewise a read-only
# image for change-backing-file
READ_ONLY: list[list[Any]] = [
    _ro("rbase"),
    _ro("rmid", "rbase"),
    _q("rtop", "rmid"),
    _c(job_id="r1", device="rtop", top_node="rmid", speed=1),
    ["ro", ["rbase", "rmid", "rtop"]],
    ["block-job-cancel", {"device": "r1"}],
    ["settle-gone", "r1"],
    ["ro", ["rbase", "rmid", "rtop"]],
    ["change-backing-file", {"device": "rtop", "image-node-name": "rmid", "backing-file": "b"}],
    ["ro", ["rbase", "rmid", "rtop"]],
    _c(job_id="r2", device="rtop", speed=1),
    ["ro", ["rbase", "rmid", "rtop"]],
    ["block-job-cancel", {"device": "r2", "force": True}],
    ["settle-gone", "r2"],
    ["ro", ["rbase", "rmid", "rtop"]],
    _c(job_id="r5", device="rtop"),
    ["settle", "r5"],
    ["block-job-cancel", {"device": "r5"}],
    ["settle-gone", "r5"],
    ["ro", ["rbase", "rmid", "rtop"]],
    _c(job_id="r3", device="rtop", top_node="rmid"),
    ["settle-gone", "r3"],
    ["ro", ["rbase", "rmid", "rtop"]],
    _c(job_id="r4", device="rtop"),
    ["settle", "r4"],
    ["block-job-complete", {"device": "r4"}],
    ["settle-past-ready", "r4"],
    ["ro", ["rbase", "rmid", "rtop"]],
]

# a protocol node as base: backing-mask-protocol records its format as raw
PROTOCOL: list[list[Any]] = [
    ["blockdev-add", {"driver": "file", "node-name": "pbase", "filename": "pbase.raw"}],
    _q("pmid", "pbase"),
    _q("ptop", "pmid"),
    _c(job_id="p", device="ptop", top_node="pmid", backing_mask_protocol=True),
    ["settle-gone", "p"],
]

# a writer on an intermediate top makes the commit active: ready, then its users (the
# export, top's backing link) move to the base; top's image keeps naming wmid
WRITER: list[list[Any]] = [
    _q("wbase"),
    _q("wmid", "wbase"),
    _q("wtop", "wmid"),
    ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}],
    [
        "block-export-add",
        {"type": "nbd", "id": "w", "node-name": "wmid", "name": "w", "writable": True},
    ],
    _c(job_id="w1", device="wtop", top_node="wmid", backing_file="x"),
    _c(job_id="w1", device="wtop", top_node="wmid"),
    ["settle", "w1"],
    ["query-block-jobs", {}],
    ["block-job-complete", {"device": "w1"}],
    ["settle-past-ready", "w1"],
    ["query-block-exports", {}],
    ["blockdev-del", {"node-name": "wmid"}],
    ["block-export-del", {"id": "w"}],
    ["nbd-server-stop", {}],
]

SCRIPT: list[list[Any]] = [
    _q("base"),
    _q("mid", "base"),
    _q("top", "mid"),
    _q("small"),
    _q("ebase", file=_failing("ebase")),
    _q("emid", "ebase"),
    _q("etop", "emid"),
    *ERRORS,
    *JOBS,
    *READ_ONLY,
    *PROTOCOL,
    *WRITER,
]


def backing_names(workdir: Path) -> dict[str, Any]:
    """What qemu-img reads as each image's backing file name and format, whether its check
    is clean, and a digest of the data the image holds itself (its backing left out)."""
    out = {}
    for name in IMAGES:
        img = f"{name}.qcow2"
        info = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", img],
            check=True,
            capture_output=True,
            cwd=workdir,
        )
        got = json.loads(info.stdout)
        alone = "json:" + json.dumps(
            {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": img}}
        )
        check = subprocess.run(["qemu-img", "check", alone], capture_output=True, cwd=workdir)
        raw = workdir / f"{name}.own"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", alone, str(raw)], check=True, cwd=workdir
        )
        digest = hashlib.sha256(raw.read_bytes()).hexdigest()
        raw.unlink()
        out[name] = [
            got.get("backing-filename"),
            got.get("backing-filename-format"),
            check.returncode,
            digest,
        ]
    return out


def _run(daemon: Any, script: list[list[Any]]) -> list[Any]:
    """conversation.run, plus ``["until", [job, status]]``: wait until the job shows the
    status (QEMU's resume runs the job up to its next yield before replying; qsd-py's job
    runs on the loop's next turn), then collect the events; and ``["ro", names]``: which of
    these nodes are read-only."""
    from conversation import run

    out: list[Any] = []
    for entry in script:
        if entry[0] == "nodes":
            out.append(_nodes(daemon, entry[1]))
            continue
        if entry[0] == "ro":  # which of the named nodes are read-only
            nodes = daemon.cmd("query-named-block-nodes", {"flat": True})["return"]
            out.append(
                {"ro": {n["node-name"]: n["ro"] for n in nodes if n["node-name"] in entry[1]}}
            )
            continue
        if entry[0] != "until":
            out += run(daemon, [entry])
            continue
        job, status = entry[1]
        deadline = time.monotonic() + 20
        while not any(
            j["id"] == job and j["status"] == status for j in daemon.cmd("query-jobs")["return"]
        ):
            assert time.monotonic() < deadline, f"{job} never {status}"
            time.sleep(0.002)
        out.append({"events": daemon.events()})
    return out


# QEMU's qsd-jobs iotest's setting: the top given on the command line, its chain opened from
# the images' headers (implicit, read-only nodes): an intermediate commit by file name
# (cancelled, then to its end: the implicit mid goes away), then an active commit
CLI_ARGS = [
    "--blockdev",
    "node-name=file0,driver=file,filename=ctop.qcow2",
    "--blockdev",
    "node-name=fmt0,driver=qcow2,file=file0",
]
CLI: list[list[Any]] = [
    ["nodes", 6],
    _c(job_id="j1", device="fmt0", top="cmid.qcow2", speed=1),
    ["nodes", 0],
    ["block-job-cancel", {"device": "j1"}],
    ["settle-gone", "j1"],
    _c(job_id="j2", device="fmt0", top="cmid.qcow2"),
    ["settle-gone", "j2"],
    ["nodes", 0],
    _c(job_id="j3", device="fmt0"),
    ["settle", "j3"],
    ["nodes", 0],
    ["block-job-complete", {"device": "j3"}],
    ["settle-past-ready", "j3"],
    ["nodes", 0],
]


def _nodes(daemon: Any, wait_for: int) -> dict[str, Any]:
    """The nodes as (file name, driver, read-only), filter nodes left out (qsd-py inserts
    none); first waiting until there are ``wait_for`` (qsd-py answers QMP while the command
    line's nodes still open, QEMU only after)."""
    deadline = time.monotonic() + 20
    while True:
        nodes = daemon.cmd("query-named-block-nodes", {"flat": True})["return"]
        if len(nodes) >= wait_for or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    got = [
        [n["file"], n["drv"], n["ro"]]
        for n in nodes
        if n["drv"] not in ("commit_top", "mirror_top")
    ]
    return {"nodes": sorted(got)}


def _normalised(entries: list[Any]) -> list[Any]:
    """mirror_script's normalisation of replies and events; the ``ro``/``nodes`` records
    as they are."""
    from mirror_script import normalise

    return [e for x in entries for e in (normalise([x]) if "cmd" in x or "events" in x else [x])]


def run_script(real: bool, workdir: Path) -> list[Any]:
    from conversation import Daemon

    make_chains(workdir)
    daemon = Daemon(workdir, real)
    try:
        out = _normalised(_run(daemon, SCRIPT))
    finally:
        daemon.close()
    daemon = Daemon(workdir, real, CLI_ARGS)
    try:
        out += _normalised(_run(daemon, CLI))
    finally:
        daemon.close()
    return [*out, {"backing": backing_names(workdir)}]


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from conversation import record

    record(run_script, DATA, "commit")
