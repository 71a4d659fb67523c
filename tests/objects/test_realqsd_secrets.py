"""Secret objects given on the command line to both daemons (optional: ``--real-qsd``): the
conversation of test_secrets.py as ``--object`` options, each failing case after the objects
made before it, with the same words from qsd-py as from QEMU's qemu-storage-daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realqsd_support import run_real, shared_dir
from support import run_qsd
from test_secrets import conversation

pytestmark = pytest.mark.realqsd


@pytest.fixture
def secrets_dir() -> Iterator[Path]:
    with shared_dir("secrets") as path:
        yield path


def option(props: dict[str, Any]) -> str:
    """``--object``'s keyval form of object-add's arguments."""
    parts = [props["qom-type"]]
    parts += [f"{k}={str(v).replace(',', ',,')}" for k, v in props.items() if k != "qom-type"]
    return ",".join(parts)


def test_object_errors_on_the_command_line(secrets_dir: Path) -> None:
    sec_file = secrets_dir / "sec.txt"
    sec_file.write_bytes(b"filesecret")
    made = ["--object", "iothread,id=io0"]
    compared = 0
    for props, text in conversation(sec_file):
        if text is None:
            made += ["--object", option(props)]
            continue
        if text.startswith("attempt to add duplicate"):
            continue  # a QMP-only case: on the command line QEMU names the option
        argv = [*made, "--object", option(props)]
        theirs_rc, theirs = run_real(argv)
        ours = run_qsd(argv)
        assert theirs_rc == 1, theirs
        assert ours.returncode == 1
        want = f"--object {option(props)}: {text}"
        assert theirs.strip() == f"qemu-storage-daemon: {want}"
        assert ours.stderr.strip() == f"qsd-py: {want}"
        compared += 1
    assert compared >= 12
