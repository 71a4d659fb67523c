"""The ``qsd-py`` command: qemu-storage-daemon's command line, applied in order.

Options are applied one by one as QEMU does, through the same code paths as their QMP
commands (``--blockdev`` is ``blockdev-add``, ``--export`` is ``block-export-add``,
``--object`` is ``object-add``). When an option fails, what earlier options set up is torn
down again (QEMU leaves its FUSE mounts dead behind it; we unmount them) and we exit 1.
The pidfile is written once everything is up, since test harnesses wait for it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any

PROG = "qsd-py"


def error(message: str) -> None:
    """Print an error line in QEMU's format."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class StartupError(Exception):
    """An option failed; the message is already in QEMU's ``<option>: <desc>`` form."""


async def apply_option(daemon: Any, opt: Any) -> None:
    """Apply one parsed command-line option to the daemon."""
    from qsd_py.cli.options import convert_option
    from qsd_py.errors import QMPError

    try:
        if opt.name == "argument":
            raise StartupError(f"{opt.arg}: Unexpected argument")
        command, args = convert_option(daemon.schema, opt.name, opt.arg)
        if command is not None:
            await daemon.execute(command, args, from_cli=True)
        elif opt.name == "chardev":
            await add_chardev(daemon, args)
        elif opt.name == "monitor":
            await add_monitor(daemon, args)
        elif opt.name == "nbd-server":
            from qsd_py.export.nbd.server import start_server

            await start_server(daemon, args, from_monitor=False)
    except QMPError as err:
        hint = f"\n{err.hint}" if err.hint else ""
        raise StartupError(f"{opt.given}: {err.desc}{hint}") from err


async def add_chardev(daemon: Any, args: dict[str, Any]) -> None:
    from qsd_py.errors import QMPError
    from qsd_py.qmp.chardev import create_chardev

    if daemon.chardevs.find(args["id"]) is not None:
        # QEMU 11.1 says "duplicate yank instance" here, an internal detail;
        # QemuOpts' own wording says what is wrong.
        raise QMPError(f"Duplicate ID '{args['id']}' for chardev")
    if args["backend"] == "socket":
        daemon.chardevs.register(await create_chardev(daemon, args))
        return
    from qsd_py.qmp.char_backends import cli_backend

    reply = await daemon.chardevs.create(args["id"], cli_backend(args))
    if "pty" in reply:
        print(f"char device redirected to {reply['pty']} (label {args['id']})", file=sys.stderr)


async def add_monitor(daemon: Any, args: dict[str, Any]) -> None:
    from qsd_py.errors import QMPError
    from qsd_py.qmp import chardev

    char = daemon.chardevs.find(args["chardev"])
    if char is None:
        raise QMPError(f'chardev "{args["chardev"]}" not found')
    await chardev.add_monitor(daemon, char, bool(args.get("pretty", False)))


def write_pidfile(path: str) -> None:
    """Write our pid atomically, so a waiting harness never reads a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def install_signal_handlers(daemon: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, daemon.request_shutdown)


async def run(options: list[Any], ready_fd: int | None) -> int:
    """Build the daemon from ``options``, serve until shutdown, tear everything down."""
    from qsd_py.daemon import Daemon

    daemon = Daemon()
    install_signal_handlers(daemon)
    pidfile: str | None = None
    daemon.started.clear()
    try:
        # getopt order: every option in turn, then complaints about stray arguments.
        for opt in sorted(options, key=lambda o: o.name == "argument"):
            if opt.name == "pidfile":
                pidfile = opt.arg
            elif opt.name != "daemonize":
                await apply_option(daemon, opt)
        daemon.started.set()
        if pidfile is not None:
            write_pidfile(pidfile)
        if ready_fd is not None:
            finish_daemonize(ready_fd)
        threading.Thread(target=daemon.schema.warm_up, name="schema-warm-up", daemon=True).start()
        await daemon.wait_for_shutdown()
        return 0
    except StartupError as err:
        error(str(err))
        return 1
    finally:
        await daemon.close()
        if pidfile is not None:
            try:
                os.unlink(pidfile)
            except FileNotFoundError:
                pass


def daemonize() -> int | None:
    """Fork; the parent exits once the child says it is ready (or with its failure).

    Returns the fd the child writes its readiness byte to.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        ready = os.read(rfd, 1)
        if ready:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) or 1)
    os.close(rfd)
    os.setsid()
    return wfd


def finish_daemonize(ready_fd: int) -> None:
    """Tell the waiting parent we are up, then let go of the terminal and the cwd.

    This comes after the options are applied, so relative paths in them still work.
    """
    os.write(ready_fd, b"\0")
    os.close(ready_fd)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsd-py`` and ``python -m qsd_py``."""
    from qsd_py.cli.options import HELP_TEXT, CliError, CliHelp, iter_options, version_text

    argv = sys.argv[1:] if argv is None else argv
    options = []
    try:
        for opt in iter_options(argv):
            if opt.name == "help":
                print(HELP_TEXT, end="")
                return 0
            if opt.name == "version":
                print(version_text(), end="")
                return 0
            options.append(opt)
    except CliError as err:
        error(str(err))
        return 1
    ready_fd = daemonize() if any(o.name == "daemonize" for o in options) else None
    try:
        return asyncio.run(run(options, ready_fd))
    except CliHelp as shown:
        print(shown.text, end="")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
