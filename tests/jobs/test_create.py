"""blockdev-create through a qsd-py daemon: QEMU 11.1's bytes, states and errors.

The table of option sets is create_cases.py; data/create.json is what QEMU 11.1's daemon
made of it (lengths and SHA-256 of every file, the job's states, its error). The images are
then checked by Debian's qemu-img and opened by qsd-py itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conversation import Daemon
from create_cases import QCOW2_CASES, RECORD, run_all

RECORDED = json.loads(RECORD.read_text())
GOOD = [name for name in QCOW2_CASES if RECORDED[name]["error"] is None]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Every case run once through qsd-py (about two seconds)."""
    workdir = tmp_path_factory.mktemp("create")
    return workdir, run_all(workdir, real=False)


def test_every_case_is_qemus(made: tuple[Path, dict[str, Any]]) -> None:
    _, got = made
    assert set(got) == set(RECORDED)
    differ = {name: (got[name], RECORDED[name]) for name in got if got[name] != RECORDED[name]}
    assert not differ


def test_states_of_a_create_job(made: tuple[Path, dict[str, Any]]) -> None:
    """Auto-finalized, dismissed by the user (the test's job-dismiss gives 'null')."""
    _, got = made
    ok = ["created", "running", "waiting", "pending", "concluded", "null"]
    failed = ["created", "running", "aborting", "concluded", "null"]
    assert got["default"]["states"] == ok and got["default"]["progress"] == [1, 1]
    assert got["err-size"]["states"] == failed and got["err-size"]["progress"] == [1, 1]


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        pytest.fail("qemu-img (Debian's qemu-utils) is needed by these tests")
    return path


@pytest.mark.parametrize("name", GOOD)
def test_qemu_img_check_and_info(made: tuple[Path, dict[str, Any]], name: str) -> None:
    workdir, _ = made
    img = workdir / f"{name}.qcow2"
    # Backing files named in the table do not exist: check the image alone.
    alone = {"driver": "qcow2", "file": {"driver": "file", "filename": str(img)}, "backing": None}
    check = subprocess.run(
        [_qemu_img(), "check", "-U", "--output=json", "json:" + json.dumps(alone)],
        capture_output=True,
        text=True,
        cwd=workdir,  # data files are named relative
    )
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["check-errors"] == 0 and report.get("leaks", 0) == 0
    info = subprocess.run(
        [_qemu_img(), "info", "-U", "--output=json", str(img)], capture_output=True, text=True
    )
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    opts = QCOW2_CASES[name]
    assert data["format"] == "qcow2" and data["virtual-size"] == opts["size"]
    assert data["cluster-size"] == opts.get("cluster-size", 65536)
    spec = data["format-specific"]["data"]
    assert spec["compat"] == ("0.10" if opts.get("version") == "v2" else "1.1")
    assert spec["refcount-bits"] == opts.get("refcount-bits", 16)
    if spec["compat"] == "1.1":
        assert spec["extended-l2"] == opts.get("extended-l2", False)
        assert spec["lazy-refcounts"] == opts.get("lazy-refcounts", False)
        assert spec["compression-type"] == opts.get("compression-type", "zlib")
    if opts.get("data-file"):
        assert spec["data-file"] == f"{name}.data"
        assert spec["data-file-raw"] == opts.get("data-file-raw", False)
    assert data.get("backing-filename") == opts.get("backing-file")
    assert data.get("backing-filename-format") == opts.get("backing-fmt")


def test_qsd_py_opens_what_it_created(made: tuple[Path, dict[str, Any]]) -> None:
    workdir, _ = made
    d = Daemon(workdir, real=False)
    try:
        for name in GOOD:
            opts = {
                "driver": "qcow2",
                "node-name": "n",
                "backing": None,
                "read-only": True,
                "file": {"driver": "file", "filename": f"{name}.qcow2"},
            }
            assert d.cmd("blockdev-add", opts) == {"return": {}}, name
            node = [n for n in d.cmd("query-named-block-nodes")["return"] if n["node-name"] == "n"]
            assert node[0]["image"]["virtual-size"] == QCOW2_CASES[name]["size"], name
            assert d.cmd("blockdev-del", {"node-name": "n"}) == {"return": {}}
    finally:
        d.close()


