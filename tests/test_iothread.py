"""IOThread objects: a loop on a thread of its own, optionally bound to one CPU."""

from __future__ import annotations

import logging
import os

import pytest

from qsd_py.objects.iothread import IOThread


@pytest.mark.parametrize("cpu", sorted(os.sched_getaffinity(0)))
def test_bound_iothread_runs_only_on_its_cpu(cpu: int) -> None:
    thread = IOThread(f"bound{cpu}", cpu=cpu)
    try:
        assert os.sched_getaffinity(thread.thread.native_id) == {cpu}
    finally:
        thread.stop()
    assert not thread.thread.is_alive()


def test_unbound_iothread_keeps_the_process_affinity() -> None:
    thread = IOThread("free")
    try:
        assert os.sched_getaffinity(thread.thread.native_id) == os.sched_getaffinity(0)
    finally:
        thread.stop()


def test_missing_cpu_leaves_the_thread_unbound(caplog: pytest.LogCaptureFixture) -> None:
    missing = os.sysconf("SC_NPROCESSORS_CONF") + 7
    with caplog.at_level(logging.WARNING, logger="qsd_py.objects"):
        thread = IOThread("nowhere", cpu=missing)
    try:
        assert os.sched_getaffinity(thread.thread.native_id) == os.sched_getaffinity(0)
        assert thread.loop.is_running()
    finally:
        thread.stop()
    assert f"nowhere: cannot bind to CPU {missing}: Invalid argument" in caplog.text
