"""Concurrency per subscription, its bounded queue and the overflow policies."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from _helpers import event_on, logged

import pgbus

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


class Drops:
    """A plugin that hands every dropped delivery to the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, int, pgbus.Overflow]] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_dropped(self, subscription, delivery, policy) -> None:
        self.queue.put_nowait((subscription.name, delivery.event.n, policy))

    async def take(self, n: int) -> list[tuple[str, int, pgbus.Overflow]]:
        return [await asyncio.wait_for(self.queue.get(), 5) for _ in range(n)]


async def test_concurrency_four_runs_four_at_once_and_no_more(make_bus, channel):
    """concurrency=4 runs 4 handlers at once; the other deliveries wait in the queue."""
    Tick = event_on(channel)
    running = 0
    most = 0
    four = asyncio.Event()
    release = asyncio.Event()
    seen_all = asyncio.Event()
    done: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Tick, name="work", concurrency=4)
    async def work(event: pgbus.Event) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 4:
            four.set()
        await asyncio.wait_for(release.wait(), 5)
        running -= 1
        await done.put(event.n)  # type: ignore[attr-defined]

    counted: list[object] = []

    @bus.subscribe(channel, name="count")  # subscribed after: offered each message after "work"
    async def count(message: pgbus.Message) -> None:
        counted.append(message)
        if len(counted) == 10:
            seen_all.set()

    async with bus:
        await bus.publish_many([Tick(n=i) for i in range(10)])
        await asyncio.wait_for(four.wait(), 5)
        await asyncio.wait_for(seen_all.wait(), 5)  # all 10 are queued or running by now
        sub = next(s for s in bus.subscriptions if s.name == "work")
        assert (sub.running, sub.pending, most) == (4, 6, 4)
        release.set()
        finished = sorted([await asyncio.wait_for(done.get(), 5) for _ in range(10)])
    assert finished == list(range(10))
    assert most == 4


async def test_default_concurrency_keeps_publish_order(make_bus, channel):
    """With the default concurrency=1 events are handled one at a time, in publish order."""
    Tick = event_on(channel)
    order: list[int] = []
    running = 0
    overlap = False
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Tick)
    async def handler(event: pgbus.Event) -> None:
        nonlocal running, overlap
        running += 1
        overlap = overlap or running > 1
        await asyncio.sleep(0)
        order.append(event.n)  # type: ignore[attr-defined]
        running -= 1
        if len(order) == 50:
            done.set()

    async with bus:
        await bus.publish_many([Tick(n=i) for i in range(25)])
        await bus.publish_many([Tick(n=i) for i in range(25, 50)])
        await asyncio.wait_for(done.wait(), 5)
    assert order == list(range(50))
    assert not overlap


