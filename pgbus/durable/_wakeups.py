"""Wake-ups: the NOTIFYs of durable events, sent after their journal rows committed.

A durable publish only inserts into the journal: a NOTIFY in the writer's transaction
would take PostgreSQL's cluster-wide notify lock through the commit's WAL flush, and
serialize every notifying commit in the cluster (see docs/durable.md). The publishing
process sends the notifications itself, outside any writer's transaction, from the
consumers' pool (``synchronous_commit=off``: the journal is what is durable, a lost
wake-up costs only latency, so the notifying commit does not wait for a flush):

* a pool publish committed when its statement returned: its notifications go at once;
* a ``connection=`` publish commits when the caller commits, which the server does not
  tell this process: an asyncpg connection tells as its ``COMMIT`` returns (see
  :func:`commit_signal`; not while such publishes come more often than
  :attr:`Wakeups.busy_gap`), another driver's, and those, are looked at in the process
  itself (no round trip) every :attr:`Wakeups.tick` seconds; once it has left its transaction
  (committed or rolled back) the transaction id is looked up with ``pg_xact_status``
  (by the statement that sends the notifications of those committed: one round trip);
  without a connection that tells (or once it is in a transaction again) the id is
  polled (every few ms, backing off to :attr:`Wakeups.max_delay`). Its notifications go
  once it is visible to new snapshots and their journal rows are there (a rolled-back
  savepoint may have undone them), are dropped if it aborted, and given up after
  :attr:`Wakeups.window`.

The consumers of this process are woken directly, without waiting for their own
NOTIFY to come back from the server (see :meth:`DurablePlugin.wake_local`).

Each round sends whatever is ready in one statement, in publish order. A wake-up that is
lost (the process died, the listener was down) is made up by the consumers' catch-up on
reconnect and their ``poll_interval`` backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from pgbus._publish import NOTIFY_MANY_CHANNELS
from pgbus.durable._consumer import DRIVER_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable

    from pgbus._publish import Connection
    from pgbus.durable._plugin import DurablePlugin

logger = logging.getLogger(__name__)


def transaction_probe(connection: Any) -> Callable[[], bool] | None:
    """Whether the caller's ``connection`` is in a transaction, told by its driver.

    No round trip: the drivers keep the server's last transaction status. ``None`` for
    a connection that does not tell (a pool: each statement commits).
    """
    in_transaction = getattr(connection, "is_in_transaction", None)  # asyncpg
    if callable(in_transaction):
        return in_transaction  # type: ignore[no-any-return]
    info = getattr(connection, "info", None)  # psycopg
    status = getattr(info, "transaction_status", None)
    if status is not None:
        idle = type(status).IDLE
        return lambda: info.transaction_status != idle  # type: ignore[union-attr]
    in_transaction = getattr(connection, "in_transaction", None)  # SQLAlchemy
    return in_transaction if callable(in_transaction) else None


def commit_signal(
    connection: Any, left: Callable[[], bool], signal: Callable[[], None]
) -> Callable[[], None] | None:
    """Call ``signal`` once ``connection`` has ``left`` its transaction (:meth:`Pending.left`).

    asyncpg calls its query loggers as each statement returns, the caller's ``COMMIT``
    (or ``ROLLBACK``) included: the commit is seen then, not at the next look. The
    logger removes itself then (before the caller can release the connection to its
    pool: it is called first). ``None`` for the other drivers, which are looked at.

    :returns: what removes the logger sooner (done with the transaction otherwise).
    """
    add = getattr(connection, "add_query_logger", None)
    remove = getattr(connection, "remove_query_logger", None)
    if not callable(add) or not callable(remove):
        return None

    def unhook() -> None:
        with contextlib.suppress(Exception):  # gone already, or released to its pool
            remove(logged)

    def logged(_record: object) -> None:
        if left():
            unhook()
            signal()

    add(logged)
    return unhook


class Pending:
    """The notifications of one publish statement, waiting for their transaction."""

    __slots__ = ("channels", "deadline", "ids", "in_transaction", "payloads", "unhook", "xid")

    def __init__(
        self,
        xid: int | None,
        channels: list[str],
        payloads: list[str],
        deadline: float,
        in_transaction: Callable[[], bool] | None,
        *,
        ids: list[str] | None = None,
    ) -> None:
        self.xid = xid  # None: committed already
        self.channels = channels
        self.payloads = payloads
        #: The event ids of the notifications (those of a transaction that commits are
        #: sent only if their rows are in the journal: a savepoint may have undone them).
        self.ids = ids
        self.deadline = deadline
        #: The caller's connection's probe while it may still tell of the commit.
        self.in_transaction = in_transaction
        #: Removes the caller's connection's signal of the commit (see commit_signal).
        self.unhook: Callable[[], None] | None = None

    def done(self) -> None:
        """Stop listening to the caller's connection: decided, or looked up by id now."""
        self.in_transaction = None
        if self.unhook is not None:
            self.unhook()
            self.unhook = None

    def left(self) -> bool:
        """Whether the caller's connection has left the transaction (look it up now)."""
        probe = self.in_transaction
        if probe is None:
            return False
        try:
            return not probe()
        except Exception:  # e.g. released to its pool: ask the server
            return True


