"""What the dashboard shows: live metrics from the buses, and the durable tables.

The metrics come from :class:`pgbus.MetricsPublisher` snapshots on ``pgbus.metrics``,
taken in by the same :class:`~pgbus.cli._top.Board` as ``pgbus top`` and kept as a
history of a few minutes for the plots. The durable figures come from the functions
behind ``pgbus durable`` and ``pgbus dead-letters``; only what those do not report
(members and their leases, the age of the backlog, scheduled events) is queried here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt  # noqa: TC003 - dataclass fields are resolved at run time
import logging
import time
from typing import TYPE_CHECKING, Any

from pgbus._bus import Bus
from pgbus._identifiers import check_identifier, quote_ident
from pgbus.cli._top import Board, parse_snapshot
from pgbus.durable import DurableSubscription, list_subscriptions, schema_version

if TYPE_CHECKING:
    import asyncpg

    from pgbus._events import Message
    from pgbus._publish import Connection

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    """One bus at one snapshot, summed over its channels and subscriptions (for the plots)."""

    ts: float
    received: float | None
    handled: float | None
    errors: float | None
    lag_avg: float | None
    lag_max: float | None
    handler_avg: float | None


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _point(snapshot: dict[str, Any], before: dict[str, Any] | None) -> Point:
    rates = snapshot.get("rates", {})
    channels = snapshot.get("channels", {})
    lags = [c["lag_avg"] for c in channels.values() if c.get("lag_avg") is not None]
    maxes = [c["lag_max"] for c in channels.values() if c.get("lag_max") is not None]
    handler_avg = None
    if before is not None:
        now_subs, then_subs = snapshot.get("subscriptions", {}), before.get("subscriptions", {})
        seconds = attempts = 0.0
        for name, now in now_subs.items():
            then = then_subs.get(name, {})
            seconds += now.get("handler_seconds", 0.0) - then.get("handler_seconds", 0.0)
            attempts += (now.get("handled", 0) + now.get("failed", 0)) - (
                then.get("handled", 0) + then.get("failed", 0)
            )
        handler_avg = seconds / attempts if attempts > 0 else None
    errors = [
        None if r.get("failed") is None else r["failed"] + (r.get("decode_failures") or 0.0)
        for r in rates.values()
    ]
    return Point(
        ts=float(snapshot["ts"]),
        received=_sum([r.get("received") for r in rates.values()]),
        handled=_sum([r.get("handled") for r in rates.values()]),
        errors=_sum(errors),
        lag_avg=max(lags) if lags else None,
        lag_max=max(maxes) if maxes else None,
        handler_avg=handler_avg,
    )


class Collector:
    """Listens to the buses' metrics snapshots and samples the notification queue.

    :param dsn: the database.
    :param channel: the channel the buses publish their snapshots on.
    :param window: seconds of history kept for the plots.
    :param interval: seconds between samples of ``pg_notification_queue_usage()``.
    """

    def __init__(self, dsn: str, channel: str, *, window: float, interval: float) -> None:
        self.dsn = dsn
        self.channel = channel
        self.window = window
        self.interval = interval
        self.board = Board()
        self.history: dict[str, collections.deque[Point]] = {}
        self.queue_usage: collections.deque[tuple[float, float]] = collections.deque()
        self._bus: Bus | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.pool: asyncpg.Pool | None = None

    async def start(self, pool: asyncpg.Pool) -> None:
        """Start listening (on a bus of its own) and sampling (on ``pool``)."""
        self.pool = pool
        bus = Bus(self.dsn, load_entrypoints=False)
        bus.subscribe(self.channel, name="pgbus-dashboard")(self._on_snapshot)
        await bus.start()
        self._bus = bus
        self._sampler = asyncio.get_running_loop().create_task(
            self._sample(), name="pgbus-dashboard-queue-usage"
        )

    async def stop(self) -> None:
        """Stop listening and sampling."""
        self._stop.set()
        if self._sampler is not None:
            await self._sampler
        if self._bus is not None:
            await self._bus.stop()

    async def _on_snapshot(self, message: Message) -> None:
        snapshot = parse_snapshot(message.payload)
        if snapshot is not None:
            self.add(snapshot)

    def add(self, snapshot: dict[str, Any]) -> None:
        """Take in one snapshot: the board's latest, and a point of the bus's history."""
        name = str(snapshot.get("bus"))
        before = self.board.latest.get(name)
        self.board.add(snapshot)
        points = self.history.setdefault(name, collections.deque())
        points.append(_point(snapshot, before))
        horizon = snapshot["ts"] - self.window
        while points and points[0].ts < horizon:
            points.popleft()

    def buses(self) -> dict[str, dict[str, Any]]:
        """The live buses (stale ones forgotten), by id: latest snapshot and history."""
        self.board.prune(time.time())
        for name in set(self.history) - set(self.board.latest):
            del self.history[name]
        return {
            name: {"snapshot": snap, "history": list(self.history.get(name, ()))}
            for name, snap in sorted(self.board.latest.items())
        }

    async def sample_queue_usage(self) -> float:
        """Ask PostgreSQL for ``pg_notification_queue_usage()`` now, and keep the sample."""
        assert self.pool is not None  # noqa: S101 - start() sets it
        usage = float(await self.pool.fetchval("SELECT pg_notification_queue_usage()"))
        now = time.time()
        self.queue_usage.append((now, usage))
        while self.queue_usage and self.queue_usage[0][0] < now - self.window:
            self.queue_usage.popleft()
        return usage

    async def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sample_queue_usage()
            except Exception as exc:  # the database is away: the next sample will tell
                logger.debug("queue usage not sampled: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """A batch a member of a consumer group holds."""

    member: str
    batches: int
    events: int
    until: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionView:
    """A durable subscription with what the dashboard adds to ``pgbus durable list``."""

    subscription: DurableSubscription
    position: str
    backlog_seconds: float | None
    leases: tuple[Lease, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Scheduled:
    """An event published with ``delay=`` or ``at=``, not yet due."""

    id: int
    due_at: dt.datetime
    channel: str
    type: str
    event_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class DurableView:
    """The durable page: subscriptions, and events scheduled for later."""

    installed: bool
    subscriptions: tuple[SubscriptionView, ...]
    scheduled: tuple[Scheduled, ...]
    scheduled_total: int


async def durable_view(conn: Connection, schema: str, limit: int = 50) -> DurableView:
    """Everything the durable page shows, read from ``schema``."""
    if await schema_version(conn, schema) is None:
        return DurableView(installed=False, subscriptions=(), scheduled=(), scheduled_total=0)
    subscriptions = await list_subscriptions(conn, schema)
    s = quote_ident(check_identifier(schema, "schema name"))
    leases: dict[str, list[Lease]] = collections.defaultdict(list)
    for row in await conn.fetch(
        f"""SELECT subscription, rtrim(claimed_by, '+') AS member, count(*) AS batches,
                   sum(cardinality(journal_ids))::bigint AS events, max(claimed_until) AS until
            FROM {s}.batches WHERE claimed_by IS NOT NULL AND claimed_until > now()
            GROUP BY subscription, member ORDER BY subscription, member"""  # noqa: S608 - quoted identifier
    ):
        leases[row["subscription"]].append(
            Lease(row["member"], row["batches"], row["events"], row["until"])
        )
    extra = {
        row["name"]: row
        for row in await conn.fetch(
            f"SELECT s.name, s.snap::text AS position, now() FROM {s}.subscriptions s"  # noqa: S608 - quoted identifier
        )
    }
    scheduled = await conn.fetch(
        f"""SELECT id, due_at, channel, type, event_id, count(*) OVER () AS total
            FROM {s}.scheduled ORDER BY due_at, id LIMIT $1""",  # noqa: S608 - quoted identifier
        limit,
    )
    return DurableView(
        installed=True,
        subscriptions=tuple(
            SubscriptionView(
                subscription=sub,
                position=extra[sub.name]["position"] if sub.name in extra else "",
                backlog_seconds=None
                if sub.oldest is None or sub.name not in extra
                else max(0.0, (extra[sub.name]["now"] - sub.oldest).total_seconds()),
                leases=tuple(leases.get(sub.name, ())),
            )
            for sub in subscriptions
        ),
        scheduled=tuple(
            Scheduled(row["id"], row["due_at"], row["channel"], row["type"], row["event_id"])
            for row in scheduled
        ),
        scheduled_total=scheduled[0]["total"] if scheduled else 0,
    )
