"""Request/reply: bus.request() and handlers that answer by returning a value."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pydantic
import pytest
from _helpers import event_on

import pgbus
from pgbus.default_plugins.reply import REPLIES


class Total(pydantic.BaseModel):
    """A reply model, importable by the requester (module level)."""

    order: int
    total: int


@pytest.mark.both_buses
async def test_reply_is_decoded_into_the_handlers_return_model(make_bus, channel):
    """A handler annotated `-> Total` answers with a Total the requester gets back."""
    Query = event_on(channel)
    responder, requester = make_bus(), make_bus()

    @responder.subscribe(Query)
    async def answer(event: pgbus.Event) -> Total:
        return Total(order=event.n, total=event.n * 10)  # type: ignore[attr-defined]

    async with responder, requester:
        reply = await requester.request(Query(n=4), timeout=5)
    assert reply == Total(order=4, total=40)
    assert [s.name for s in requester.subscriptions] == [REPLIES]  # one LISTEN connection
    assert requester.channels == (requester.plugins.get("reply").channel,)


SHARED = """
import os

import pydantic

import pgbus


class Quote(pgbus.Event, channel=os.environ["QUOTE_CHANNEL"]):
    n: int


class Price(pydantic.BaseModel):
    n: int
    pid: int
"""

RESPONDER = """
import asyncio
import os

import pgbus
from shared import Price, Quote


async def main() -> None:
    bus = pgbus.Bus(load_entrypoints=False)

    @bus.subscribe(Quote)
    async def price(event: Quote) -> Price:
        return Price(n=event.n, pid=os.getpid())

    async with bus:
        print("ready", flush=True)
        await bus.wait_closed()


asyncio.run(main())
"""


async def test_reply_from_another_process_is_decoded(
    make_bus, channel, spawn, pg_dsn, tmp_path, monkeypatch
):
    """A responder in another process answers; its model is decoded from the imported module."""
    monkeypatch.setenv("QUOTE_CHANNEL", channel)
    (tmp_path / "shared.py").write_text(textwrap.dedent(SHARED))
    (tmp_path / "responder.py").write_text(textwrap.dedent(RESPONDER))
    responder = await spawn("responder.py", python=True, PGBUS_DSN=pg_dsn, QUOTE_CHANNEL=channel)
    assert (await responder.line()).strip() == "ready"
    sys.path.insert(0, str(tmp_path))
    try:
        import shared  # written by this test

        async with make_bus() as bus:
            reply = await bus.request(shared.Quote(n=5), timeout=10)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("shared", None)
    assert isinstance(reply, shared.Price)
    assert reply.n == 5
    assert reply.pid == responder.proc.pid


@pytest.mark.both_buses
async def test_untyped_reply_is_the_json_value(make_bus, channel):
    """A sync handler without a model annotation answers with plain JSON."""
    Query = event_on(channel)
    bus = make_bus()

    @bus.subscribe(Query)
    def answer(event: pgbus.Event, context: pgbus.Context) -> dict[str, object]:
        return {"n": event.n, "attempt": context.attempt}  # type: ignore[attr-defined]

    async with bus:
        assert await bus.request(Query(n=2), timeout=5) == {"n": 2, "attempt": 1}
        await bus.publish(Query(n=3))  # no reply address: the return value is ignored


@pytest.mark.both_buses
async def test_no_responder_raises_request_timeout(make_bus, channel):
    """Nobody answering (a handler returning None) is a RequestTimeout, a PgbusError."""
    Query = event_on(channel)
    bus = make_bus()
    seen = asyncio.Event()

    @bus.subscribe(Query)
    async def ignore(event: pgbus.Event) -> None:
        seen.set()

    async with bus:
        with pytest.raises(pgbus.RequestTimeout) as caught:
            await bus.request(Query(n=1), timeout=0.2)
        assert seen.is_set()
    assert isinstance(caught.value, pgbus.PgbusError)
    assert caught.value.timeout == 0.2


@pytest.mark.both_buses
async def test_failing_handler_answers_with_request_failed(make_bus, channel):
    """A handler failing for good (after its retries) answers with its error as text."""
    Query = event_on(channel)
    bus = make_bus()
    attempts: list[int] = []

    @bus.subscribe(Query, retry=pgbus.Retry(attempts=2, backoff=0))
    async def fail(event: pgbus.Event, context: pgbus.Context) -> int:
        attempts.append(context.attempt)
        raise ValueError("no such order")

    async with bus:
        with pytest.raises(pgbus.RequestFailed, match="ValueError: no such order") as caught:
            await bus.request(Query(n=1), timeout=5)
    assert caught.value.error == "ValueError: no such order"
    assert attempts == [1, 2]


@pytest.mark.both_buses
async def test_first_of_several_responders_wins(make_bus, channel):
    """With two responders the requester gets one reply; the other is counted as unmatched."""
    Query = event_on(channel)
    both = asyncio.Event()
    received: list[str] = []

    class Replies:
        @pgbus.hookimpl
        def pgbus_on_handled(self, subscription, delivery, duration):
            if subscription.name == REPLIES:
                received.append(delivery.message.payload)
                if len(received) == 2:
                    both.set()

    bus = make_bus(plugins=[Replies()])

    async def respond(event: pgbus.Event, context: pgbus.Context) -> str:
        return f"answer from {context.subscription}"

    bus.subscribe(Query, name="a")(respond)
    bus.subscribe(Query, name="b")(respond)
    async with bus:
        assert await bus.request(Query(n=1), timeout=5) in ("answer from a", "answer from b")
        await asyncio.wait_for(both.wait(), 5)
    assert bus.plugins.get("reply").unmatched == 1


@pytest.mark.both_buses
async def test_concurrent_requests_get_their_own_replies(make_bus, channel):
    """100 requests in flight at once each get the reply to their own event."""
    Query = event_on(channel)
    responder, requester = make_bus(), make_bus()

    @responder.subscribe(Query, concurrency=16)
    async def double(event: pgbus.Event) -> int:
        await asyncio.sleep(0)
        return event.n * 2  # type: ignore[attr-defined,no-any-return]

    async with responder, requester:
        replies = await asyncio.gather(
            *(requester.request(Query(n=i), timeout=10) for i in range(100))
        )
    assert replies == [i * 2 for i in range(100)]


@pytest.mark.both_buses
async def test_too_large_reply_is_a_request_failed(make_bus, channel):
    """A reply over NOTIFY's limit answers with a RequestFailed saying so."""
    Query = event_on(channel)
    bus = make_bus()

    @bus.subscribe(Query)
    async def huge(event: pgbus.Event) -> str:
        return "x" * 9000

    async with bus:
        with pytest.raises(pgbus.RequestFailed, match="NOTIFY accepts at most"):
            await bus.request(Query(n=1), timeout=5)


