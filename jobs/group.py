"""Group commit: callers queue work, and whoever finds no batch running runs everyone's.

A write that costs a fixed price per batch (a transaction's fsync, a trip to another thread)
should be paid once for everything queued meanwhile, not once per caller. Each caller queues its
items and takes the lock; if its items are not done by the time it gets the lock, it becomes
the leader: it lets the event loop turn once (so callers woken by the same network read can
queue too), takes the whole queue and runs it; the followers find their items done and return.
The batch runs shielded: a cancelled leader must not take the others' work down with it. A
caller cancelled before a leader took its items removes them, and nothing of them runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import anyio
import anyio.lowlevel

__all__ = ["GroupCommit", "Groupable"]


class Groupable(Protocol):
    """What an item must carry: set by :class:`GroupCommit` and by the batch function."""

    taken: bool  # a leader has it in its batch (set by GroupCommit)
    done: bool  # the batch function is through with it (set by that function, always)


ItemT = TypeVar("ItemT", bound=Groupable)


class GroupCommit(Generic[ItemT]):
    """Runs queued items in batches with ``run_batch``, which must mark every item ``done``
    (its outcome is the item's own business: a result or an error field)."""

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Awaitable[None]],
        *,
        lock: anyio.Lock | None = None,
    ) -> None:
        """``lock``: the lock a batch runs under (one shared with other writers), or its own."""
        self._run_batch = run_batch
        self._lock = lock or anyio.Lock()
        self._queue: list[ItemT] = []

    async def submit(self, items: Sequence[ItemT]) -> None:
        """Queue ``items`` and return once a batch holding them has run."""
        self._queue.extend(items)
        try:
            async with self._lock:
                if not all(i.done for i in items):
                    await anyio.lowlevel.checkpoint()
                    batch, self._queue = self._queue, []
                    for i in batch:
                        i.taken = True
                    with anyio.CancelScope(shield=True):
                        await self._run_batch(batch)
        except BaseException:
            for i in items:
                if not i.taken:
                    self._queue.remove(i)
            raise
