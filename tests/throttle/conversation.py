"""throttle-group and driver=throttle: a conversation and the replies QEMU 11.1's
qemu-storage-daemon gives to it (recorded with ../shared/tools/real-qsd;
test_realqsd_throttle.py holds it with QEMU again). Dicts compare regardless of key order."""

from __future__ import annotations

from typing import Any

BOTH = "bps/iops/max total values and read/write values cannot be used at the same time"

# Both daemons start with these options.
ARGS = [
    "--object", "authz-simple,id=az0,identity=foo",
    "--object", "throttle-group,id=tg0,x-bps-total=1000000",
    "--blockdev", "null-co,node-name=n0",
    "--blockdev", "throttle,node-name=t0,throttle-group=tg0,file=n0",
]  # fmt: skip


def err(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


def limits(**given: int) -> dict[str, int]:
    """QEMU's whole ThrottleLimits: defaults, and the values given (with _ for -)."""
    out = {
        f"{k}{s}": 0
        for k in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
        for s in ("", "-max")
    }
    out.update(
        {
            f"{k}-max-length": 1
            for k in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
        }
    )
    out["iops-size"] = 0
    out.update({k.replace("_", "-"): v for k, v in given.items()})
    return out


STEPS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "object-add",
        {"qom-type": "throttle-group", "id": "a1", "limits": {"bps-total": -1}},
        err("bps/iops/max values must be within [0, 1000000000000000]"),
    ),
    (
        "object-add",
        {"qom-type": "throttle-group", "id": "a2", "limits": {"bps-total-max": 100}},
        err("bps_max/iops_max require corresponding bps/iops values"),
    ),
    (
        "object-add",
        {
            "qom-type": "throttle-group",
            "id": "a3",
            "limits": {"bps-total": 100, "bps-total-max": 50},
        },
        err("bps_max/iops_max cannot be lower than bps/iops"),
    ),
    (
        "object-add",
        {"qom-type": "throttle-group", "id": "a4", "limits": {"bps-total": 100, "bps-read": 50}},
        err(BOTH),
    ),
    (
        "object-add",
        {"qom-type": "throttle-group", "id": "a5", "limits": {"iops-total": 100, "iops-write": 50}},
        err(BOTH),
    ),
    (
        "object-add",
        {
            "qom-type": "throttle-group",
            "id": "a6",
            "limits": {"bps-total": 100, "bps-total-max-length": 0},
        },
        err("the burst length cannot be 0"),
    ),
    (
        "object-add",
        {
            "qom-type": "throttle-group",
            "id": "a7",
            "limits": {"bps-total": 100, "bps-total-max-length": 5},
        },
        err("burst length set without burst rate"),
    ),
    (
        "object-add",
        {
            "qom-type": "throttle-group",
            "id": "a8",
            "limits": {
                "bps-total": 100,
                "bps-total-max": 1000000000000000,
                "bps-total-max-length": 5,
            },
        },
        err("burst length too high for this burst rate"),
    ),
    (
        "object-add",
        {"qom-type": "throttle-group", "id": "a9", "limits": {"bps-total": 100}, "x-bps-total": 5},
        {"return": {}},
    ),
    ("object-add", {"qom-type": "throttle-group", "id": "b1", "x-bps-read": 5}, {"return": {}}),
    ("qom-get", {"path": "/objects/b1", "property": "limits"}, {"return": limits(bps_read=5)}),
    (
        "object-add",
        {"qom-type": "throttle-group", "id": "b2", "limits": {"iops-size": -1}},
        err("iops size requires an iops value to be set"),
    ),
    (
        "blockdev-add",
        {"driver": "throttle", "node-name": "t9", "throttle-group": "nope", "file": "n0"},
        err("Throttle group 'nope' does not exist"),
    ),
    (
        "blockdev-add",
        {"driver": "throttle", "node-name": "t9", "throttle-group": "az0", "file": "n0"},
        err("Throttle group 'az0' does not exist"),
    ),
    (
        "blockdev-add",
        {"driver": "throttle", "node-name": "t9", "throttle-group": "b1", "file": "n0"},
        {"return": {}},
    ),
    ("object-del", {"id": "b1"}, err("Cannot delete throttle group 'b1' with active references")),
    (
        "qom-set",
        {"path": "/objects/tg0", "property": "x-bps-total", "value": 5},
        err("Property cannot be set after initialization"),
    ),
    (
        "qom-get",
        {"path": "/objects/tg0", "property": "limits"},
        {"return": limits(bps_total=1000000)},
    ),
    (
        "qom-set",
        {
            "path": "/objects/tg0",
            "property": "limits",
            "value": {"bps-total": 100, "bps-total-max": 50},
        },
        err("bps_max/iops_max cannot be lower than bps/iops"),
    ),
    ("qom-set", {"path": "/objects/tg0", "property": "limits", "value": {}}, {"return": {}}),
    (
        "qom-get",
        {"path": "/objects/tg0", "property": "limits"},
        {"return": limits(bps_total=1000000)},
    ),
]
