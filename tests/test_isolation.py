"""What a plugin or a handler does wrong never breaks the data path or stop()."""

from __future__ import annotations

import asyncio
import time

import pytest
from _helpers import Collector, event_on, logged

import pgbus


class Raising:
    """A plugin whose per-event observers raise."""

    def __init__(self) -> None:
        self.calls = 0

    @pgbus.hookimpl
    def pgbus_on_received(self, messages):
        self.calls += 1
        raise RuntimeError("observer bug")

    @pgbus.hookimpl
    def pgbus_on_published(self, outgoing):
        raise RuntimeError("observer bug")


async def test_a_raising_on_received_stops_nothing(make_bus, channel):
    """A plugin raising in pgbus_on_received: events are still delivered, and it is counted."""
    Ping = event_on(channel)
    raising = Raising()
    bus = make_bus(plugins=[raising])
    got = Collector()
    bus.subscribe(Ping)(got)
    with logged("pgbus._plugins") as records:
        async with bus:
            await bus.publish_many([Ping(n=i) for i in range(3)])
            await got.wait_for(3, timeout=5)
            await bus.publish(Ping(n=3))
            await got.wait_for(4, timeout=5)
            assert bus.ready
    assert [e.n for e in got.items] == [0, 1, 2, 3]
    assert raising.calls >= 2
    assert bus.plugins.failures["pgbus_on_received:" + bus.plugins.pm.get_name(raising)] >= 2
    assert any("pgbus_on_received failed" in r.getMessage() for r in records)


async def test_a_raising_on_published_does_not_fail_the_publish(make_bus, channel):
    """publish() returns the id of an event that was sent, whatever an observer raised."""
    Ping = event_on(channel)
    bus = make_bus(plugins=[Raising()])
    got = Collector()
    bus.subscribe(Ping)(got)
    async with bus:
        event_id = await bus.publish(Ping(n=1))
        await got.wait_for(1, timeout=5)
        assert len(event_id) == 32
        assert await got.wait_for(1) == [Ping(n=1)]


async def test_a_failing_observer_does_not_silence_the_others(make_bus, channel):
    """Every implementation of an observer runs, even after an earlier one raised."""
    Ping = event_on(channel)
    counted: list[int] = []

    class Counting:
        @pgbus.hookimpl
        def pgbus_on_received(self, messages):
            counted.append(len(messages))

    # registered last, so pluggy would call Raising first and stop there
    bus = make_bus(plugins=[Counting(), Raising()])
    got = Collector()
    bus.subscribe(Ping)(got)
    async with bus:
        await bus.publish(Ping(n=1))
        await got.wait_for(1, timeout=5)
    assert sum(counted) == 1


async def test_ready_is_false_when_the_dispatcher_is_not_running(make_bus, channel, caplog):
    """bus.ready says False once the dispatch task has ended, and stop() says it had ended."""
    bus = make_bus()
    bus.subscribe(event_on(channel))(Collector())
    async with bus:
        assert bus.ready
        task = bus._dispatch._task
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bus.connected
        assert not bus.ready
    assert "the dispatcher task had been cancelled" in caplog.text


def test_an_async_synchronous_observer_is_refused(pg_dsn):
    """An async def pgbus_on_received is a PluginError at registration, not a lost coroutine."""

    class Async:
        @pgbus.hookimpl
        async def pgbus_on_received(self, messages):
            pass

    with pytest.raises(pgbus.PluginError, match=r"pgbus_on_received.*must not be async"):
        pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[Async()])


class Stop(BaseException):
    """A BaseException of the user's own."""


@pytest.mark.parametrize(
    "error", [asyncio.CancelledError(), Stop("custom"), GeneratorExit()], ids=type
)
async def test_a_handler_raising_a_base_exception_fails_like_any_other(make_bus, channel, error):
    """CancelledError, GeneratorExit and a custom BaseException from a handler are failures.

    The event is dead-lettered and the next event is handled.
    """
    Ping = event_on(channel)
    bus = make_bus()
    got = Collector()

    @bus.subscribe(Ping, retry=pgbus.Retry(attempts=1))
    async def handle(event: pgbus.Event) -> None:
        if event.n == 1:  # type: ignore[attr-defined]
            raise error
        await got(event)

    async with bus:
        await bus.publish_many([Ping(n=1), Ping(n=2)])
        await got.wait_for(1, timeout=5)
        dead = bus.dead_letters
    assert [e.n for e in got.items] == [2]
    assert [type(d.error) for d in dead] == [type(error)]
    assert bus.metrics.snapshot().subscriptions[handle.__qualname__].failed == 1


async def test_stop_returns_by_its_deadline_when_a_handler_swallows_cancellation(make_bus, channel):
    """A handler that ignores cancellation is abandoned and named; stop() does not hang."""
    Ping = event_on(channel)
    bus = make_bus()
    started = asyncio.Event()
    release = asyncio.Event()

    @bus.subscribe(Ping, name="stubborn")
    async def stubborn(event: pgbus.Event) -> None:
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:  # the bug under test: cancellation swallowed
                continue

    await bus.start()
    await bus.publish(Ping(n=1))
    await asyncio.wait_for(started.wait(), 5)
    with logged("pgbus._subscription") as records:
        began = time.monotonic()
        await asyncio.wait_for(bus.stop(timeout=1.0), 10)
        took = time.monotonic() - began
    release.set()  # let the abandoned handler end, for a clean test
    assert took < 1.0 + 0.5, took
    assert bus.subscriptions[0].abandoned == 1
    assert any("stubborn" in r.getMessage() and "abandoned" in r.getMessage() for r in records), [
        r.getMessage() for r in records
    ]
    await asyncio.sleep(0)  # its last step


async def test_stop_does_not_pull_the_servers_backlog_into_the_process(make_bus, channel):
    """Stopping a paused listener closes its connection without reading what is queued."""
    Ping = event_on(channel)
    bus = make_bus(stop_timeout=0.5)
    blocked = asyncio.Event()

    @bus.subscribe(Ping)
    async def slow(event: pgbus.Event) -> None:
        await blocked.wait()

    total = 60_000
    async with bus:
        for start in range(0, total, 10_000):
            await bus.publish_many([Ping(n=i) for i in range(start, start + 10_000)])
        async with asyncio.timeout(20):
            while not bus._listener.paused:  # noqa: ASYNC110 - a flag with no event; bounded
                await asyncio.sleep(0.01)
        taken_in = bus._listener.notifications
    assert bus._listener.notifications == taken_in < total // 2
