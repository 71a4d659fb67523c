"""Where qsd-py puts clusters, held against QEMU 11.1: the same operations on the same image
must leave the same bytes in the file.

A :class:`Sequence` is a starting image (made by the host's qemu-img and qemu-io: QEMU 7.2)
and a list of qemu-io commands (``write -P 5 0 64k``, ``write -z -u 0 64k``, ``discard 0 64k``,
``truncate -m falloc 8M``). QEMU runs them with its own qemu-io (through ../shared/tools/real-qsd,
on a copy under /tmp/qsd-cmp); qsd-py runs them on an in-process qcow2 node, one open for the
whole list, as qemu-io does. :func:`first_difference` then compares the two files byte for byte
and names the structure at the first differing byte (header field, L1 or L2 entry, refcount
table or block entry, data cluster).

QEMU's results are recorded in ``data/qemu-11.1-layout.json`` (zlib-compressed images), so the
regular tests compare without QEMU; ``scripts/qcow2-layout`` re-records them and runs longer
random variants. qemu-io's ``truncate`` reaches the driver as QMP's ``block_resize`` does
(``blk_truncate`` with preallocation off and ``exact`` false), so growing through it compares
like with like.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from images import QEMU_IMG, QEMU_IO, run

from qsd_py.block.graph import BlockGraph

JSON_PATH = Path(__file__).with_name("data") / "qemu-11.1-layout.json"
SHARE = Path("/tmp/qsd-cmp")
REPO = Path(__file__).resolve().parents[2]
TOOL_CANDIDATES = [Path("/work/shared/tools/real-qsd"), REPO.parent / "shared/tools/real-qsd"]
IMAGE, BASE = "img.qcow2", "base.qcow2"
KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Sequence:
    """One comparison: the image (``create``: qemu-img options), how it is prepared with the
    host's tools (``setup`` commands, then an internal snapshot if ``snapshot``), an optional
    backing file written by ``base`` commands, and the ``commands`` both sides run."""

    name: str
    commands: tuple[str, ...]
    size: str = "4M"
    create: dict[str, Any] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    snapshot: bool = False
    base: tuple[str, ...] | None = None
    base_size: str = "4M"
    options: dict[str, Any] = field(default_factory=dict)  # more driver options, both sides
    # qsd-py's writes as a FUSE queue worker makes them: the node first asked to prepare
    # the range (fresh clusters allocated, zeroed where reused), then the data written.
    worker: bool = False


def _random_writes(seed: int, count: int, size: int, cluster: int) -> tuple[str, ...]:
    """Writes at random 512-byte aligned offsets, some within a cluster, some across several."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        length = rng.choice([512, 4 * KiB, cluster, 2 * cluster + 4 * KiB, 5 * cluster])
        offset = rng.randrange(0, (size - length) // 512) * 512
        out.append(f"write -P {(i % 250) + 1} {offset} {length}")
    return tuple(out)


def _sequential(total: int, step: int) -> tuple[str, ...]:
    return tuple(f"write -P {(i // step) % 250 + 1} {i} {step}" for i in range(0, total, step))


SEQUENCES: list[Sequence] = [
    Sequence(
        "fresh-sequential",
        (
            "write -P 1 0 64k",
            "write -P 2 64k 64k",
            "write -P 3 128k 128k",
            "write -P 4 1M 256k",
            "write -P 5 3M 4k",
            "write -P 6 3076k 8k",
            "write -P 7 2M 1M",
        ),
    ),
    Sequence("random", _random_writes(7, 40, 16 * MiB, 64 * KiB), size="16M"),
    Sequence(
        "small-clusters-tables-and-refblocks",
        _sequential(3 * MiB, 96 * KiB) + ("write -P 9 9M 64k", "write -P 10 15M 1k"),
        size="16M",
        create={"cluster_size": 512},
    ),
    Sequence(
        "small-clusters-reftable-grows",
        _sequential(9 * MiB, 256 * KiB),
        size="16M",
        create={"cluster_size": 512},
    ),
    Sequence(
        "random-small-clusters",
        _random_writes(11, 60, 8 * MiB, 512),
        size="8M",
        create={"cluster_size": 512},
    ),
    Sequence(
        "refcount-bits-1",
        _sequential(2 * MiB, 64 * KiB) + ("write -P 3 3M 8k",),
        create={"cluster_size": 4096, "refcount_bits": 1},
    ),
    Sequence(
        "refcount-bits-64",
        _sequential(3 * MiB, 128 * KiB),
        create={"cluster_size": 512, "refcount_bits": 64},
    ),
    Sequence(
        "refcount-bits-8-random",
        _random_writes(3, 40, 4 * MiB, 1024),
        create={"cluster_size": 1024, "refcount_bits": 8},
    ),
    Sequence(
        "backing-cow",
        (
            "write -P 1 4k 4k",
            "write -P 2 64k 512",
            "write -P 3 1M 64k",
            "write -P 4 124k 8k",
            "write -P 5 2M 4k",
            "write -P 6 3M 64k",
            "write -P 7 196k 130k",
        ),
        base=("write -P 0x11 0 1M", "write -P 0x22 2M 1M"),
    ),
    Sequence(
        "write-zeroes",
        (
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "write -z 1M 128k",
            "write -z -u 2M 64k",
            "write -z 3M 4k",
            "write -z 128k 4k",
            "write -z -u 3M 64k",
            "write -P 9 0 4k",
            "write -P 10 1M 64k",
            "write -P 11 2M 64k",
            "write -P 12 3M 64k",
            "write -P 13 128k 4k",
        ),
        setup=("write -P 1 0 1M", "write -P 2 2M 64k", "write -P 3 3M 64k"),
    ),
    Sequence(
        "write-zeroes-over-backing",
        (
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "write -z 1M 4k",
            "write -P 5 0 4k",
            "write -P 6 1M 8k",
        ),
        base=("write -P 0x11 0 2M",),
        setup=("write -P 1 64k 64k",),
    ),
    Sequence(
        "discard-and-reuse",
        (
            "discard 64k 64k",
            "discard 256k 128k",
            "discard 1M 4k",
            "write -P 7 2M 64k",
            "write -P 8 3M 192k",
            "discard 0 64k",
            "write -P 9 3584k 64k",
            "write -P 10 1536k 4k",
        ),
        setup=("write -P 1 0 1M", "write -P 2 1M 64k"),
    ),
    Sequence(
        "discard-over-backing",
        ("discard 0 128k", "discard 1M 64k", "write -P 3 0 4k", "write -P 4 2M 64k"),
        base=("write -P 0x11 0 2M",),
        setup=("write -P 1 0 256k", "write -P 2 1M 64k"),
    ),
    Sequence(
        "snapshot-overwrite",
        (
            "write -P 5 0 64k",
            "write -P 6 64k 4k",
            "write -P 7 1M 128k",
            "write -P 8 3M 4k",
            "write -P 9 0 4k",
        ),
        setup=("write -P 1 0 512k", "write -P 2 1M 256k"),
        snapshot=True,
    ),
    Sequence(
        "grow",
        (
            "truncate 64M",
            "write -P 1 60M 128k",
            "truncate 1G",
            "write -P 2 1000M 64k",
            "truncate 3G",
            "write -P 3 0 4k",
        ),
        setup=("write -P 9 0 64k",),
    ),
    Sequence(
        "grow-small-clusters",
        ("truncate 8M", "write -P 1 7M 64k", "truncate 20M", "write -P 2 19M 8k"),
        create={"cluster_size": 512},
        size="1M",
    ),
    Sequence(
        "grow-over-backing",
        ("truncate 8M", "write -P 1 6M 4k"),
        base=("write -P 0x11 0 6M",),
        base_size="8M",
    ),
    Sequence(
        "shrink",
        ("truncate 2M", "write -P 3 1M 64k", "truncate 3M", "write -P 4 2560k 4k"),
        setup=("write -P 1 0 1M", "write -P 2 2M 2M"),
    ),
    Sequence(
        "preallocate",
        (
            "truncate -m metadata 8M",
            "write -P 1 6M 64k",
            "truncate -m falloc 12M",
            "write -P 2 10M 4k",
            "truncate -m full 14M",
            "write -P 3 13M 64k",
        ),
        setup=("write -P 9 0 64k",),
    ),
    Sequence(
        "preallocate-small-clusters",
        ("truncate -m falloc 3M", "truncate -m metadata 4M", "write -P 1 3584k 4k"),
        create={"cluster_size": 512},
        size="1M",
    ),
    Sequence(
        "extended-l2",
        (
            "write -P 1 0 4k",
            "write -P 2 8k 2k",
            "write -P 3 64k 64k",
            "write -P 4 200k 100k",
            "write -z 300k 16k",
            "write -z -u 64k 64k",
            "discard 128k 64k",
            "write -P 5 130k 4k",
            "discard 200k 8k",
            "write -z 260k 2k",
            "write -z -u 262k 2k",
            "write -P 6 4k 4k",
            "truncate -m metadata 6M",
            "write -P 7 5M 4k",
        ),
        create={"extended_l2": True},
    ),
    Sequence(
        "extended-l2-backing",
        ("write -P 1 0 4k", "write -P 2 70k 2k", "write -P 3 200k 100k"),
        create={"extended_l2": True, "cluster_size": 32 * KiB},
        base=("write -P 0x11 0 1M",),
    ),
    Sequence(
        "lazy-refcounts",
        ("write -P 1 0 64k", "write -P 2 1M 4k", "discard 0 64k", "write -P 3 2M 64k"),
        create={"lazy_refcounts": True},
    ),
    Sequence(
        "compat-0.10",
        (
            "write -P 1 0 64k",
            "write -z 64k 64k",
            "write -P 2 1M 4k",
            "discard 0 64k",
            "write -z 1M 64k",
            "write -P 3 2M 64k",
        ),
        create={"compat": "0.10"},
    ),
    Sequence(
        "compressed-clusters",
        (
            "write -P 5 4k 4k",
            "write -P 6 64k 64k",
            "write -z 128k 64k",
            "discard 192k 64k",
            "write -P 7 1M 4k",
            "write -z -u 256k 64k",
            "write -P 8 320k 512",
        ),
        setup=tuple(f"write -c -P {i + 1} {i * 64}k 64k" for i in range(8))
        + ("write -c -P 9 1M 64k",),
    ),
    Sequence(
        "data-file",
        (
            "write -P 5 4k 4k",
            "write -P 6 64k 64k",
            "write -z 128k 64k",
            "discard 192k 64k",
            "write -z -u 256k 64k",
            "truncate 8M",
            "write -P 8 7M 64k",
            "truncate -m metadata 10M",
            "truncate 6M",
            "truncate -m falloc 7M",
        ),
        create={"data_file": "img.data"},
        setup=("write -P 1 0 512k",),
    ),
    Sequence(
        "data-file-raw",
        ("write -P 5 4k 4k", "write -z -u 64k 64k", "truncate 8M", "write -P 8 7M 64k"),
        create={"data_file": "img.data", "data_file_raw": True},
        setup=("write -P 1 0 512k",),
    ),
    Sequence(
        "l2-slices",
        ("write -P 1 0 1M", "write -P 2 1984k 128k", "write -P 3 5M 3M"),
        size="16M",
        options={"l2-cache-entry-size": 4096},
    ),
]
SEQUENCES += [
    replace(s, name=f"{s.name}-worker", worker=True)
    for s in SEQUENCES
    if s.name in ("fresh-sequential", "random", "discard-and-reuse", "extended-l2", "l2-slices")
]
BY_NAME = {s.name: s for s in SEQUENCES}


def random_sequence(seed: int, count: int = 150) -> Sequence:
    """A long random mix for ``scripts/qcow2-layout --random``: an image of random
    cluster size, refcount width and L2 kind, maybe over a backing file, then writes,
    zeroes (with and without unmap), discards and resizes (some preallocated)."""
    rng = random.Random(seed)
    cluster = rng.choice([512, 4 * KiB, 64 * KiB, 64 * KiB])
    create: dict[str, Any] = {"cluster_size": cluster}
    create["refcount_bits"] = rng.choice([16, 16, 1, 4, 8, 32, 64])
    if cluster >= 16 * KiB and rng.random() < 0.3:
        create["extended_l2"] = True
    size = 8 * MiB
    base = ("write -P 0x11 0 3M", "write -P 0x22 5M 1M") if rng.random() < 0.3 else None
    commands = []
    for i in range(count):
        op = rng.random()
        length = rng.choice([512, 4 * KiB, cluster, 3 * cluster + 512, 256 * KiB])
        offset = rng.randrange(0, max(1, (size - length) // 512)) * 512
        length = min(length, size - offset)
        if op < 0.55:
            commands.append(f"write -P {i % 250 + 1} {offset} {length}")
        elif op < 0.75:
            commands.append(f"write -z{' -u' if rng.random() < 0.5 else ''} {offset} {length}")
        elif op < 0.92:
            commands.append(f"discard {offset} {length}")
        else:
            new = rng.choice([size - 2 * MiB, size + 1 * MiB, size + 3 * MiB])
            new = max(1 * MiB, min(new, 16 * MiB)) // cluster * cluster
            mode = rng.choice(["off", "off", "metadata", "falloc", "full"]) if new > size else "off"
            commands.append(f"truncate -m {mode} {new}" if mode != "off" else f"truncate {new}")
            size = new
    worker = rng.random() < 0.5
    return Sequence(
        f"random-{seed}",
        tuple(commands),
        size="8M",
        create=create,
        base=base,
        base_size="8M",
        worker=worker,
    )


# --- the starting image ---------------------------------------------------------------------
def _create_args(opts: dict[str, Any]) -> list[str]:
    items = [f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in opts.items()]
    return ["-o", ",".join(items)] if items else []


def _qemu_io_host(img: Path, commands: tuple[str, ...]) -> None:
    if commands:
        argv = [QEMU_IO, "-f", "qcow2"]
        for command in commands:
            argv += ["-c", command]
        run([*argv, str(img)], cwd=img.parent)


def prepare(seq: Sequence, workdir: Path) -> Path:
    """Make the starting image (and its backing file) in ``workdir`` with the host's tools."""
    workdir.mkdir(parents=True, exist_ok=True)
    img = workdir / IMAGE
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", *_create_args(seq.create)]
    if seq.base is not None:
        base = workdir / BASE
        run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(base), seq.base_size], cwd=workdir)
        _qemu_io_host(base, seq.base)
        argv += ["-b", BASE, "-F", "qcow2"]
    run([*argv, str(img), seq.size], cwd=workdir)
    _qemu_io_host(img, seq.setup)
    if seq.snapshot:
        run([QEMU_IMG, "snapshot", "-c", "snap", str(img)], cwd=workdir)
        _fix_snapshot_times(img)
    return img


def _fix_snapshot_times(img: Path) -> None:
    """Set every snapshot's date and VM clock to 0, so that the starting image is the same
    bytes on every run (its digest is recorded with QEMU's result)."""
    with open(img, "r+b") as f:
        head = f.read(72)
        nb, table = struct.unpack_from(">IQ", head, 60)
        pos = table
        for _ in range(nb):
            f.seek(pos)
            entry = f.read(40)
            id_size, name_size = struct.unpack_from(">HH", entry, 12)
            extra = struct.unpack_from(">I", entry, 36)[0]
            f.seek(pos + 16)
            f.write(bytes(16))  # date_sec, date_nsec, vm_clock_nsec
            length = 40 + extra + id_size + name_size
            pos += -(-length // 8) * 8


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- running the commands -------------------------------------------------------------------
_SUFFIX = {"k": KiB, "K": KiB, "m": MiB, "M": MiB, "g": 1 << 30, "G": 1 << 30, "t": 1 << 40}


def number(text: str) -> int:
    """A qemu-io number: bytes, or with a k/M/G/T suffix (powers of 1024)."""
    if text[-1] in _SUFFIX:
        return int(text[:-1]) * _SUFFIX[text[-1]]
    return int(text, 0)


def parse(command: str) -> tuple[str, dict[str, Any], list[int]]:
    """``(verb, flags, numbers)`` of the qemu-io commands the sequences use."""
    verb, *words = command.split()
    flags: dict[str, Any] = {}
    nums: list[int] = []
    it = iter(words)
    for word in it:
        if word == "-P":
            flags["pattern"] = int(next(it), 0)
        elif word == "-m":
            flags["prealloc"] = next(it)
        elif word in ("-z", "-u"):
            flags[word] = True
        else:
            nums.append(number(word))
    return verb, flags, nums


async def _apply(node: Any, command: str, worker: bool) -> None:
    verb, flags, nums = parse(command)
    if verb == "write" and flags.get("-z"):
        await node.write_zeroes(nums[0], nums[1], unmap=bool(flags.get("-u")))
    elif verb == "write":
        if worker:
            await node.prepare_fast_write(nums[0], nums[1])
        await node.write(nums[0], bytes([flags["pattern"]]) * nums[1])
    elif verb == "discard":
        await node.discard(nums[0], nums[1])
    elif verb == "truncate":
        await node.truncate(nums[0], flags.get("prealloc", "off"))
    else:
        raise ValueError(f"unknown command {command!r}")


def driver_options(seq: Sequence, img: Path) -> dict[str, Any]:
    """Both sides open the image with discard=unmap (qemu-io's ``-d unmap``), and an
    external data file by its path (QEMU would look for it in its working directory)."""
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "discard": "unmap",
        "file": {"driver": "file", "filename": str(img), "discard": "unmap"},
    }
    if "data_file" in seq.create:
        data = str(img.parent / seq.create["data_file"])
        opts["data-file"] = {"driver": "file", "filename": data, "discard": "unmap"}
    return {**opts, **seq.options}


async def run_qsd_async(seq: Sequence, img: Path) -> None:
    graph = BlockGraph()
    try:
        node = await graph.add({"node-name": "q", **driver_options(seq, img)})
        for command in seq.commands:
            await _apply(node, command, seq.worker)
    finally:
        await graph.close_all()


def run_qsd(seq: Sequence, img: Path) -> None:
    """qsd-py's qcow2 driver runs the commands on ``img`` (one open, as qemu-io does)."""
    asyncio.run(run_qsd_async(seq, img))


def real_qsd_tool() -> Path:
    for tool in TOOL_CANDIDATES:
        if tool.exists():
            return tool
    raise RuntimeError("real-qsd (../shared/tools/real-qsd) is not there")


def _image_opts(seq: Sequence, img: Path) -> str:
    def flat(prefix: str, opts: dict[str, Any]) -> list[str]:
        out = []
        for key, value in opts.items():
            if isinstance(value, dict):
                out += flat(f"{prefix}{key}.", value)
            else:
                text = ("on" if value else "off") if isinstance(value, bool) else str(value)
                out.append(f"{prefix}{key}={text}")
        return out

    return ",".join(flat("", driver_options(seq, img)))


def run_qemu(seq: Sequence, img: Path, tool: Path | None = None) -> None:
    """QEMU 11.1's qemu-io runs the commands on ``img`` (which must be under /tmp/qsd-cmp)."""
    argv = [str(tool or real_qsd_tool()), "run", "qemu-io", "--image-opts"]
    for command in seq.commands:
        argv += ["-c", command]
    argv.append(_image_opts(seq, img))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or "failed" in done.stdout:
        raise RuntimeError(f"QEMU's qemu-io failed: {done.stdout}{done.stderr}")


def qemu_version(tool: Path | None = None) -> str:
    argv = [str(tool or real_qsd_tool()), "run", "qemu-io", "--version"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    return out.splitlines()[0].removeprefix("qemu-io version ")


def run_both(seq: Sequence, workdir: Path, tool: Path | None = None) -> tuple[Path, Path]:
    """The starting image made once, copied, and the commands run by QEMU and by qsd-py:
    ``(qemu's image, ours)``. ``workdir`` must be under /tmp/qsd-cmp."""
    start = prepare(seq, workdir / "start")
    sides = []
    for side in ("qemu", "qsd"):
        shutil.copytree(start.parent, workdir / side)
        sides.append(workdir / side / IMAGE)
    run_qemu(seq, sides[0], tool)
    run_qsd(seq, sides[1])
    return sides[0], sides[1]


def outputs(seq: Sequence, img: Path) -> dict[str, bytes]:
    """The files a sequence leaves: the image, and its external data file if it has one."""
    out = {IMAGE: img.read_bytes()}
    if "data_file" in seq.create:
        name = seq.create["data_file"]
        out[name] = (img.parent / name).read_bytes()
    return out


def difference(ours: dict[str, bytes], qemu: dict[str, bytes]) -> str | None:
    """:func:`first_difference` of the images, else where a data file differs first."""
    text = first_difference(ours[IMAGE], qemu[IMAGE])
    if text is not None:
        return text
    for name, data in ours.items():
        other = qemu[name]
        if data != other:
            n = min(len(data), len(other))
            at = next((i for i in range(n) if data[i] != other[i]), n)
            return f"{name} differs at {at:#x} (ours {len(data):#x} bytes, QEMU {len(other):#x})"
    return None


# --- recorded results -----------------------------------------------------------------------
def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 9)).decode()


