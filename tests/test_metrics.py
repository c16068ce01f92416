"""The metrics plugin: counters per channel and subscription, histograms, depths, queue usage."""

from __future__ import annotations

import asyncio
import math

import pytest
from _helpers import Letters, event_on

import pgbus
from pgbus.default_plugins.metrics import BUCKETS


@pytest.mark.both_buses
async def test_counters_per_channel_and_subscription(make_bus, channel):
    """Published, received, decoded, decode failures, handled, failed, retried, dead-lettered."""
    Sale = event_on(channel)
    letters = Letters()
    handled: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus(plugins=[letters])
    calls: dict[int, int] = {}

    @bus.subscribe(Sale, name="sales", retry=pgbus.Retry(attempts=3, backoff=0))
    async def handler(event: pgbus.Event) -> None:
        n = event.n  # type: ignore[attr-defined]
        calls[n] = calls.get(n, 0) + 1
        if n == 2 and calls[n] == 1:
            raise RuntimeError("flaky")  # fails once, then succeeds
        if n == 3:
            raise RuntimeError("poison")  # fails 3 times, dead-lettered
        await handled.put(n)

    async with bus:
        await bus.publish_many([Sale(n=1), Sale(n=2), Sale(n=3)])
        await bus.notify(channel, "garbage")
        await bus.publish(Sale(n=4))
        assert sorted([await asyncio.wait_for(handled.get(), 5) for _ in range(3)]) == [1, 2, 4]
        for _ in range(2):
            await asyncio.wait_for(letters.queue.get(), 5)
    snap = bus.metrics.snapshot()
    ch = snap.channels[channel]
    assert (ch.published, ch.received, ch.decoded, ch.decode_failures, ch.dead_lettered) == (
        5,
        5,
        4,
        1,
        2,
    )
    sub = snap.subscriptions["sales"]
    assert (sub.received, sub.handled, sub.failed, sub.retried, sub.dead_lettered) == (
        4,
        3,
        4,
        3,
        1,
    )
    assert sub.duration.count == 7  # one observation per attempt
    assert sub.handler_seconds == pytest.approx(sub.duration.sum)
    assert sub.lag.count == 4  # one per delivery, from the envelope timestamp
    assert sub.lag.quantile(0.5) is not None
    assert (snap.published, snap.received, snap.decoded, snap.decode_failures) == (5, 5, 4, 1)
    assert (snap.handled, snap.failed, snap.retried, snap.dead_lettered, snap.dropped) == (
        3,
        4,
        3,
        2,
        0,
    )
    assert snap.connects == 1
    assert snap.reconnects == 0


@pytest.mark.both_buses
async def test_queue_depth_and_running_handlers_are_in_the_snapshot(make_bus, channel):
    """While a handler is held, the snapshot shows it running and the rest pending."""
    Sale = event_on(channel)
    started = asyncio.Event()
    release = asyncio.Event()
    seen = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Sale, name="held")
    async def held(event: pgbus.Event) -> None:
        started.set()
        await asyncio.wait_for(release.wait(), 5)

    count: list[object] = []

    @bus.subscribe(channel, name="marker")
    async def marker(message: pgbus.Message) -> None:
        count.append(message)
        if len(count) == 5:
            seen.set()

    async with bus:
        await bus.publish_many([Sale(n=i) for i in range(5)])
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(seen.wait(), 5)
        stats = bus.metrics.snapshot().subscriptions["held"]
        assert (stats.running, stats.pending) == (1, 4)
        release.set()
    stats = bus.metrics.snapshot().subscriptions["held"]
    assert (stats.running, stats.pending, stats.handled) == (0, 0, 5)


async def test_notification_queue_usage_is_sampled(make_bus, channel, pg_conn):
    """sample_queue_usage() asks PostgreSQL and puts the fraction into the snapshot."""
    bus = make_bus()
    bus.subscribe(channel)(lambda m: None)
    assert bus.metrics.snapshot().queue_usage is None
    async with bus:
        usage = await bus.metrics.sample_queue_usage()
        on_conn = await bus.metrics.sample_queue_usage(connection=pg_conn)
    assert 0.0 <= usage <= 1.0
    assert 0.0 <= on_conn <= 1.0
    snap = bus.metrics.snapshot()
    assert snap.queue_usage == on_conn
    assert snap.queue_usage_at is not None


async def test_reconnects_are_counted(make_bus, channel, pg_conn):
    """After the listener's backend is terminated and it reconnects, reconnects is 1."""
    connected: asyncio.Queue[int] = asyncio.Queue()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_connect(self, bus, channels):
            connected.put_nowait(1)

    bus = make_bus(plugins=[Watch()])
    bus.subscribe(channel)(lambda m: None)
    async with bus:
        await asyncio.wait_for(connected.get(), 5)
        await pg_conn.execute("SELECT pg_terminate_backend($1)", bus.listener_pid)
        await asyncio.wait_for(connected.get(), 10)
        snap = bus.metrics.snapshot()
    assert (snap.connects, snap.disconnects, snap.reconnects) == (2, 1, 1)


@pytest.mark.both_buses
async def test_metrics_can_be_disabled(make_bus, channel):
    """Blocking "metrics" removes bus.metrics (ConfigError); events still flow."""
    Sale = event_on(channel)
    got: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus(disable_plugins=["metrics"])

    @bus.subscribe(Sale)
    async def handler(event: pgbus.Event) -> None:
        await got.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.publish(Sale(n=1))
        assert await asyncio.wait_for(got.get(), 5) == 1
    with pytest.raises(pgbus.ConfigError):
        _ = bus.metrics


def test_histogram_snapshot_quantiles():
    """quantile() gives the bound of the bucket the quantile falls in; empty gives None."""
    counts = [0] * (len(BUCKETS) + 1)
    counts[BUCKETS.index(0.001)] = 90  # 90 values of at most 1 ms
    counts[BUCKETS.index(0.1)] = 9
    counts[-1] = 1  # one above every bound
    hist = pgbus.HistogramSnapshot(BUCKETS, tuple(counts), 2.0)
    assert hist.count == 100
    assert hist.mean == pytest.approx(0.02)
    assert hist.quantile(0.5) == 0.001
    assert hist.quantile(0.95) == 0.1
    assert hist.quantile(1.0) == math.inf
    assert pgbus.HistogramSnapshot().quantile(0.5) is None
    assert pgbus.HistogramSnapshot().mean is None
    with pytest.raises(pgbus.ConfigError):
        hist.quantile(1.5)


def test_snapshot_without_a_bus_is_empty():
    """A fresh snapshot has no channels or subscriptions and zero totals."""
    from pgbus.default_plugins.metrics import Metrics

    snap = Metrics().snapshot()
    assert snap.channels == {}
    assert snap.subscriptions == {}
    assert (snap.published, snap.handled, snap.reconnects) == (0, 0, 0)
