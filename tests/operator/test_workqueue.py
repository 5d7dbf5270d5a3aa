"""The operator's work queue: a key waits once, for its earliest due time; a forgotten key is
never handed out; a key added while it is processed is handed out again."""

from __future__ import annotations

import asyncio
import time

from kubetune.operator.workqueue import WorkQueue


def test_a_key_queued_twice_is_handed_out_once_at_the_earlier_time_with_that_reason() -> None:
    async def scenario() -> list[tuple[str, str, float]]:
        queue: WorkQueue[str] = WorkQueue()
        started = time.monotonic()
        queue.add("a", "tick", after=5.0)
        queue.add("a", "pod_event", after=0.05)  # earlier: wins
        queue.add("a", "tick", after=1.0)  # later than what waits: ignored
        queue.add("b", "create")
        handed = []
        for _ in range(2):
            key, reason = await queue.get()
            handed.append((key, reason, time.monotonic() - started))
        assert len(queue) == 0
        return handed

    handed = asyncio.run(scenario())
    assert [(key, reason) for key, reason, _ in handed] == [("b", "create"), ("a", "pod_event")]
    assert 0.04 <= handed[1][2] < 1.0


def test_a_forgotten_key_is_never_handed_out_and_one_added_while_processed_comes_again() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("gone", "tick", after=0.01)
        queue.forget("gone")
        queue.add("job", "create")
        key, _ = await queue.get()  # being processed now...
        queue.add(key, "pod_event", after=0.01)  # ...when its pod changes
        again, reason = await asyncio.wait_for(queue.get(), timeout=1)
        assert "gone" not in queue
        return [key, again, reason]

    assert asyncio.run(scenario()) == ["job", "job", "pod_event"]