def record(seq: Sequence, start: Path, result: Path) -> dict[str, Any]:
    files = outputs(seq, result)
    entry = {
        "start": digest(start),
        "result": hashlib.sha256(files[IMAGE]).hexdigest(),
        "image": _pack(files.pop(IMAGE)),
    }
    for data in files.values():
        entry["data-file"] = _pack(data)
    return entry


def load() -> dict[str, Any]:
    return json.loads(JSON_PATH.read_text())


def recorded_image(entry: dict[str, Any]) -> bytes:
    return zlib.decompress(base64.b64decode(entry["image"]))


def recorded_outputs(seq: Sequence, entry: dict[str, Any]) -> dict[str, bytes]:
    """QEMU's files as :func:`outputs` names them, from a record."""
    out = {IMAGE: recorded_image(entry)}
    if "data_file" in seq.create:
        out[seq.create["data_file"]] = zlib.decompress(base64.b64decode(entry["data-file"]))
    return out


def dump(records: dict[str, Any]) -> str:
    return json.dumps(records, indent=1, sort_keys=True) + "\n"


# --- naming a difference --------------------------------------------------------------------
_HEADER_FIELDS = [
    (0, 4, "magic"), (4, 4, "version"), (8, 8, "backing_file_offset"),
    (16, 4, "backing_file_size"), (20, 4, "cluster_bits"), (24, 8, "size"),
    (32, 4, "crypt_method"), (36, 4, "l1_size"), (40, 8, "l1_table_offset"),
    (48, 8, "refcount_table_offset"), (56, 4, "refcount_table_clusters"),
    (60, 4, "nb_snapshots"), (64, 8, "snapshots_offset"), (72, 8, "incompatible_features"),
    (80, 8, "compatible_features"), (88, 8, "autoclear_features"), (96, 4, "refcount_order"),
    (100, 4, "header_length"), (104, 1, "compression_type"),
]  # fmt: skip


