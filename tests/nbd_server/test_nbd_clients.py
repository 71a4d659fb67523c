"""qsd-py's NBD server seen through real clients: libnbd's tools and library, and
qemu-img/qemu-io/qemu-nbd from Debian's qemu-utils."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nbd_support import MIB, NbdDaemon, data_image, libnbd, nbdinfo_json, run

RAW_ARGS = ["--blockdev", "driver=file,node-name=f0,filename={img}", "--blockdev",
            "driver=raw,node-name=d0,file=f0"]  # fmt: skip


def raw_export(
    nbd_daemon, tmp_path: Path, export: str = "", file_opts: str = "", **kw: str
) -> tuple[NbdDaemon, bytes]:
    img = tmp_path / "disk.img"
    data = data_image(img)
    opts = "".join(f",{k.replace('_', '-')}={v}" for k, v in kw.items())
    args = [a.format(img=img) for a in RAW_ARGS]
    args[1] += file_opts
    daemon = nbd_daemon(*args, "--export", f"type=nbd,id=e0,node-name=d0{export}{opts}")
    return daemon, data


def test_nbdinfo_sees_qemus_flags_read_only(nbd_daemon, tmp_path: Path) -> None:
    daemon, data = raw_export(nbd_daemon, tmp_path)
    info = nbdinfo_json(daemon.sock, "d0")
    (export,) = info["exports"]
    assert export["export-name"] == "d0"
    assert export["export-size"] == len(data)
    assert export["is_read_only"] is True
    assert export["can_flush"] and export["can_fua"] and export["can_cache"]
    assert export["can_multi_conn"] is True  # max-connections is not 1
    assert not export["can_trim"] and not export["can_zero"] and not export["can_fast_zero"]
    assert export["can_df"] is True  # structured replies
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MIB
    contexts = export["contexts"]
    assert "base:allocation" in contexts and "qemu:allocation-depth" not in contexts


def test_nbdinfo_writable_with_name_and_description(nbd_daemon, tmp_path: Path) -> None:
    daemon, _ = raw_export(
        nbd_daemon,
        tmp_path,
        ",name=disk,description=the disk,allocation-depth=on",
        writable="on",
    )
    (export,) = nbdinfo_json(daemon.sock, "disk")["exports"]
    assert export["description"] == "the disk"
    assert export["is_read_only"] is False
    assert export["can_trim"] and export["can_zero"] and export["can_fast_zero"]
    assert "qemu:allocation-depth" in export["contexts"]
    listing = run("nbdinfo", "--list", daemon.uri()).stdout
    assert "export=" in listing and "disk" in listing and "the disk" in listing


def test_qemu_img_reads_the_raw_node(nbd_daemon, tmp_path: Path) -> None:
    daemon, data = raw_export(nbd_daemon, tmp_path)
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri("d0"), str(out))
    assert out.read_bytes() == data
    run(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        daemon.uri("d0"),
        str(tmp_path / "disk.img"),
    )
    info = json.loads(run("qemu-img", "info", "--output=json", daemon.uri("d0")).stdout)
    assert info["virtual-size"] == len(data)


def test_qcow2_node_reads_back_equal(nbd_daemon, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    data = data_image(raw)
    qcow = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
        str(raw), str(qcow))  # fmt: skip
    daemon = nbd_daemon(
        "--blockdev", f"driver=file,node-name=f0,filename={qcow}",
        "--blockdev", "driver=qcow2,node-name=q0,file=f0",
        "--export", "type=nbd,id=e0,node-name=q0",
    )  # fmt: skip
    out = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri("q0"), str(out))
    assert out.read_bytes() == data


@pytest.mark.parametrize("file_opts", ["", ",cache.direct=on"])
def test_qemu_io_writes_and_reads(nbd_daemon, tmp_path: Path, file_opts: str) -> None:
    """Also over O_DIRECT: data buffers are then page aligned, and requests the file cannot
    take as they are (unaligned) are the node's to bounce."""
    daemon, _ = raw_export(nbd_daemon, tmp_path, file_opts=file_opts, writable="on")
    cmds = [
        "write -P 0x5a 4096 8192",
        "write -z 65536 4096",
        "write -P 0x11 -f 131072 512",  # -f: FUA
        "write -P 0x22 200001 3000",  # unaligned
        "write -P 0x33 1048576 262144",  # beyond the receive buffer's share
        "read -P 0x5a 4096 8192",
        "read -P 0 65536 4096",
        "read -P 0x22 200001 3000",
        "read -P 0x33 1048576 262144",
        "flush",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        argv += ["-c", cmd]
    out = run(*argv, daemon.uri("d0")).stdout
    assert "Pattern verification failed" not in out
    img = (tmp_path / "disk.img").read_bytes()
    assert img[4096 : 4096 + 8192] == b"\x5a" * 8192
    assert img[65536 : 65536 + 4096] == bytes(4096)
    assert img[131072 : 131072 + 512] == b"\x11" * 512
    assert img[200001 : 200001 + 3000] == b"\x22" * 3000
    assert img[MIB : MIB + 262144] == b"\x33" * 262144


def test_map_matches_qemu_img_map(nbd_daemon, tmp_path: Path) -> None:
    daemon, _ = raw_export(nbd_daemon, tmp_path)
    mapped = json.loads(run("nbdinfo", "--map", "--json", daemon.uri("d0")).stdout)
    # nbdinfo's extents: [{"offset", "length", "type", "description"}]; type bit 0 hole, 1 zero
    holes = [(e["offset"], e["length"]) for e in mapped if e["type"] & 1]
    local = json.loads(
        run("qemu-img", "map", "--output=json", "-f", "raw", str(tmp_path / "disk.img")).stdout
    )
    local_holes = [(e["start"], e["length"]) for e in local if not e["data"]]
    assert holes == local_holes
    assert (2 * MIB, MIB) in holes  # the part never written


def test_nbdcopy_both_ways(nbd_daemon, tmp_path: Path) -> None:
    daemon, data = raw_export(nbd_daemon, tmp_path, writable="on")
    out = tmp_path / "out.raw"
    run("nbdcopy", daemon.uri("d0"), str(out))
    assert out.read_bytes() == data
    # several connections at once (the export allows multi-conn), many requests each
    out.unlink()
    run("nbdcopy", "--connections=4", "--requests=32", "--request-size=65536",
        daemon.uri("d0"), str(out))  # fmt: skip
    assert out.read_bytes() == data
    new = bytes(range(256)) * (len(data) // 256)
    src = tmp_path / "new.raw"
    src.write_bytes(new)
    run("nbdcopy", str(src), daemon.uri("d0"))
    assert (tmp_path / "disk.img").read_bytes() == new


def test_qemu_nbd_list(nbd_daemon, tmp_path: Path) -> None:
    daemon, _ = raw_export(nbd_daemon, tmp_path, ",description=listed")
    out = run("qemu-nbd", "--list", "-k", str(daemon.sock)).stdout
    assert "exports available: 1" in out
    assert "export: 'd0'" in out and "description: listed" in out


LIBNBD_IN_FLIGHT = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
done = []
reads = []
for i in range(64):
    off = (i * 7919 * 4096) % (size - 4096)
    buf = nbd.Buffer(4096)
    reads.append((off, buf))
    h.aio_pread(buf, off, completion=lambda err, i=i: (done.append(i), 1)[1])
in_flight = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
image = open(sys.argv[2], "rb").read()
bad = sum(buf.to_bytearray() != image[off:off + 4096] for off, buf in reads)
print(in_flight, len(done), bad)
h.shutdown()
"""


def test_libnbd_many_reads_in_flight(nbd_daemon, tmp_path: Path) -> None:
    daemon, _ = raw_export(nbd_daemon, tmp_path)
    out = libnbd(LIBNBD_IN_FLIGHT, daemon.uri("d0"), str(tmp_path / "disk.img"))
    assert out.split() == ["64", "64", "0"]  # all in flight at once, all answered right


LIBNBD_ZERO_TRIM_STATUS = r"""
import sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
h.zero(65536, 0)
h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE)
h.trim(4096, 1 << 20)
h.flush()
seen = []
def extent(metacontext, offset, entries, err):
    seen.append((metacontext, offset, list(entries)))
h.block_status(2 << 20, 1 << 20, extent)
h.block_status(2 << 20, 1 << 20, extent, nbd.CMD_FLAG_REQ_ONE)
print(repr(seen))
print(h.pread(8, 0) == bytes(8))
h.shutdown()
"""


def test_libnbd_zero_trim_and_block_status(nbd_daemon, tmp_path: Path) -> None:
    daemon, _ = raw_export(nbd_daemon, tmp_path, writable="on")
    lines = libnbd(LIBNBD_ZERO_TRIM_STATUS, daemon.uri("d0")).splitlines()
    seen = eval(lines[0])  # noqa: S307 - our own script's repr
    # MiB 1 are written zeroes (data, zero flag unknown: 0); MiB 2 is a hole (3)
    assert seen[0] == ("base:allocation", 1 << 20, [1 << 20, 0, 1 << 20, 3])
    assert seen[1][2] == [1 << 20, 0]  # REQ_ONE: one extent
    assert lines[1] == "True"