def test_command_errors(tmp_path: Path) -> None:
    """What blockdev-create refuses before any job exists (texts from QEMU 11.1)."""
    d = Daemon(tmp_path, real=False)
    try:

        def err(args: dict[str, Any]) -> str:
            return d.cmd("blockdev-create", args)["error"]["desc"]

        opts = {"driver": "file", "filename": "x.img", "size": 0}
        assert err({"job-id": "r", "options": {"driver": "raw"}}) == (
            "Driver does not support blockdev-create"
        )
        assert err({"job-id": "n", "options": {"driver": "null-co"}}) == (
            "Driver does not support blockdev-create"
        )
        assert err({"job-id": "1j", "options": opts}) == "Invalid job ID '1j'"
        assert err({"job-id": "", "options": opts}) == "Invalid job ID ''"
        assert d.cmd("blockdev-create", {"job-id": "j", "options": opts}) == {"return": {}}
        assert err({"job-id": "j", "options": opts}) == "Job ID 'j' already in use"
        d.settle("j")
        assert d.cmd("block-job-cancel", {"device": "j"})["error"] == {
            "class": "DeviceNotActive",
            "desc": "Block job 'j' not found",
        }
        assert d.cmd("query-block-jobs") == {"return": []}
    finally:
        d.close()


@pytest.mark.realqsd
def test_live_against_qemu(tmp_path: Path) -> None:
    """The whole table against both daemons, now (needs real-qsd)."""
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    with shared_dir("jobs-create-live") as work:
        real = run_all(work, real=True)
        ours = run_all(work, real=False)
    assert {k: v for k, v in ours.items() if v != real[k]} == {}


# One conversation about a create job, for both daemons: every verb on it once concluded,
# the block-job-* forms (a create job is no block job), ids, the dismissal.
VERBS_SCRIPT: list[list[Any]] = [
    [
        "blockdev-create",
        {"job-id": "j", "options": {"driver": "file", "filename": "a.img", "size": 1 << 20}},
    ],
    ["settle", "j"],
    ["query-jobs", None],
    [
        "blockdev-create",
        {"job-id": "j", "options": {"driver": "file", "filename": "b.img", "size": 0}},
    ],
    ["blockdev-create", {"job-id": "j-2.x_y", "options": {"driver": "raw"}}],
    *[
        [f"job-{verb}", {"id": "j"}]
        for verb in ("pause", "resume", "cancel", "complete", "finalize")
    ],
    *[[f"block-job-{verb}", {"device": "j"}] for verb in ("pause", "resume", "cancel", "complete")],
    ["block-job-set-speed", {"device": "j", "speed": 1}],
    ["block-job-finalize", {"id": "j"}],
    ["block-job-dismiss", {"id": "j"}],
    ["block-job-change", {"id": "j", "type": "create"}],
    ["query-block-jobs", None],
    ["job-dismiss", {"id": "j"}],
    ["job-dismiss", {"id": "j"}],
    ["query-jobs", None],
]


def test_verbs_on_a_create_job(tmp_path: Path) -> None:
    """qsd-py's side of the conversation, with the answers QEMU 11.1 gave."""
    from conversation import run

    d = Daemon(tmp_path, real=False)
    try:
        got = run(d, VERBS_SCRIPT)
    finally:
        d.close()
    replies = [e["reply"] for e in got if "reply" in e]
    verb_err = "Job 'j' in state 'concluded' cannot accept command verb '{}'"
    assert replies[1:] == [
        {
            "return": [
                {
                    "id": "j",
                    "type": "create",
                    "status": "concluded",
                    "current-progress": 1,
                    "total-progress": 1,
                }
            ]
        },
        {"error": {"class": "GenericError", "desc": "Job ID 'j' already in use"}},
        {"error": {"class": "GenericError", "desc": "Driver does not support blockdev-create"}},
        {"error": {"class": "GenericError", "desc": verb_err.format("pause")}},
        {"error": {"class": "GenericError", "desc": "Can't resume a job that was not paused"}},
        {"error": {"class": "GenericError", "desc": verb_err.format("cancel")}},
        {"error": {"class": "GenericError", "desc": verb_err.format("complete")}},
        {"error": {"class": "GenericError", "desc": verb_err.format("finalize")}},
        *[{"error": {"class": "DeviceNotActive", "desc": "Block job 'j' not found"}}] * 8,
        {"return": []},
        {"return": {}},
        {"error": {"class": "GenericError", "desc": "Job not found"}},
        {"return": []},
    ]


@pytest.mark.realqsd
def test_verbs_on_a_create_job_live(tmp_path: Path) -> None:
    """The same conversation against both daemons: the same replies and events."""
    from conversation import run
    from realqsd_support import require_real_qsd, shared_dir

    require_real_qsd()
    out = []
    with shared_dir("jobs-verbs") as workdir:
        for real in (True, False):
            for old in workdir.iterdir():
                old.unlink()
            d = Daemon(workdir, real=real)
            try:
                out.append(run(d, VERBS_SCRIPT))
            finally:
                d.close()
    assert out[1] == out[0]