class Layout:
    """What each byte range of an image file holds, from its header and tables."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.cluster_bits = struct.unpack_from(">I", data, 20)[0]
        self.cs = 1 << self.cluster_bits
        version = struct.unpack_from(">I", data, 4)[0]
        self.l1_size, self.l1_offset = struct.unpack_from(">IQ", data, 36)
        self.rt_offset, self.rt_clusters = struct.unpack_from(">QI", data, 48)
        incompat = struct.unpack_from(">Q", data, 72)[0] if version >= 3 else 0
        self.order = struct.unpack_from(">I", data, 96)[0] if version >= 3 else 4
        self.entry_size = 16 if incompat & 16 else 8
        self.owner: dict[int, str] = {0: "header cluster"}  # host cluster -> what it holds
        self._tables()

    def _u64(self, offset: int) -> int:
        if offset + 8 > len(self.data):
            return 0
        return struct.unpack_from(">Q", self.data, offset)[0]

    def _claim(self, offset: int, nbytes: int, what: str) -> None:
        last = (offset + max(nbytes, 1) - 1) >> self.cluster_bits
        for c in range(offset >> self.cluster_bits, last + 1):
            self.owner.setdefault(c, what)

    def _tables(self) -> None:
        cs, mask = self.cs, (1 << 56) - 1 & ~(self.cs - 1)
        self._claim(self.l1_offset, self.l1_size * 8, "L1 table")
        self._claim(self.rt_offset, self.rt_clusters * cs, "refcount table")
        per_block = cs * 8 >> self.order
        for i in range(self.rt_clusters * cs // 8):
            block = self._u64(self.rt_offset + 8 * i) & mask
            if block:
                self._claim(block, cs, f"refcount block {i} (host clusters {i * per_block}..)")
        l2_entries = cs // self.entry_size
        for i in range(self.l1_size):
            table = self._u64(self.l1_offset + 8 * i) & mask
            if not table:
                continue
            self._claim(table, cs, f"L2 table of L1 entry {i}")
            for k in range(l2_entries):
                entry = self._u64(table + k * self.entry_size)
                guest = (i * l2_entries + k) << self.cluster_bits
                if entry & (1 << 62):
                    self._claim(entry & ((1 << 62) - 1) & ~511, 1, f"compressed data of {guest:#x}")
                elif entry & mask:
                    self._claim(entry & mask, cs, f"data of guest {guest:#x}")

    def describe(self, offset: int) -> str:
        """The structure at ``offset``: a header field, a table entry, or a cluster's role."""
        if offset < 105:
            for start, size, name in _HEADER_FIELDS:
                if start <= offset < start + size:
                    return f"header field {name}"
        if self.l1_offset <= offset < self.l1_offset + 8 * self.l1_size:
            return f"L1 entry {(offset - self.l1_offset) // 8}"
        if self.rt_offset <= offset < self.rt_offset + self.rt_clusters * self.cs:
            return f"refcount table entry {(offset - self.rt_offset) // 8}"
        what = self.owner.get(offset >> self.cluster_bits, "a cluster nothing points at")
        inside = offset & (self.cs - 1)
        if what.startswith("L2 table"):
            return f"{what}, entry {inside // self.entry_size}"
        if what.startswith("refcount block"):
            return f"{what}, entry {inside * 8 >> self.order}"
        return f"{what} (+{inside:#x})" if what != "header cluster" else "header extensions"


