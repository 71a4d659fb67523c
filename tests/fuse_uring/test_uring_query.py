"""x-query-fuse-queues: the transport and per-queue counters, as the schema declares them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from uring_support import UringServer, pread_direct

from qsd_py.errors import QMPError
from qsd_py.export.commands import x_query_fuse_queues
from qsd_py.qapi.schema import load_schema


def _query(srv: UringServer, **args):
    result = srv.run(x_query_fuse_queues(srv.daemon, args))  # type: ignore[arg-type]
    schema = load_schema()
    ret = schema.command_returns("x-query-fuse-queues")
    assert ret is not None
    for item in result:  # every answer fits the declared FuseExportQueues
        schema.check_type_value(ret.element, item)  # type: ignore[attr-defined]
    return result


def test_query_shows_transports_and_counters(userver: UringServer, tmp_path: Path):
    img = userver.image(1 << 20, os.urandom(1 << 20))
    node = userver.node(img)
    userver.run(userver.daemon.exports.add(_opts("ring", node, tmp_path / "a", io_uring=True)))
    userver.run(userver.daemon.exports.add(_opts("dev", node, tmp_path / "b")))
    assert pread_direct(tmp_path / "a", 0, 65536) == img.read_bytes()[:65536]
    assert pread_direct(tmp_path / "b", 0, 4096) == img.read_bytes()[:4096]
    try:
        dev, ring = _query(userver)  # newest first
        assert (dev["id"], dev["transport"], dev["uring-queues"]) == ("dev", "dev-fuse", [])
        assert sum(q["bytes-read"] for q in dev["queues"]) == 4096
        assert ring["id"] == "ring" and ring["transport"] == "io_uring"
        assert sum(q["bytes-read"] for q in ring["uring-queues"]) == 65536
        assert sum(q["bytes-read"] for q in ring["queues"]) == 0
        assert [q["qid"] for q in ring["uring-queues"]] == list(
            range(os.sysconf("SC_NPROCESSORS_CONF"))
        )
        assert [r["id"] for r in _query(userver, id="ring")] == ["ring"]
        with pytest.raises(QMPError, match="Export 'nope' is not found"):
            _query(userver, id="nope")
    finally:
        userver.run(userver.daemon.exports.delete_all())
    assert _query(userver) == []


def _opts(export_id: str, node, mnt: Path, **extra):
    mnt.touch()
    return {
        "type": "fuse",
        "id": export_id,
        "node-name": node.node_name,
        "mountpoint": str(mnt),
        **extra,
    }