async def test_sync_handlers_run_in_worker_threads_concurrently(make_bus, channel):
    """Plain def handlers run in a thread pool; with concurrency=2 two run at the same time."""
    Tick = event_on(channel)
    barrier = threading.Barrier(2, timeout=5)
    threads: set[int] = set()
    loop = asyncio.get_running_loop()
    done: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Tick, concurrency=2)
    def handler(event: pgbus.Event) -> None:
        threads.add(threading.get_ident())
        barrier.wait()  # both handlers must be running at once to pass
        loop.call_soon_threadsafe(done.put_nowait, event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.publish_many([Tick(n=1), Tick(n=2)])
        got = {await asyncio.wait_for(done.get(), 5) for _ in range(2)}
    assert got == {1, 2}
    assert len(threads) == 2
    assert threading.get_ident() not in threads


async def _fill(bus, tick: type[pgbus.Event], started: asyncio.Event) -> None:
    """Publish 1 (which the handler holds), then 2..6 in one statement."""
    await bus.publish(tick(n=1))
    await asyncio.wait_for(started.wait(), 5)
    await bus.publish_many([tick(n=i) for i in range(2, 7)])


@pytest.mark.parametrize(
    ("policy", "handled", "dropped"),
    [
        (pgbus.Overflow.DROP_NEWEST, [1, 2, 3], [4, 5, 6]),
        (pgbus.Overflow.DROP_OLDEST, [1, 5, 6], [2, 3, 4]),
        ("drop_oldest", [1, 5, 6], [2, 3, 4]),
    ],
)
async def test_drop_policies_drop_what_they_say(make_bus, channel, policy, handled, dropped):
    """A full queue (max_pending=2) drops the newest or the oldest deliveries, and reports each."""
    Tick = event_on(channel)
    drops = Drops()
    started = asyncio.Event()
    release = asyncio.Event()
    got: list[int] = []
    all_done = asyncio.Event()
    bus = make_bus(plugins=[drops])

    @bus.subscribe(Tick, name="bounded", max_pending=2, overflow=policy)
    async def handler(event: pgbus.Event) -> None:
        started.set()
        await asyncio.wait_for(release.wait(), 5)
        got.append(event.n)  # type: ignore[attr-defined]
        if len(got) == 3:
            all_done.set()

    async with bus:
        await _fill(bus, Tick, started)
        reported = await drops.take(3)
        release.set()
        await asyncio.wait_for(all_done.wait(), 5)
    assert got == handled
    assert reported == [("bounded", n, pgbus.Overflow(policy)) for n in dropped]
    sub = bus.subscriptions[0]
    assert sub.dropped == 3
    assert bus.metrics.snapshot().subscriptions["bounded"].dropped == 3


async def test_hook_pgbus_on_dropped(make_bus, channel):
    """Each dropped delivery goes to pgbus_on_dropped; the first drop is logged as a warning."""
    Tick = event_on(channel)
    drops = Drops()
    started = asyncio.Event()
    release = asyncio.Event()
    bus = make_bus(plugins=[drops])

    @bus.subscribe(Tick, name="lossy", max_pending=2, overflow="drop_newest")
    async def handler(event: pgbus.Event) -> None:
        started.set()
        await asyncio.wait_for(release.wait(), 5)

    with logged("pgbus._subscription") as records:
        async with bus:
            await _fill(bus, Tick, started)
            assert [n for _, n, _ in await drops.take(3)] == [4, 5, 6]
            release.set()
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "lossy" in warnings[0]
    assert "drop_newest" in warnings[0]


async def test_wait_policy_loses_nothing(make_bus, channel):
    """With overflow="wait" (the default) a full queue delays its handler and drops nothing."""
    Tick = event_on(channel)
    drops = Drops()
    started = asyncio.Event()
    release = asyncio.Event()
    got: list[int] = []
    all_done = asyncio.Event()
    bus = make_bus(plugins=[drops])

    @bus.subscribe(Tick, name="patient", max_pending=1)
    async def handler(event: pgbus.Event) -> None:
        started.set()
        await asyncio.wait_for(release.wait(), 5)
        got.append(event.n)  # type: ignore[attr-defined]
        if len(got) == 6:
            all_done.set()

    async with bus:
        await _fill(bus, Tick, started)
        release.set()
        await asyncio.wait_for(all_done.wait(), 5)
    assert got == [1, 2, 3, 4, 5, 6]
    assert drops.queue.empty()
    assert bus.subscriptions[0].overflow is pgbus.Overflow.WAIT


async def test_a_waiting_subscription_does_not_hold_up_the_others(make_bus, channel):
    """A full queue with overflow="wait" holds back its own events only, in order."""
    Tick = event_on(channel)
    release = asyncio.Event()
    stuck: list[int] = []
    quick: list[int] = []
    quick_done = asyncio.Event()
    stuck_done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Tick, name="stuck", max_pending=2)
    async def slow(event: pgbus.Event) -> None:
        await asyncio.wait_for(release.wait(), 10)
        stuck.append(event.n)  # type: ignore[attr-defined]
        if len(stuck) == 50:
            stuck_done.set()

    @bus.subscribe(Tick, name="quick")
    async def fast(event: pgbus.Event) -> None:
        quick.append(event.n)  # type: ignore[attr-defined]
        if len(quick) == 50:
            quick_done.set()

    async with bus:
        await bus.publish_many([Tick(n=i) for i in range(50)])
        await asyncio.wait_for(quick_done.wait(), 5)
        assert stuck == []  # everything reached "quick" while "stuck" had not moved
        assert bus.subscriptions[0].pending >= 47
        release.set()
        await asyncio.wait_for(stuck_done.wait(), 5)
    assert quick == stuck == list(range(50))


async def test_a_dropping_subscription_does_not_slow_the_others(make_bus, channel):
    """A full subscription with a drop policy never holds up another one on the same channel."""
    Tick = event_on(channel)
    started = asyncio.Event()
    release = asyncio.Event()
    other: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Tick, name="stuck", max_pending=1, overflow="drop_newest")
    async def stuck(event: pgbus.Event) -> None:
        started.set()
        await asyncio.wait_for(release.wait(), 5)

    @bus.subscribe(Tick, name="free")
    async def free(event: pgbus.Event) -> None:
        await other.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        await _fill(bus, Tick, started)
        got = [await asyncio.wait_for(other.get(), 5) for _ in range(6)]
        release.set()
    assert got == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "options", [{"concurrency": 0}, {"max_pending": 0}, {"overflow": "explode"}]
)
def test_bad_concurrency_options_are_refused(pg_dsn, options):
    """concurrency and max_pending below 1 and unknown overflow policies are ConfigErrors."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)
    with pytest.raises(pgbus.ConfigError):
        bus.subscribe("some_channel", **options)(lambda m: None)
