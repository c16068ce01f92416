"""The timeouts plugin: cancelling or reporting handlers at their timeout, the watchdog."""

from __future__ import annotations

import asyncio

import pytest
from _helpers import event_on, logged

import pgbus
from pgbus.default_plugins.timeouts import DEFAULT_WARN_AFTER, Timeouts

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


class Slow:
    """A plugin that hands every slow-handler report to the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, int, float]] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_slow_handler(self, subscription, delivery, elapsed) -> None:
        self.queue.put_nowait((subscription.name, delivery.event.n, elapsed))

    async def next(self) -> tuple[str, int, float]:
        return await asyncio.wait_for(self.queue.get(), 5)


async def test_hanging_handler_is_cancelled_at_its_timeout(make_bus, channel):
    """A handler that hangs is cancelled at its timeout, dead-lettered with a TimeoutError."""
    Job = event_on(channel)
    cancelled = asyncio.Event()
    handled: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus()

    @bus.subscribe(Job, name="hangs", timeout=0.2, retry=pgbus.Retry(attempts=1))
    async def handler(event: pgbus.Event) -> None:
        if event.n == 1:  # type: ignore[attr-defined]
            try:
                await asyncio.Event().wait()  # never set
            except asyncio.CancelledError:
                cancelled.set()
                raise
        await handled.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.publish_many([Job(n=1), Job(n=2)])
        assert await asyncio.wait_for(handled.get(), 5) == 2
    assert cancelled.is_set()
    [letter] = bus.dead_letters
    assert isinstance(letter.error, TimeoutError)
    assert "hangs timed out after 0.2 s" in str(letter.error)
    assert letter.attempts == 1


async def test_timed_out_attempt_can_be_retried(make_bus, channel):
    """With retry on=(TimeoutError,), an attempt cut off by its timeout is tried again."""
    Job = event_on(channel)
    calls: list[int] = []
    done = asyncio.Event()
    bus = make_bus()
    policy = pgbus.Retry(attempts=3, backoff=0, on=(TimeoutError,))

    @bus.subscribe(Job, timeout=0.1, retry=policy)
    async def handler(event: pgbus.Event) -> None:
        calls.append(event.n)  # type: ignore[attr-defined]
        if len(calls) == 1:
            await asyncio.Event().wait()  # hangs the first time only
        done.set()

    async with bus:
        await bus.publish(Job(n=4))
        await asyncio.wait_for(done.wait(), 5)
    assert calls == [4, 4]
    assert bus.dead_letters == []


async def test_handlers_own_timeout_error_is_not_relabelled(make_bus, channel):
    """A TimeoutError the handler raises itself is reported as it is, not as our timeout."""
    Job = event_on(channel)
    bus = make_bus()
    dead = asyncio.Event()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_dead_letter(self, dead_letter):
            dead.set()

    bus.plugins.register(Watch())

    @bus.subscribe(Job, timeout=30, retry=pgbus.Retry(attempts=1))
    async def handler(event: pgbus.Event) -> None:
        raise TimeoutError("upstream API")

    async with bus:
        await bus.publish(Job(n=1))
        await asyncio.wait_for(dead.wait(), 5)
    assert str(bus.dead_letters[0].error) == "upstream API"


async def test_report_mode_reports_and_lets_the_handler_finish(make_bus, channel):
    """With on_timeout="report" a handler past its timeout is reported, not cancelled."""
    Job = event_on(channel)
    slow = Slow()
    release = asyncio.Event()
    finished = asyncio.Event()
    bus = make_bus(plugins=[slow])

    @bus.subscribe(Job, name="patient", timeout=0.05, on_timeout="report")
    async def handler(event: pgbus.Event) -> None:
        await asyncio.wait_for(release.wait(), 5)
        finished.set()

    async with bus:
        await bus.publish(Job(n=8))
        name, n, elapsed = await slow.next()
        assert (name, n) == ("patient", 8)
        assert elapsed >= 0.05
        assert not finished.is_set()
        release.set()
        await asyncio.wait_for(finished.wait(), 5)
    assert bus.dead_letters == []
    assert bus.metrics.snapshot().subscriptions["patient"].handled == 1


async def test_hook_pgbus_on_slow_handler(make_bus, channel):
    """The watchdog reports a handler running past warn_after, once, through the hook and log."""
    Job = event_on(channel)
    slow = Slow()
    release = asyncio.Event()
    bus = make_bus(plugins=[slow])

    @bus.subscribe(Job, name="sluggish", warn_after=0.05, concurrency=2)
    async def handler(event: pgbus.Event) -> None:
        if event.n == 1:  # type: ignore[attr-defined]
            await asyncio.wait_for(release.wait(), 5)

    with logged("pgbus.default_plugins.timeouts") as records:
        async with bus:
            await bus.publish_many([Job(n=1), Job(n=2)])
            name, n, elapsed = await slow.next()
            release.set()
    assert (name, n) == ("sluggish", 1)
    assert elapsed >= 0.05
    assert slow.queue.empty()  # reported once, and the quick event 2 not at all
    assert any("sluggish has been running for" in r.getMessage() for r in records)


async def test_without_the_plugin_nothing_is_cut_off(make_bus, channel):
    """With the timeouts plugin blocked by name, a handler runs past its timeout to the end."""
    Job = event_on(channel)
    done = asyncio.Event()
    bus = make_bus(disable_plugins=["timeouts"])

    @bus.subscribe(Job, timeout=0.01)
    async def handler(event: pgbus.Event) -> None:
        await asyncio.sleep(0.05)  # work that takes longer than the unenforced timeout
        done.set()

    async with bus:
        await bus.publish(Job(n=1))
        await asyncio.wait_for(done.wait(), 5)
    assert bus.dead_letters == []


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"timeout": -1}, {"warn_after": 0}, {"on_timeout": "ignore"}],
)
def test_bad_timeout_options_are_refused(pg_dsn, options):
    """Non-positive timeouts and unknown on_timeout values are ConfigErrors at subscribe."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)
    with pytest.raises(pgbus.ConfigError):
        bus.subscribe("some_channel", **options)(lambda m: None)


def test_timeouts_plugin_default_threshold():
    """The plugin's default warning threshold is DEFAULT_WARN_AFTER; zero is refused."""
    assert Timeouts().warn_after == DEFAULT_WARN_AFTER
    with pytest.raises(pgbus.ConfigError):
        Timeouts(warn_after=0)
