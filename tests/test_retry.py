"""The retry plugin: per-subscription and bus-wide policies, observers, ordering."""

from __future__ import annotations

import asyncio

import pytest
from _helpers import event_on

import pgbus
from pgbus.default_plugins.retry import DEFAULT_RETRY, RetryPlugin

#: Shared behaviour: each test runs on the PostgreSQL bus and on a memory:// bus.
pytestmark = pytest.mark.both_buses


NO_DELAY = pgbus.Retry(attempts=5, backoff=0)


async def test_handler_failing_twice_then_succeeding_is_called_three_times(make_bus, channel):
    """A handler that fails twice then succeeds is called three times; the event is handled once."""
    Order = event_on(channel)
    calls: list[int] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, retry=NO_DELAY)
    async def handler(event: pgbus.Event) -> None:
        calls.append(event.n)  # type: ignore[attr-defined]
        if len(calls) < 3:
            raise RuntimeError(f"failure {len(calls)}")
        done.set()

    async with bus:
        await bus.publish(Order(n=7))
        await asyncio.wait_for(done.wait(), 5)
    assert calls == [7, 7, 7]
    stats = bus.metrics.snapshot().subscriptions[handler.__qualname__]
    assert (stats.handled, stats.failed, stats.retried, stats.dead_lettered) == (1, 2, 2, 0)
    assert bus.dead_letters == []


async def test_hook_pgbus_on_retry(make_bus, channel):
    """Each failed attempt that is retried is reported with its number, delay and error."""
    Order = event_on(channel)
    seen: list[tuple[str, int, int, float, str]] = []
    done = asyncio.Event()

    class Watch:
        @pgbus.hookimpl
        async def pgbus_on_retry(self, subscription, delivery, attempt, delay, error):
            seen.append((subscription.name, delivery.attempt, attempt, delay, str(error)))

    bus = make_bus(plugins=[Watch()])
    policy = pgbus.Retry(attempts=3, backoff=lambda attempt: attempt / 1000)

    @bus.subscribe(Order, name="charge", retry=policy)
    async def handler(event: pgbus.Event) -> None:
        if len(seen) < 2:
            raise ValueError(f"attempt {len(seen) + 1}")
        done.set()

    async with bus:
        await bus.publish(Order(n=1))
        await asyncio.wait_for(done.wait(), 5)
    assert seen == [("charge", 1, 1, 0.001, "attempt 1"), ("charge", 2, 2, 0.002, "attempt 2")]


async def test_exhausted_retries_give_a_dead_letter_with_the_attempts(make_bus, channel):
    """A handler that always fails is called `attempts` times, then dead-lettered."""
    Order = event_on(channel)
    calls: list[int] = []
    bus = make_bus()
    dead = asyncio.Event()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_dead_letter(self, dead_letter):
            dead.set()

    bus.plugins.register(Watch())

    @bus.subscribe(Order, retry=pgbus.Retry(attempts=4, backoff=0))
    async def handler(event: pgbus.Event) -> None:
        calls.append(event.n)  # type: ignore[attr-defined]
        raise RuntimeError("always")

    async with bus:
        await bus.publish(Order(n=3))
        await asyncio.wait_for(dead.wait(), 5)
    assert calls == [3, 3, 3, 3]
    [letter] = bus.dead_letters
    assert letter.attempts == 4
    assert str(letter.error) == "always"


async def test_errors_not_in_on_are_not_retried(make_bus, channel):
    """With on=(TimeoutError,), a ValueError fails at once: one call, one attempt."""
    Order = event_on(channel)
    calls: list[int] = []
    dead = asyncio.Event()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_dead_letter(self, dead_letter):
            dead.set()

    bus = make_bus(plugins=[Watch()])

    @bus.subscribe(Order, retry=pgbus.Retry(attempts=5, backoff=0, on=(TimeoutError,)))
    async def handler(event: pgbus.Event) -> None:
        calls.append(event.n)  # type: ignore[attr-defined]
        raise ValueError("not retryable")

    async with bus:
        await bus.publish(Order(n=1))
        await asyncio.wait_for(dead.wait(), 5)
    assert calls == [1]
    assert bus.dead_letters[0].attempts == 1


async def test_bus_wide_default_applies_to_subscriptions_without_a_policy(make_bus, channel):
    """Bus(retry=...) is the policy of subscriptions that set none; their own one wins."""
    Order = event_on(channel)
    calls: dict[str, int] = {"default": 0, "own": 0}
    dead: asyncio.Queue[str] = asyncio.Queue()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_dead_letter(self, dead_letter):
            dead.put_nowait(dead_letter.subscription)

    bus = make_bus(retry=pgbus.Retry(attempts=2, backoff=0), plugins=[Watch()])

    @bus.subscribe(Order, name="default")
    async def by_default(event: pgbus.Event) -> None:
        calls["default"] += 1
        raise RuntimeError

    @bus.subscribe(Order, name="own", retry=pgbus.Retry(attempts=3, backoff=0))
    async def own(event: pgbus.Event) -> None:
        calls["own"] += 1
        raise RuntimeError

    async with bus:
        await bus.publish(Order(n=1))
        names = {await asyncio.wait_for(dead.get(), 5) for _ in range(2)}
    assert names == {"default", "own"}
    assert calls == {"default": 2, "own": 3}


