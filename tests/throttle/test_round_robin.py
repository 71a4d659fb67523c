"""Members of a throttle group take turns: a member with many requests waiting does not
starve another (the group's own admission order, in one process: no kernel involved)."""

from __future__ import annotations

import asyncio

from qsd_py.objects.throttle_group import ThrottleGroup

CHUNK = 64 * 1024


def test_waiting_members_take_turns() -> None:
    group = ThrottleGroup("g0", {"qom-type": "throttle-group", "x-bps-read": CHUNK * 40})
    group.join("a")
    group.join("b")
    order: list[str] = []

    async def request(member: str) -> None:
        await group.admit(member, False, CHUNK)
        order.append(member)

    async def main() -> None:
        # a's requests are all queued before b's first one
        tasks = [asyncio.create_task(request("a")) for _ in range(10)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("b")) for _ in range(4)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    # The bucket (a tenth of a second: 4 chunks) lets a's first requests straight through;
    # once requests wait, b's four each come right after one of a's: without turns, a's
    # earlier requests would all go first.
    assert order.count("b") == 4 and order[:4] == ["a"] * 4, order
    first_b = order.index("b")
    assert first_b < 6, order
    assert order[first_b : first_b + 8] == ["b", "a"] * 4, order
