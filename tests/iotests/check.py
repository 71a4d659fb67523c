"""Runner of qsd-py's iotests (``scripts/iotests`` calls it; ``test_iotests.py`` imports it).

Each scenario is a Python script in this directory named ``NNN`` or a name without a dot,
with a ``# group: ...`` line and a reference output ``<name>.out``. The runner runs it in a
fresh scratch directory, compares its output with the reference, shows a unified diff on a
mismatch and writes the output to ``<name>.out.bad`` (``<name>.io_uring.out.bad`` for the
io_uring run). A scenario that leaves a FUSE mount behind fails too.

Groups: ``fuse`` scenarios run over each transport asked for (``-io_uring`` adds the io_uring
run, switching the kernel's ``enable_uring`` knob on and restoring it afterwards);
``qsd-py-only`` scenarios test what QEMU has not got and are left out of ``--real-qsd`` runs.

``--real-qsd`` runs the scenarios against QEMU 11.1's own daemon in the chroot of
``../shared/tools/real-qsd`` (never in CI): that is how the reference outputs were checked.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
URING_KNOB = Path("/sys/module/fuse/parameters/enable_uring")
# The main checkout has ../shared beside it; a worktree under /work/wt finds the same tool in
# /work/shared (the same candidates as tests/realqsd_support.py).
REAL_QSD_CANDIDATES = (
    REPO.parent / "shared" / "tools" / "real-qsd",
    Path("/work/shared/tools/real-qsd"),
)
REAL_QSD = next((p for p in REAL_QSD_CANDIDATES if p.exists()), REAL_QSD_CANDIDATES[0])
REAL_SHARE = Path("/tmp/qsd-cmp/qsd-iotests")
TIMEOUT = 120.0
TRANSPORTS = ("fuse", "io_uring")


@dataclass
class Scenario:
    name: str
    path: Path
    groups: list[str] = field(default_factory=list)

    @property
    def reference(self) -> Path:
        return self.path.with_name(self.name + ".out")

    @property
    def is_fuse(self) -> bool:
        return "fuse" in self.groups


@dataclass
class Result:
    scenario: Scenario
    transport: str
    passed: bool
    output: str
    diff: str
    seconds: float


def discover() -> list[Scenario]:
    """Every scenario in this directory: numbered ones first, then named ones."""
    found = []
    for p in sorted(HERE.iterdir()):
        if p.is_file() and "." not in p.name and p.name != "README":
            found.append(Scenario(p.name, p, read_groups(p)))
    return sorted(found, key=lambda s: (not s.name.isdigit(), s.name))


def read_groups(p: Path) -> list[str]:
    for line in p.read_text().splitlines()[:10]:
        if line.startswith("# group:"):
            return line.split(":", 1)[1].split()
    return []


def select(names: list[str], groups: list[str], exclude: list[str]) -> list[Scenario]:
    """The scenarios named or in one of the groups (all when neither is given)."""
    every = discover()
    unknown = set(names) - {s.name for s in every}
    if unknown:
        raise SystemExit(f"no such iotest: {', '.join(sorted(unknown))}")
    if names or groups:
        every = [s for s in every if s.name in names or set(groups) & set(s.groups)]
    return [s for s in every if not set(exclude) & set(s.groups)]


def leftover_mounts(prefix: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4].encode().decode("unicode_escape")
            if fields[fields.index("-") + 1].startswith("fuse") and mnt.startswith(prefix + "/"):
                found.append(mnt)
    return found


def scenario_env(test_dir: str, transport: str, qsd_prog: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["QSD_IOTESTS_TEST_DIR"] = test_dir
    env["QSD_IOTESTS_TRANSPORT"] = transport
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if qsd_prog:
        env["QSD_IOTESTS_QSD_PROG"] = qsd_prog
    return env


def run_scenario(scenario: Scenario, transport: str = "fuse", real: bool = False) -> Result:
    """Run one scenario over one transport and compare its output with the reference."""
    start = time.monotonic()
    base = REAL_SHARE if real else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    test_dir = os.path.realpath(tempfile.mkdtemp(prefix=f"{scenario.name}-", dir=base))
    try:
        if real:
            argv = real_argv(scenario, test_dir)
        else:
            argv = [sys.executable, str(scenario.path)]
        env = scenario_env(test_dir, transport, None)
        try:
            proc = subprocess.run(
                argv,
                env=env,
                cwd=test_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=TIMEOUT,
            )
            output = proc.stdout.replace(test_dir, "TEST_DIR")
        except subprocess.TimeoutExpired as exp:
            out = exp.stdout or ""
            output = (out.decode() if isinstance(out, bytes) else out) + "[timed out]\n"
        leaked = leftover_mounts(host_path(test_dir) if real else test_dir)
        for mnt in reversed(leaked):
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        if leaked:
            output += f"[scenario left {len(leaked)} FUSE mount(s) behind]\n"
    finally:
        shutil.rmtree(test_dir, ignore_errors=True)
    return compare(scenario, transport, output, time.monotonic() - start)


def compare(scenario: Scenario, transport: str, output: str, seconds: float) -> Result:
    expected = scenario.reference.read_text() if scenario.reference.exists() else ""
    suffix = ".out.bad" if transport == "fuse" else f".{transport}.out.bad"
    bad = scenario.path.with_name(scenario.name + suffix)
    if output == expected:
        bad.unlink(missing_ok=True)
        return Result(scenario, transport, True, output, "", seconds)
    bad.write_text(output)
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            output.splitlines(keepends=True),
            fromfile=str(scenario.reference.relative_to(REPO)),
            tofile=str(bad.relative_to(REPO)),
        )
    )
    return Result(scenario, transport, False, output, diff, seconds)


# --- QEMU's own daemon (../shared/tools/real-qsd) ------------------------------------------


def host_path(p: str) -> str:
    """Where a path inside the real-qsd chroot (and the mounts made there) shows on the host."""
    out = subprocess.run([str(REAL_QSD), "host-path", p], capture_output=True, text=True)
    return out.stdout.strip()


def stage_for_real() -> Path:
    """Copy the harness, the scenarios and qemu.qmp where the chroot sees them."""
    import qemu.qmp

    lib = REAL_SHARE / "lib"
    shutil.rmtree(lib, ignore_errors=True)
    shutil.copytree(HERE, lib, ignore=shutil.ignore_patterns("*.bad", "__pycache__"))
    qemu_pkg = Path(qemu.qmp.__file__).resolve().parents[1]
    shutil.copytree(qemu_pkg, lib / "qemu", ignore=shutil.ignore_patterns("__pycache__"))
    return lib


def real_argv(scenario: Scenario, test_dir: str) -> list[str]:
    lib = REAL_SHARE / "lib"
    return [
        str(REAL_QSD),
        "run",
        "env",
        f"QSD_IOTESTS_TEST_DIR={test_dir}",
        "QSD_IOTESTS_TRANSPORT=fuse",
        "QSD_IOTESTS_QSD_PROG=qemu-storage-daemon",
        f"PYTHONPATH={lib}",
        "python3",
        str(lib / scenario.name),
    ]


# --- the io_uring knob -----------------------------------------------------------------------


class UringKnob:
    """Switch FUSE-over-io_uring on for the io_uring runs and put the knob back as found."""

    def __init__(self) -> None:
        self.before: str | None = None

    def __enter__(self) -> UringKnob:
        if not URING_KNOB.exists():
            raise SystemExit(f"-io_uring: this kernel has no {URING_KNOB}")
        self.before = URING_KNOB.read_text().strip()
        URING_KNOB.write_text("Y")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            URING_KNOB.write_text(self.before)


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/iotests",
        description="Run qsd-py's iotests: all, some by name, or by group.",
    )
    ap.add_argument("tests", nargs="*", help="scenario names (default: all)")
    ap.add_argument("-g", "--group", action="append", default=[], help="run this group")
    ap.add_argument("-x", "--exclude", action="append", default=[], help="leave out this group")
    ap.add_argument(
        "-io_uring",
        "--io_uring",
        action="store_true",
        dest="io_uring",
        help="run every FUSE scenario over io_uring too",
    )
    ap.add_argument(
        "--real-qsd",
        action="store_true",
        help="run against QEMU's daemon in the real-qsd chroot (checks references)",
    )
    ap.add_argument("-l", "--list", action="store_true", help="list scenarios and groups")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exclude = args.exclude + (["qsd-py-only"] if args.real_qsd else [])
    scenarios = select(args.tests, args.group, exclude)
    if args.list:
        for s in scenarios:
            print(f"{s.name:24} {' '.join(s.groups)}")
        return 0
    if args.real_qsd:
        stage_for_real()
    runs = [(s, "fuse") for s in scenarios]
    if args.io_uring and not args.real_qsd:
        runs += [(s, "io_uring") for s in scenarios if s.is_fuse]
    failed = []
    knob = UringKnob() if any(t == "io_uring" for _, t in runs) else None
    try:
        if knob:
            knob.__enter__()
        for scenario, transport in runs:
            label = scenario.name + ("" if transport == "fuse" else " [io_uring]")
            print(f"{label:32}", end="", flush=True)
            result = run_scenario(scenario, transport, real=args.real_qsd)
            print(f"{'pass' if result.passed else 'FAIL'}  [{result.seconds:.1f}s]", flush=True)
            if not result.passed:
                print(result.diff, end="")
                failed.append(label)
    finally:
        if knob:
            knob.__exit__()
    if failed:
        print(f"Failures: {' '.join(failed)}")
        print(f"Failed {len(failed)} of {len(runs)} iotests")
        return 1
    print(f"Passed all {len(runs)} iotests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
