"""Run qsd-py counting the Python function calls of every thread (``nbd-cpu-probe --mode
calls``): ``python count_calls.py FILE DAEMON-ARGS...``. The count goes to FILE every 0.1 s,
so the caller reads it before and after a job: calls per request do not depend on how busy
the machine is (what a loaded machine's CPU times cannot say), though the profile hook
slows the daemon, so replies batch more than without it."""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time
from typing import Any

_calls = [0]


def _count(frame: Any, event: str, arg: Any) -> None:
    if event == "call":
        _calls[0] += 1


def _publish(path: str) -> None:
    while True:
        with open(path + ".tmp", "w") as f:
            f.write(str(_calls[0]))
        os.replace(path + ".tmp", path)
        time.sleep(0.1)


def main() -> None:
    path, args = sys.argv[1], sys.argv[2:]
    sys.argv = ["qsd_py", *args]
    sys.path.insert(0, os.getcwd())  # the tree run (``--tree``), as ``python -m`` would
    threading.Thread(target=_publish, args=(path,), daemon=True).start()
    threading.setprofile(_count)
    sys.setprofile(_count)
    runpy.run_module("qsd_py", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