def first_difference(ours: bytes, qemu: bytes) -> str | None:
    """None when the files are the same bytes; else where they first differ and what lies
    there in each, and how many clusters differ."""
    if ours == qemu:
        return None
    n = min(len(ours), len(qemu))
    mine, theirs = Layout(ours), Layout(qemu)
    cs = theirs.cs
    changed = [
        c for c in range(0, max(len(ours), len(qemu)), cs) if ours[c : c + cs] != qemu[c : c + cs]
    ]
    at = n
    if changed and changed[0] < n:
        c = changed[0]
        at = next((i for i in range(c, min(c + cs, n)) if ours[i] != qemu[i]), min(c + cs, n))
    differing = len(changed)
    text = [f"first difference at {at:#x} ({differing} clusters differ)"]
    if at == n:
        text.append(f"file sizes: ours {len(ours):#x}, QEMU {len(qemu):#x}")
    else:
        text.append(f"ours: {mine.describe(at)}, bytes {ours[at : at + 8].hex()}")
        text.append(f"QEMU: {theirs.describe(at)}, bytes {qemu[at : at + 8].hex()}")
        if len(ours) != len(qemu):
            text.append(f"file sizes: ours {len(ours):#x}, QEMU {len(qemu):#x}")
    return "; ".join(text)
