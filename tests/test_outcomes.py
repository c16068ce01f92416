"""Outcomes a handler decides: raise pgbus.Nack(delay=...) or pgbus.Reject(reason)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from _helpers import Letters, event_on, logged

import pgbus

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


async def test_nacked_delivery_does_not_hold_up_the_events_behind_it(make_bus, channel):
    """With concurrency=1, the events queued behind a nacked one are handled before its retry."""
    Order = event_on(channel)
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, retry=pgbus.Retry(attempts=3, backoff=0))
    async def handler(event: pgbus.Event, context: pgbus.Context) -> None:
        seen.append((event.n, context.attempt))  # type: ignore[attr-defined]
        if event.n == 1 and context.attempt == 1:  # type: ignore[attr-defined]
            raise pgbus.Nack(delay=dt.timedelta(milliseconds=20))
        if len(seen) == 4:
            done.set()

    async with bus:
        await bus.publish_many([Order(n=1), Order(n=2), Order(n=3)])
        await asyncio.wait_for(done.wait(), 5)
    assert seen == [(1, 1), (2, 1), (3, 1), (1, 2)]
    stats = bus.metrics.snapshot().subscriptions[handler.__qualname__]
    assert (stats.handled, stats.nacked, stats.retried, stats.delayed) == (3, 1, 1, 0)


async def test_nack_counts_as_an_attempt_and_dead_letters_at_the_last(make_bus, channel):
    """A handler always nacking runs `attempts` times; the Nack is then the dead letter's error."""
    Order = event_on(channel)
    letters = Letters()
    handled: list[str] = []

    class Handled:
        @pgbus.hookimpl
        def pgbus_on_handled(self, subscription, delivery, duration):
            handled.append(subscription.name)

    bus = make_bus(plugins=[letters, Handled()])

    # on= does not name Nack: a nack is retried under the policy's attempts all the same
    @bus.subscribe(Order, name="n", retry=pgbus.Retry(attempts=3, on=(TimeoutError,)))
    async def handler(event: pgbus.Event) -> None:
        raise pgbus.Nack(0)

    async with bus:
        await bus.publish(Order(n=1))
        letter = await letters.next()
    assert (letter.subscription, letter.attempts) == ("n", 3)
    assert isinstance(letter.error, pgbus.Nack)
    assert handled == []  # a nacked attempt is not reported as handled
    stats = bus.metrics.snapshot().subscriptions["n"]
    assert (stats.nacked, stats.retried, stats.dead_lettered, stats.rejected) == (3, 2, 1, 0)


async def test_sync_handler_may_nack(make_bus, channel):
    """A plain-def handler raising Nack is handled again, with the next attempt number."""
    Order = event_on(channel)
    attempts: list[int] = []
    done = asyncio.Event()
    bus = make_bus()
    loop = asyncio.get_running_loop()

    @bus.subscribe(Order)
    def handler(event: pgbus.Event, context: pgbus.Context) -> None:
        attempts.append(context.attempt)
        if context.attempt == 1:
            raise pgbus.Nack(delay=0.01)
        loop.call_soon_threadsafe(done.set)

    async with bus:
        await bus.publish(Order(n=1))
        await asyncio.wait_for(done.wait(), 5)
    assert attempts == [1, 2]


async def test_reject_dead_letters_at_once_without_retries(make_bus, channel):
    """A handler raising Reject is not retried: one attempt, a dead letter with the reason."""
    Order = event_on(channel)
    letters = Letters()
    calls: list[int] = []
    bus = make_bus(plugins=[letters])

    @bus.subscribe(Order, name="r", retry=pgbus.Retry(attempts=5, backoff=0))
    async def handler(event: pgbus.Event) -> None:
        calls.append(1)
        raise pgbus.Reject("malformed order")

    async with bus:
        await bus.publish(Order(n=1))
        letter = await letters.next()
    assert calls == [1]
    assert letter.attempts == 1
    assert isinstance(letter.error, pgbus.Reject)
    assert (letter.error.reason, str(letter.error)) == ("malformed order", "malformed order")
    stats = bus.metrics.snapshot().subscriptions["r"]
    assert (stats.rejected, stats.dead_lettered, stats.retried) == (1, 1, 0)


async def test_a_delayed_retry_waiting_at_stop_is_counted_and_logged(make_bus, channel):
    """The delayed gauge counts a nacked delivery waiting; stop() drops it with a warning."""
    Order = event_on(channel)
    nacked = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, name="late")
    async def handler(event: pgbus.Event) -> None:
        nacked.set()
        raise pgbus.Nack(delay=3600)

    with logged("pgbus") as records:
        async with bus:
            await bus.publish(Order(n=1))
            await asyncio.wait_for(nacked.wait(), 5)
            assert bus.metrics.snapshot().subscriptions["late"].delayed == 1
    assert any("waiting for a delayed retry" in r.getMessage() for r in records)
    assert bus.metrics.snapshot().subscriptions["late"].delayed == 0


@pytest.mark.parametrize("delay", [-1, -0.5, dt.timedelta(seconds=-1), float("inf"), "1", None])
def test_nack_refuses_a_bad_delay(delay):
    """Nack with a negative, infinite or non-numeric delay is a ConfigError."""
    with pytest.raises(pgbus.ConfigError, match="Nack: delay"):
        pgbus.Nack(delay=delay)


def test_nack_takes_seconds_or_a_timedelta():
    """Nack's delay is kept in seconds, from a number or a timedelta."""
    assert pgbus.Nack().delay == 0
    assert pgbus.Nack(2).delay == 2.0
    assert pgbus.Nack(delay=dt.timedelta(milliseconds=1500)).delay == 1.5
