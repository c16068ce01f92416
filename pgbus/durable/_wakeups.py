"""Wake-ups: the NOTIFYs of durable events, sent after their journal rows committed.

A durable publish only inserts into the journal: a NOTIFY in the writer's transaction
would take PostgreSQL's cluster-wide notify lock through the commit's WAL flush, and
serialize every notifying commit in the cluster (see docs/durable.md). The publishing
process sends the notifications itself, outside any writer's transaction, from the
consumers' pool (``synchronous_commit=off``: the journal is what is durable, a lost
wake-up costs only latency, so the notifying commit does not wait for a flush):

* a pool publish committed when its statement returned: its notifications go at once;
* a ``connection=`` publish commits when the caller commits, which this process cannot
  observe: its transaction id is polled with ``pg_xact_status`` (every few ms, backing
  off to :attr:`Wakeups.max_delay`) and its notifications go once it is visible to new
  snapshots, are dropped if it aborted, and given up after :attr:`Wakeups.window`.

Each round sends whatever is ready in one statement, in publish order. A wake-up that is
lost (the process died, the listener was down) is made up by the consumers' catch-up on
reconnect and their ``poll_interval`` backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from pgbus._publish import NOTIFY_MANY_CHANNELS
from pgbus.durable._consumer import DRIVER_ERRORS

if TYPE_CHECKING:
    from pgbus._publish import Connection
    from pgbus.durable._plugin import DurablePlugin

logger = logging.getLogger(__name__)

# The transactions of ``$1`` that every new snapshot sees (committed), and those aborted.
XACT_STATUS = """
    SELECT x::text::bigint AS xid, pg_xact_status(x) = 'aborted' AS aborted
    FROM unnest($1::text[]::xid8[]) AS t(x)
    WHERE pg_xact_status(x) IS DISTINCT FROM 'in progress'
      AND (pg_xact_status(x) = 'aborted' OR pg_visible_in_snapshot(x, pg_current_snapshot()))"""


class Pending:
    """The notifications of one publish statement, waiting for their transaction."""

    __slots__ = ("channels", "deadline", "payloads", "xid")

    def __init__(
        self, xid: int | None, channels: list[str], payloads: list[str], deadline: float
    ) -> None:
        self.xid = xid  # None: committed already
        self.channels = channels
        self.payloads = payloads
        self.deadline = deadline


class Wakeups:
    """Sends the wake-ups of one plugin's publishes (a task that runs while any wait)."""

    def __init__(self, plugin: DurablePlugin) -> None:
        self.plugin = plugin
        #: Seconds between the first looks at a pending transaction (doubling from here).
        self.min_delay = 0.002
        #: The longest wait between looks at a pending transaction.
        self.max_delay = 0.05
        #: Seconds a transaction is waited for; after that its wake-up is left to the poll.
        self.window = 600.0
        #: Notifications sent, and those dropped (aborted, or given up on).
        self.sent = 0
        self.dropped = 0
        self._queue: list[Pending] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def add(self, xid: int | None, channels: list[str], payloads: list[str]) -> None:
        """Queue notifications: ``xid`` ``None`` when their journal rows committed."""
        if not channels:
            return
        self._queue.append(Pending(xid, channels, payloads, time.monotonic() + self.window))
        if xid is None:  # ready now; a transaction just begun is looked at on schedule
            self._arrived.set()
        if not self._closing and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="pgbus-durable-wakeups")

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline
        """Send what is ready (waiting up to ``timeout`` s), then stop looking."""
        task = self._task
        self._closing = True
        self._arrived.set()
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        self._closing = False
        if self._queue:
            logger.debug("durable: %d pending wake-ups left to the poll", len(self._queue))
            self.dropped += sum(len(p.channels) for p in self._queue)
            self._queue.clear()

    async def _run(self) -> None:
        delay = self.min_delay
        while self._queue:
            if all(p.xid is not None for p in self._queue):  # nothing ready: look later
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), delay)
            self._arrived.clear()
            try:
                progressed = await self._round()
            except DRIVER_ERRORS as exc:
                logger.debug("durable: sending wake-ups failed: %s", exc)
                if self._closing:
                    return
                delay = min(delay * 2, self.max_delay)
                await asyncio.sleep(delay)  # the server is away: try again later
                continue
            if not self._queue or self._closing:
                return
            delay = self.min_delay if progressed else min(delay * 2, self.max_delay)

    async def _round(self) -> bool:
        """Send what is ready; ``True`` when something was sent or dropped."""
        queue = self._queue
        if not queue:
            return False
        pool = await self.plugin.pool()
        async with pool.acquire() as conn:
            ready = await self._ready(conn, queue)
            if not ready:
                return False
            channels = [c for p in ready for c in p.channels]
            payloads = [x for p in ready for x in p.payloads]
            if channels:
                await conn.execute(NOTIFY_MANY_CHANNELS, channels, payloads)
        self.sent += len(channels)
        done = {id(p) for p in ready}
        self._queue = [p for p in self._queue if id(p) not in done]
        return True

    async def _ready(self, conn: Connection, queue: list[Pending]) -> list[Pending]:
        """The queued notifications to send now (aborted and expired ones emptied)."""
        waiting = {p.xid for p in queue if p.xid is not None}
        status: dict[int, bool] = {}
        if waiting:
            rows = await conn.fetch(XACT_STATUS, [str(x) for x in waiting])
            status = {row["xid"]: row["aborted"] for row in rows}
        now = time.monotonic()
        ready = []
        for p in queue:
            if p.xid is None or p.xid in status or p.deadline < now:
                if p.xid is not None and (status.get(p.xid, True)):
                    self.dropped += len(p.channels)  # aborted, or waited for too long
                    p.channels, p.payloads = [], []
                ready.append(p)
        return ready