async def test_request_works_on_a_memory_bus(channel):
    """memory:// buses answer requests too (the plugin only uses listen and notify)."""
    Query = event_on(channel)
    bus = pgbus.Bus("memory://requests", load_entrypoints=False)

    @bus.subscribe(Query)
    async def answer(event: pgbus.Event) -> Total:
        return Total(order=event.n, total=0)  # type: ignore[attr-defined]

    async with bus:
        assert await bus.request(Query(n=7), timeout=5) == Total(order=7, total=0)


@pytest.mark.both_buses
async def test_bad_timeout_and_disabled_plugin_are_config_errors(make_bus, channel):
    """A non-positive timeout, a bus not started, or one without the reply plugin: ConfigError."""
    Query = event_on(channel)
    async with make_bus() as bus:
        with pytest.raises(pgbus.ConfigError, match="timeout"):
            await bus.request(Query(n=1), timeout=0)
    with pytest.raises(pgbus.ConfigError, match="running bus"):
        await make_bus().request(Query(n=1), timeout=1)
    async with make_bus(disable_plugins=["reply"]) as bare:
        with pytest.raises(pgbus.ConfigError, match="reply plugin"):
            await bare.request(Query(n=1), timeout=1)


@pytest.mark.both_buses
async def test_handler_timeout_answers_with_request_failed(make_bus, channel):
    """The reply middleware runs inside timeouts: a timed-out handler answers with its error."""
    Query = event_on(channel)
    bus = make_bus()
    never = asyncio.Event()

    @bus.subscribe(Query, timeout=0.05, retry=pgbus.Retry(attempts=1))
    async def slow(event: pgbus.Event) -> int:
        await never.wait()
        return 1

    async with bus:
        with pytest.raises(pgbus.RequestFailed, match="TimeoutError"):
            await bus.request(Query(n=1), timeout=5)


@pytest.mark.both_buses
async def test_stop_fails_waiting_requests_with_bus_closed(make_bus, channel):
    """Stopping the bus fails a request still waiting with BusClosed, not a late timeout."""
    Query = event_on(channel)
    bus = make_bus()
    started = asyncio.Event()

    @bus.subscribe(Query)
    async def ignore(event: pgbus.Event) -> None:
        started.set()

    await bus.start()
    waiting = asyncio.ensure_future(bus.request(Query(n=1), timeout=30))
    await asyncio.wait_for(started.wait(), 5)
    await bus.stop()
    with pytest.raises(pgbus.BusClosed):
        await asyncio.wait_for(waiting, 5)


@pytest.mark.both_buses
async def test_request_is_answered_after_timeouts_is_registered_again(make_bus, channel):
    """Re-registering timeouts (innermost then) still passes the handler's value to reply."""
    from pgbus.default_plugins.timeouts import Timeouts

    Query = event_on(channel)
    bus = make_bus()
    bus.plugins.unregister("timeouts")
    bus.plugins.register(Timeouts(warn_after=60.0), name="timeouts")

    @bus.subscribe(Query, timeout=5)
    async def answer(event: pgbus.Event) -> int:
        return 42

    async with bus:
        assert await bus.request(Query(n=1), timeout=5) == 42