class Wakeups:
    """Sends the wake-ups of one plugin's publishes (a task that runs while any wait)."""

    def __init__(self, plugin: DurablePlugin) -> None:
        self.plugin = plugin
        #: Seconds between the first looks at a pending transaction (doubling from here).
        self.min_delay = 0.002
        #: The longest wait between looks at a pending transaction.
        self.max_delay = 0.05
        #: Seconds between looks at the callers' connections (in this process), and
        #: between look-ups on the server while all of them are in their transaction.
        self.tick = 0.001
        self.probe_wait = 1.0
        #: Seconds between ``connection=`` publishes (smoothed) below which an asyncpg
        #: connection does not signal its commit (:func:`commit_signal`): publishes that
        #: come as often as the tick looks have their commits seen by the tick as soon,
        #: and a look per tick costs less than a query logger per transaction.
        self.busy_gap = 0.001
        self._gap = 1.0
        self._last = time.monotonic()
        #: ``connection=`` publishes whose connection signalled its commit.
        self.signalled = 0
        #: Seconds a transaction is waited for; after that its wake-up is left to the poll.
        self.window = 600.0
        #: Notifications sent, and those dropped (aborted, or given up on).
        self.sent = 0
        self.dropped = 0
        #: Look-ups of pending transactions' status on the server.
        self.lookups = 0
        self._queue: list[Pending] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def add(
        self,
        xid: int | None,
        channels: list[str],
        payloads: list[str],
        in_transaction: Callable[[], bool] | None = None,
        connection: Any = None,
        *,
        ids: list[str] | None = None,
    ) -> None:
        """Queue notifications: ``xid`` ``None`` when their journal rows committed.

        ``in_transaction`` tells whether the caller's ``connection`` is still in the
        transaction that journaled them (see :func:`transaction_probe`); an asyncpg
        connection also signals when it left (see :func:`commit_signal`). ``ids`` are
        the notifications' event ids, given with ``xid``.
        """
        if not channels:
            return
        now = time.monotonic()
        pending = Pending(xid, channels, payloads, now + self.window, in_transaction, ids=ids)
        if xid is not None and in_transaction is not None and connection is not None:
            self._gap += (now - self._last - self._gap) / 8
            self._last = now
            if self._gap >= self.busy_gap:
                pending.unhook = commit_signal(connection, pending.left, self._arrived.set)
                self.signalled += pending.unhook is not None
        self._queue.append(pending)
        if xid is None:  # ready now; a transaction just begun is looked at on schedule
            self.plugin.wake_local(channels)  # this process's consumers at once
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
            for p in self._queue:
                p.done()
            self._queue.clear()

    async def _run(self) -> None:
        delay = self.min_delay
        while self._queue:
            await self._until_ready(delay)
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

    async def _until_ready(self, delay: float) -> None:
        """Wait up to ``delay`` s for something to send, looking at the connections.

        While every pending transaction has a connection that tells, the server is
        asked only once one has left its transaction, or after :attr:`probe_wait` (a
        connection already in its next transaction when looked at).
        """
        loop = asyncio.get_running_loop()
        probing = all(p.in_transaction is not None for p in self._queue if p.xid is not None)
        deadline = loop.time() + (max(delay, self.probe_wait) if probing else delay)
        while not self._arrived.is_set():
            if any(p.xid is None or p.left() for p in self._queue):
                return
            wait = deadline - loop.time()
            if wait <= 0:
                return
            timer = loop.call_later(min(wait, self.tick), self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()
            if loop.time() >= deadline:
                return
            if not self._closing and not any(p.xid is None for p in self._queue):
                self._arrived.clear()  # only the tick: keep looking

    async def _round(self) -> bool:
        """Send what is ready; ``True`` when something was sent or dropped.

        One statement: the look-up of the pending transactions and the notifications of
        those committed (with those of the publishes known to have committed).
        """
        queue = list(self._queue)  # what is queued during the statement waits a round
        if not queue:
            return False
        left = [p.left() for p in queue]  # before the look-up: a commit seen then is in it
        # This process's consumers are woken before the statement for the publishes whose
        # caller's connection has left its transaction: committed, or rolled back (then a
        # pump finds nothing: no harm); for those known to have committed, they were
        # woken when the notifications were queued (add).
        early = [
            c
            for p, gone in zip(queue, left, strict=True)
            if p.xid is not None and gone
            for c in p.channels
        ]
        if early:  # not after a wait for a connection of the pool; and they go first
            self.plugin.wake_local(early)
            await asyncio.sleep(0)
        pool = await self.plugin.pool()
        async with pool.acquire() as conn:
            self.plugin.sending_from(conn)
            status = await self._send(conn, queue)
            decided = [
                c
                for p, gone in zip(queue, left, strict=True)
                if not gone and p.xid in status and not status[p.xid]
                for c in p.channels
            ]
            self.plugin.wake_local(decided)
        now = time.monotonic()
        ready = []
        for p, gone in zip(queue, left, strict=True):
            if gone and p.xid not in status:  # its connection is in another one:
                p.done()  # poll the id (with backoff) from now on
            if p.xid is None or p.xid in status or p.deadline < now:
                if p.xid is not None and (status.get(p.xid, True)):
                    self.dropped += len(p.channels)  # aborted, or waited for too long
                else:
                    self.sent += len(p.channels)
                ready.append(p)
        if not ready:
            return False
        for p in ready:
            p.done()
        done = {id(p) for p in ready}
        self._queue = [p for p in self._queue if id(p) not in done]
        return True

    async def _send(self, conn: Connection, queue: list[Pending]) -> dict[int, bool | None]:
        """Send the notifications whose transaction committed; the decided transactions.

        :returns: per transaction id decided, whether it aborted (``None``: unknown,
            treated as committed).
        """
        waiting = {p.xid for p in queue if p.xid is not None}
        channels: list[str] = [c for p in queue for c in p.channels]
        payloads: list[str] = [x for p in queue for x in p.payloads]
        if not waiting:
            await conn.execute(NOTIFY_MANY_CHANNELS, channels, payloads)
            return {}
        xids: list[int | None] = []
        ids: list[str | None] = []
        for p in queue:
            xids += [p.xid] * len(p.channels)
            ids += p.ids or [None] * len(p.channels)
        rows = await conn.fetch(
            self.plugin.sql.send_committed,
            [str(x) for x in waiting],
            channels,
            payloads,
            xids,
            ids,
        )
        self.lookups += 1
        return {row["xid"]: row["aborted"] for row in rows if row["xid"] is not None}