async def test_disabling_the_retry_plugin_runs_handlers_once(make_bus, channel):
    """With the retry plugin blocked by name, a failing handler runs once and is dead-lettered."""
    Order = event_on(channel)
    calls: list[int] = []
    dead = asyncio.Event()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_dead_letter(self, dead_letter):
            dead.set()

    bus = make_bus(disable_plugins=["retry"], plugins=[Watch()])

    @bus.subscribe(Order, retry=NO_DELAY)
    async def handler(event: pgbus.Event) -> None:
        calls.append(event.n)  # type: ignore[attr-defined]
        raise RuntimeError

    async with bus:
        await bus.publish(Order(n=1))
        await asyncio.wait_for(dead.wait(), 5)
    assert calls == [1]
    assert bus.plugins.get("retry") is None


async def test_ordered_subscription_holds_later_events_during_retries(make_bus, channel):
    """With concurrency=1 the next event waits until the failing one's retries end."""
    Order = event_on(channel)
    calls: list[int] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, retry=NO_DELAY)
    async def handler(event: pgbus.Event) -> None:
        calls.append(event.n)  # type: ignore[attr-defined]
        if event.n == 1 and calls.count(1) < 3:  # type: ignore[attr-defined]
            raise RuntimeError
        if event.n == 2:  # type: ignore[attr-defined]
            done.set()

    async with bus:
        await bus.publish_many([Order(n=1), Order(n=2)])
        await asyncio.wait_for(done.wait(), 5)
    assert calls == [1, 1, 1, 2]


async def test_concurrent_subscription_goes_on_during_retries(make_bus, channel):
    """With concurrency=2 a later event is handled while an earlier one waits for its retry."""
    Order = event_on(channel)
    calls: list[int] = []
    second_handled = asyncio.Event()
    first_handled = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Order, concurrency=2, retry=NO_DELAY)
    async def handler(event: pgbus.Event) -> None:
        calls.append(event.n)  # type: ignore[attr-defined]
        if event.n == 1:  # type: ignore[attr-defined]
            if calls.count(1) == 1:
                raise RuntimeError("first attempt fails")
            await asyncio.wait_for(second_handled.wait(), 5)  # retry waits for event 2
            first_handled.set()
        else:
            second_handled.set()

    async with bus:
        await bus.publish_many([Order(n=1), Order(n=2)])
        await asyncio.wait_for(first_handled.wait(), 5)
    assert calls.count(1) == 2
    assert calls.index(2) < len(calls) - 1  # event 2 came before the retry finished


async def test_retries_never_hold_up_other_subscriptions(make_bus, channel):
    """While one subscription waits to retry, another subscription gets the same event."""
    Order = event_on(channel)
    other_got_it = asyncio.Event()
    verdict: list[bool] = []

    class Watch:
        @pgbus.hookimpl
        async def pgbus_on_retry(self, subscription, delivery, attempt, delay, error):
            try:
                await asyncio.wait_for(other_got_it.wait(), 5)
            except TimeoutError:
                verdict.append(False)
            else:
                verdict.append(True)

    bus = make_bus(plugins=[Watch()])
    bus.subscribe(Order, name="flaky", retry=pgbus.Retry(attempts=2, backoff=0))(_fail_once())

    @bus.subscribe(Order, name="other")
    async def other(event: pgbus.Event) -> None:
        other_got_it.set()

    async with bus:
        await bus.publish(Order(n=1))
        await asyncio.wait_for(other_got_it.wait(), 5)
    assert verdict == [True]


def _fail_once():
    calls: list[object] = []

    async def handler(event: pgbus.Event) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("once")

    return handler


def test_retry_delays_grow_and_are_capped():
    """The delay doubles per attempt from `backoff`, up to `max_delay`; jitter stays within it."""
    policy = pgbus.Retry(attempts=10, backoff=1.0, factor=2.0, max_delay=5.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = pgbus.Retry(backoff=1.0, factor=2.0, max_delay=5.0)
    assert all(1.0 <= jittered.delay(2) <= 2.0 for _ in range(50))
    assert DEFAULT_RETRY.attempts == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"backoff": -1},
        {"factor": 0.5},
        {"max_delay": -1},
        {"on": ()},
        {"on": (BaseException,)},
        {"on": (asyncio.CancelledError,)},
    ],
)
def test_bad_policies_are_refused(kwargs):
    """A policy that cannot work is a ConfigError when it is made."""
    with pytest.raises(pgbus.ConfigError):
        pgbus.Retry(**kwargs)


def test_a_policy_of_one_attempt_adds_no_middleware(pg_dsn):
    """Retry(attempts=1) turns retrying off for a subscription (no middleware at all)."""
    plugin = RetryPlugin()
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)
    plugin.pgbus_configure(bus)
    sub = pgbus.Subscription(
        name="s",
        channels=["c"],
        event_types=[],
        handler=print,
        retry=pgbus.Retry(attempts=1),
    )
    assert plugin.pgbus_handler_middleware(sub) is None
    assert plugin.policy(sub).attempts == 1
