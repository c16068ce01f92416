"""The built-in metrics: in-memory counters and histograms per channel and per subscription.

``bus.metrics.snapshot()`` returns a typed, immutable :class:`MetricsSnapshot`:

* per channel (:class:`ChannelStats`): published, received, decoded, decode failures,
  dead letters;
* per subscription (:class:`SubscriptionStats`): received, handled, failed (attempts),
  retried, dead-lettered, dropped, the queue depth and running handlers, and two
  fixed-bucket histograms (:class:`HistogramSnapshot`): handler duration per attempt and
  end-to-end lag (the listener's receive time minus the publisher's timestamp);
* for the bus: connects, disconnects, reconnects, the last sample of PostgreSQL's
  ``pg_notification_queue_usage()``, taken by ``await bus.metrics.sample_queue_usage()``,
  and the gauges other plugins report (:meth:`Metrics.gauge`; the durable plugin's
  ``scheduled``: events published for later and not yet due).

The per-event cost is a few integer increments and two ``list.append`` calls (the
histograms sort their buffer into buckets every 1024 values), done by a handler
middleware built once per subscription (inside the retry middleware, so every attempt
is counted) and by the ``pgbus_on_published``/``pgbus_on_received`` observers. It stays
on by default; block it with ``Bus(disable_plugins=["metrics"])``.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
import time
from collections import Counter
from typing import TYPE_CHECKING

from pgbus._markers import hookimpl
from pgbus._subscription import is_own_cancellation
from pgbus.errors import ConfigError, Nack, PgbusError, Reject

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._bus import Bus
    from pgbus._events import DeadLetter, Delivery, Message
    from pgbus._publish import Connection
    from pgbus._subscription import Overflow, Subscription
    from pgbus.types import CallNext, Middleware, Outgoing

#: Upper bounds (seconds) of the histogram buckets; a last bucket holds everything above.
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclasses.dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Counts of observations (seconds) in fixed buckets.

    ``counts[i]`` counts values ``<= bounds[i]`` (and above the previous bound); the last
    count, ``counts[len(bounds)]``, counts values above every bound.

    .. versionadded:: 0.1.0
    """

    bounds: tuple[float, ...] = BUCKETS
    counts: tuple[int, ...] = (0,) * (len(BUCKETS) + 1)
    sum: float = 0.0

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    @property
    def mean(self) -> float | None:
        """The mean of the observed values, or ``None`` when there are none."""
        n = self.count
        return self.sum / n if n else None

    def quantile(self, q: float) -> float | None:
        """An upper bound of the ``q`` quantile: the bound of the bucket it falls in.

        :param q: between 0 and 1 (``0.99`` for p99).
        :returns: a bucket bound in seconds (``inf`` past the last bound), or ``None``
            when nothing was observed.
        :raises ConfigError: when ``q`` is not between 0 and 1.
        """
        if not 0 <= q <= 1:
            raise ConfigError(f"quantile must be between 0 and 1, not {q!r}")
        n = self.count
        if not n:
            return None
        rank = max(1, round(q * n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")  # pragma: no cover - the counts add up to n


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelStats:
    """Counters of one channel.

    :ivar published: events and raw payloads this bus published on it.
    :ivar received: notifications the listener received on it.
    :ivar decode_failures: notifications that could not be decoded.
    :ivar decoded: notifications decoded (received minus decode failures).
    :ivar dead_lettered: dead letters from it, decode failures and handlers that gave up.

    .. versionadded:: 0.1.0
    """

    published: int = 0
    received: int = 0
    decode_failures: int = 0
    decoded: int = 0
    dead_lettered: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """Counters, queue depth and histograms of one subscription.

    :ivar handled: deliveries its handler handled (once each, however many attempts).
    :ivar failed: failed attempts (a delivery that failed twice then succeeded adds 2).
    :ivar handler_seconds: total seconds spent in handler attempts.
    :ivar received: deliveries its handler started on.
    :ivar retried: attempts that were followed by a retry.
    :ivar dead_lettered: deliveries it gave up on.
    :ivar dropped: deliveries its overflow policy dropped.
    :ivar nacked: attempts whose handler raised :class:`~pgbus.Nack`.
    :ivar rejected: deliveries whose handler raised :class:`~pgbus.Reject`.
    :ivar pending: deliveries waiting in its queue when the snapshot was taken.
    :ivar running: deliveries being handled when the snapshot was taken.
    :ivar delayed: deliveries waiting out a nack's delay when the snapshot was taken
        (in memory, or persisted: a durable subscription's retries in the database).
    :ivar duration: handler duration per attempt.
    :ivar lag: receive time minus publish time of the deliveries it received.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.3.0 ``nacked``, ``rejected`` and ``delayed``.
    """

    handled: int = 0
    failed: int = 0
    handler_seconds: float = 0.0
    received: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    nacked: int = 0
    rejected: int = 0
    pending: int = 0
    running: int = 0
    delayed: int = 0
    duration: HistogramSnapshot = dataclasses.field(default_factory=HistogramSnapshot)
    lag: HistogramSnapshot = dataclasses.field(default_factory=HistogramSnapshot)


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A point-in-time copy of every counter.

    :ivar channels: per channel name.
    :ivar subscriptions: per subscription name.
    :ivar connects: LISTEN connections established.
    :ivar disconnects: LISTEN connections lost.
    :ivar reconnects: connections established after the first.
    :ivar queue_usage: the last sample of ``pg_notification_queue_usage()`` (0 to 1),
        ``None`` before :meth:`Metrics.sample_queue_usage` ran.
    :ivar queue_usage_at: when it was sampled (``time.time()``).
    :ivar gauges: bus-level values other plugins reported last (:meth:`Metrics.gauge`).

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.3.0 ``gauges`` and :attr:`scheduled`.
    """

    channels: dict[str, ChannelStats]
    subscriptions: dict[str, SubscriptionStats]
    connects: int
    disconnects: int
    reconnects: int = 0
    queue_usage: float | None = None
    queue_usage_at: float | None = None
    gauges: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def scheduled(self) -> int | None:
        """Events published for later and not yet due (durable mode), ``None`` elsewhere."""
        value = self.gauges.get("scheduled")
        return None if value is None else int(value)

    @property
    def delayed(self) -> int:
        """Deliveries waiting for a retry, over all subscriptions (the delayed backlog)."""
        return sum(s.delayed for s in self.subscriptions.values())

    @property
    def published(self) -> int:
        """Events and raw payloads published, over all channels."""
        return sum(c.published for c in self.channels.values())

    @property
    def received(self) -> int:
        """Notifications received, over all channels."""
        return sum(c.received for c in self.channels.values())

    @property
    def decoded(self) -> int:
        """Notifications decoded, over all channels."""
        return sum(c.decoded for c in self.channels.values())

    @property
    def handled(self) -> int:
        """Deliveries handled, over all subscriptions."""
        return sum(s.handled for s in self.subscriptions.values())

    @property
    def failed(self) -> int:
        """Failed handler attempts, over all subscriptions."""
        return sum(s.failed for s in self.subscriptions.values())

    @property
    def retried(self) -> int:
        """Retries, over all subscriptions."""
        return sum(s.retried for s in self.subscriptions.values())

    @property
    def dropped(self) -> int:
        """Deliveries dropped by overflow policies, over all subscriptions."""
        return sum(s.dropped for s in self.subscriptions.values())

    @property
    def nacked(self) -> int:
        """Nacked attempts, over all subscriptions."""
        return sum(s.nacked for s in self.subscriptions.values())

    @property
    def rejected(self) -> int:
        """Rejected deliveries, over all subscriptions."""
        return sum(s.rejected for s in self.subscriptions.values())

    @property
    def decode_failures(self) -> int:
        """Notifications that could not be decoded, over all channels."""
        return sum(c.decode_failures for c in self.channels.values())

    @property
    def dead_lettered(self) -> int:
        """Dead letters, over all channels."""
        return sum(c.dead_lettered for c in self.channels.values())


_CHANNEL = operator.attrgetter("channel")


def _count_channels(counts: Counter[str], items: Sequence[Message] | Sequence[Outgoing]) -> None:
    """Count ``items`` per channel; usually they all share one (a dispatcher round)."""
    channels = set(map(_CHANNEL, items))
    if len(channels) == 1:
        counts[channels.pop()] += len(items)
    else:
        counts.update(map(_CHANNEL, items))


#: Observations buffered before they are sorted into buckets (a bounded, batched cost).
_FOLD_AT = 1024
_FOLD_MASK = _FOLD_AT - 1  # a power of two: ``count & _FOLD_MASK`` is ``count % _FOLD_AT``


class _Histogram:
    """Fixed buckets, filled in batches: observing is one ``list.append``.

    Every ``_FOLD_AT`` observations (and at each snapshot) the buffer is sorted and
    counted into the buckets with one bisection per bound, which costs less per value
    than a bisection per observation.
    """

    __slots__ = ("buffer", "counts", "sum")

    def __init__(self) -> None:
        self.buffer: list[float] = []
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def fold(self) -> None:
        buffer = self.buffer
        if not buffer:
            return
        buffer.sort()
        counts = self.counts
        below = 0
        for i, bound in enumerate(BUCKETS):
            upto = bisect.bisect_right(buffer, bound)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(buffer) - below
        self.sum += sum(buffer)
        buffer.clear()

    def snapshot(self) -> HistogramSnapshot:
        self.fold()
        return HistogramSnapshot(BUCKETS, tuple(self.counts), self.sum)


class _SubCounts:
    __slots__ = (
        "dead_lettered",
        "dropped",
        "duration",
        "failed",
        "handled",
        "lag",
        "nacked",
        "received",
        "rejected",
        "retried",
    )

    def __init__(self) -> None:
        # one-item lists: the middleware's closure increments them without attribute lookups
        self.received = [0]
        self.handled = [0]
        self.failed = [0]
        self.nacked = [0]
        self.rejected = 0
        self.retried = 0
        self.dead_lettered = 0
        self.dropped = 0
        self.duration = _Histogram()
        self.lag = _Histogram()


class Metrics:
    """In-memory counters, one instance per Bus (``bus.metrics``), registered as ``"metrics"``.

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self._published: Counter[str] = Counter()
        self._received: Counter[str] = Counter()
        self._decode_failures: Counter[str] = Counter()
        self._dead_lettered: Counter[str] = Counter()
        self._subs: dict[str, _SubCounts] = {}
        self._connects = 0
        self._disconnects = 0
        self._queue_usage: float | None = None
        self._queue_usage_at: float | None = None
        self._gauges: dict[str, float] = {}
        self._bus: Bus | None = None

    def _sub(self, name: str) -> _SubCounts:
        counts = self._subs.get(name)
        if counts is None:
            counts = self._subs[name] = _SubCounts()
        return counts

    def snapshot(self) -> MetricsSnapshot:
        """Return a copy of the counters as they are now.

        :returns: the snapshot.
        """
        channels = (
            set(self._published)
            | set(self._received)
            | set(self._decode_failures)
            | set(self._dead_lettered)
        )
        live = {s.name: s for s in self._bus.subscriptions} if self._bus is not None else {}
        subs: dict[str, SubscriptionStats] = {}
        for name in sorted(set(self._subs) | set(live)):
            c = self._subs.get(name) or _SubCounts()
            sub = live.get(name)
            duration = c.duration.snapshot()
            subs[name] = SubscriptionStats(
                handled=c.handled[0],
                failed=c.failed[0],
                handler_seconds=duration.sum,
                received=c.received[0],
                retried=c.retried,
                dead_lettered=c.dead_lettered,
                dropped=c.dropped,
                nacked=c.nacked[0],
                rejected=c.rejected,
                pending=sub.pending if sub is not None else 0,
                running=sub.running if sub is not None else 0,
                delayed=sub.delayed if sub is not None else 0,
                duration=duration,
                lag=c.lag.snapshot(),
            )
        return MetricsSnapshot(
            channels={
                c: ChannelStats(
                    published=self._published[c],
                    received=self._received[c],
                    decode_failures=self._decode_failures[c],
                    decoded=max(0, self._received[c] - self._decode_failures[c]),
                    dead_lettered=self._dead_lettered[c],
                )
                for c in sorted(channels)
            },
            subscriptions=subs,
            connects=self._connects,
            disconnects=self._disconnects,
            reconnects=max(0, self._connects - 1),
            queue_usage=self._queue_usage,
            queue_usage_at=self._queue_usage_at,
            gauges=dict(self._gauges),
        )

    def gauge(self, name: str, value: float | None) -> None:
        """Report a bus-level gauge measured by another plugin, shown in every snapshot.

        The durable plugin reports ``"scheduled"`` (events published for later, not yet
        due) each time it looks at them; exporters (``/metrics``, the Prometheus plugin,
        :class:`~pgbus.MetricsPublisher`) pass the gauges on.

        :param name: the gauge's name (a Prometheus-friendly identifier).
        :param value: its value now; ``None`` removes it.

        .. versionadded:: 0.3.0
        """
        if value is None:
            self._gauges.pop(name, None)
        else:
            self._gauges[name] = float(value)

    async def sample_queue_usage(self, connection: Connection | None = None) -> float:
        """Sample PostgreSQL's ``pg_notification_queue_usage()`` into the metrics.

        The fraction (0 to 1) of the server's notification queue taken by notifications
        that some listener has not read yet; near 1, ``NOTIFY`` starts failing. Call it
        periodically (for example before exporting the snapshot).

        :param connection: an asyncpg connection to ask on (default: the bus's pool).
        :returns: the fraction.
        :raises ConfigError: when the plugin is not registered with a bus.
        :raises PgbusError: when PostgreSQL could not be asked (the driver's error is
            the ``__cause__``).
        """
        if connection is None and self._bus is None:
            raise ConfigError("this Metrics plugin is not registered with a bus")
        try:
            if connection is not None:
                value = await connection.fetchval("SELECT pg_notification_queue_usage()")
            else:
                pool = await self._bus.pool()  # type: ignore[union-attr]  # checked above
                value = await pool.fetchval("SELECT pg_notification_queue_usage()")
        except PgbusError:
            raise
        except Exception as exc:
            raise PgbusError(f"could not sample pg_notification_queue_usage(): {exc}") from exc
        self._queue_usage = float(value)
        self._queue_usage_at = time.time()
        return self._queue_usage

    @hookimpl
    def pgbus_configure(self, bus: Bus) -> None:
        """Remember the bus, for queue depths and its pool."""
        self._bus = bus

    @hookimpl
    def pgbus_handler_middleware(self, subscription: Subscription) -> Middleware:
        """Count and time each attempt of ``subscription``'s handler, and the lag."""
        counts = self._sub(subscription.name)
        received, handled, failed = counts.received, counts.handled, counts.failed
        nacked = counts.nacked
        duration, lag = counts.duration, counts.lag
        observe_duration, observe_lag = duration.buffer.append, lag.buffer.append
        clock = time.perf_counter

        async def measure(delivery: Delivery, call_next: CallNext) -> None:
            started = clock()
            if delivery.attempt == 1:
                count = received[0] = received[0] + 1
                if not count & _FOLD_MASK:  # bounds both buffers (retries are few)
                    lag.fold()
                    duration.fold()
                published_at = delivery.published_at
                if published_at is not None:
                    observe_lag(delivery.message.received_at - published_at)
            try:
                await call_next(delivery)
            except BaseException as exc:
                observe_duration(clock() - started)
                if not is_own_cancellation(exc):  # stop() cancelling is not a failure
                    failed[0] += 1
                    if isinstance(exc, Nack):
                        nacked[0] += 1
                raise
            observe_duration(clock() - started)
            handled[0] += 1

        return measure

    @hookimpl
    def pgbus_on_published(self, outgoing: Sequence[Outgoing]) -> None:
        """Count published events per channel."""
        _count_channels(self._published, outgoing)

    @hookimpl
    def pgbus_on_received(self, messages: Sequence[Message]) -> None:
        """Count received notifications per channel."""
        _count_channels(self._received, messages)

    @hookimpl
    def pgbus_on_decode_error(self, message: Message, error: BaseException) -> None:  # noqa: ARG002 - part of the hook's signature
        """Count decode failures per channel."""
        self._decode_failures[message.channel] += 1

    @hookimpl
    def pgbus_on_retry(
        self,
        subscription: Subscription,
        delivery: Delivery,  # noqa: ARG002 - part of the hook's signature
        attempt: int,  # noqa: ARG002 - part of the hook's signature
        delay: float,  # noqa: ARG002 - part of the hook's signature
        error: BaseException,  # noqa: ARG002 - part of the hook's signature
    ) -> None:
        """Count retries per subscription."""
        self._sub(subscription.name).retried += 1

    @hookimpl
    def pgbus_on_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Count dead letters per channel and subscription."""
        self._dead_lettered[dead_letter.channel] += 1
        if dead_letter.subscription is not None:
            counts = self._sub(dead_letter.subscription)
            counts.dead_lettered += 1
            if isinstance(dead_letter.error, Reject):
                counts.rejected += 1

    @hookimpl
    def pgbus_on_dropped(
        self,
        subscription: Subscription,
        delivery: Delivery,  # noqa: ARG002 - part of the hook's signature
        policy: Overflow,  # noqa: ARG002 - part of the hook's signature
    ) -> None:
        """Count deliveries dropped by overflow policies per subscription."""
        self._sub(subscription.name).dropped += 1

    @hookimpl
    def pgbus_on_connect(self, bus: Bus, channels: Sequence[str]) -> None:  # noqa: ARG002 - part of the hook's signature
        """Count listener connections."""
        self._connects += 1

    @hookimpl
    def pgbus_on_disconnect(self, bus: Bus, error: BaseException | None) -> None:  # noqa: ARG002 - part of the hook's signature
        """Count lost listener connections."""
        self._disconnects += 1
