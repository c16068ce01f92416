"""One test per hook (``test_hook_<name>``), plus meta-tests that keep that true."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from pathlib import Path

import pytest
from _helpers import Letters, event_on

import pgbus
from pgbus import hookspecs

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("pgbus_"))
TESTS = Path(__file__).parent


def test_every_hook_is_documented():
    """Each hook has a docstring that documents every parameter and when it was added."""
    for name in HOOKS:
        spec = getattr(hookspecs, name)
        doc = inspect.getdoc(spec) or ""
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"
        assert ".. versionadded::" in doc, name


def test_every_hook_has_a_test():
    """For every hook there is a test_hook_<name> somewhere in the suite."""
    source = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    missing = [n for n in HOOKS if not re.search(rf"def test_hook_{n}\b", source)]
    assert not missing


def test_hook_pgbus_configure(pg_dsn):
    """pgbus_configure runs for plugins given to the bus and for those registered later."""
    seen: list[object] = []

    class P:
        @pgbus.hookimpl
        def pgbus_configure(self, bus):
            seen.append(bus)

    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[P()])
    bus.plugins.register(P())
    assert seen == [bus, bus]


async def test_hook_pgbus_encoder(make_bus, channel, pg_conn):
    """A registered encoder decides the payload on the wire."""
    Ping = event_on(channel)

    class Plain:
        @pgbus.hookimpl
        def pgbus_encoder(self, event_type):
            return lambda out: f"n={out.event.n}"

    got: asyncio.Queue[str] = asyncio.Queue()
    await pg_conn.add_listener(channel, lambda *a: got.put_nowait(a[3]))
    bus = make_bus(plugins=[Plain()])
    await bus.publish(Ping(n=4))
    assert await asyncio.wait_for(got.get(), 5) == "n=4"


async def test_hook_pgbus_decoder(make_bus, channel):
    """The decoder is asked once per channel with the channel's models, not per event."""
    Ping = event_on(channel)
    calls: list[tuple[str, tuple[type, ...]]] = []

    class Spy:
        @pgbus.hookimpl
        def pgbus_decoder(self, channel, event_types):
            calls.append((channel, tuple(event_types)))

    got: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    bus = make_bus(plugins=[Spy()])
    bus.subscribe(Ping)(got.put)
    async with bus:
        await bus.publish_many([Ping(n=1), Ping(n=2)])
        assert [await asyncio.wait_for(got.get(), 5) for _ in range(2)] == [Ping(n=1), Ping(n=2)]
    assert calls == [(channel, (Ping,))]


async def test_hook_pgbus_router(make_bus, channel):
    """A registered router decides which subscriptions get a delivery."""
    Ping = event_on(channel)

    class EvenOnlyToFirst:
        @pgbus.hookimpl
        def pgbus_router(self, channel, subscriptions):
            by_name = {s.name: s for s in subscriptions}
            return lambda d: (by_name["a"],) if d.event.n % 2 == 0 else (by_name["b"],)

    a: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    b: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    bus = make_bus(plugins=[EvenOnlyToFirst()])
    bus.subscribe(Ping, name="a")(a.put)
    bus.subscribe(Ping, name="b")(b.put)
    async with bus:
        await bus.publish_many([Ping(n=1), Ping(n=2)])
        assert await asyncio.wait_for(a.get(), 5) == Ping(n=2)
        assert await asyncio.wait_for(b.get(), 5) == Ping(n=1)


async def test_hook_pgbus_handler_middleware(make_bus, channel):
    """Middleware wraps each handler call, last-registered plugin outermost."""
    Ping = event_on(channel)
    trace: list[str] = []

    def plugin(tag: str) -> object:
        class P:
            @pgbus.hookimpl
            def pgbus_handler_middleware(self, subscription):
                async def mw(delivery, call_next):
                    trace.append(f"{tag}>")
                    await call_next(delivery)
                    trace.append(f"<{tag}")

                return mw

        return P()

    done = asyncio.Event()
    bus = make_bus(plugins=[plugin("inner"), plugin("outer")])

    @bus.subscribe(Ping)
    async def handler(event: pgbus.Event) -> None:
        trace.append("handler")
        done.set()

    async with bus:
        await bus.publish(Ping(n=1))
        await asyncio.wait_for(done.wait(), 5)
    assert trace == ["outer>", "inner>", "handler", "<inner", "<outer"]


async def test_hook_pgbus_on_published(make_bus, channel):
    """Observers see what was published, with ids and payloads, raw notifies included."""
    Ping = event_on(channel)
    seen: list[pgbus.Outgoing] = []

    class P:
        @pgbus.hookimpl
        def pgbus_on_published(self, outgoing):
            seen.extend(outgoing)

    bus = make_bus(plugins=[P()])
    ids = await bus.publish_many([Ping(n=1), Ping(n=2)])
    await bus.notify(channel, "raw")
    assert [o.id for o in seen[:2]] == ids
    assert [o.event for o in seen] == [Ping(n=1), Ping(n=2), None]
    assert seen[2].payload == "raw"
    assert all(o.channel == channel for o in seen)


async def test_hook_pgbus_on_received(make_bus, channel):
    """Observers see every notification taken in, before decoding, garbage included."""
    received: list[str] = []
    marker = asyncio.Event()

    class P:
        @pgbus.hookimpl
        def pgbus_on_received(self, messages):
            received.extend(m.payload for m in messages)
            if "last" in received:
                marker.set()

    bus = make_bus(plugins=[P()])
    bus.subscribe(channel)(lambda m: None)
    async with bus:
        for payload in ("a", "{bad", "last"):
            await bus.notify(channel, payload)
        await asyncio.wait_for(marker.wait(), 5)
    assert received == ["a", "{bad", "last"]


async def test_hook_pgbus_on_handled(make_bus, channel):
    """pgbus_on_handled reports the subscription, the delivery and a duration."""
    Ping = event_on(channel)
    seen: asyncio.Queue[tuple[str, int, float]] = asyncio.Queue()

    class P:
        @pgbus.hookimpl
        def pgbus_on_handled(self, subscription, delivery, duration):
            seen.put_nowait((subscription.name, delivery.event.n, duration))

    bus = make_bus(plugins=[P()])
    bus.subscribe(Ping, name="h")(lambda e: None)
    async with bus:
        await bus.publish(Ping(n=3))
        name, n, duration = await asyncio.wait_for(seen.get(), 5)
    assert (name, n) == ("h", 3)
    assert duration >= 0


async def test_hook_pgbus_on_decode_error(make_bus, channel):
    """An async decode-error observer is awaited with the raw message and the error."""
    Ping = event_on(channel)
    seen: asyncio.Queue[tuple[str, BaseException]] = asyncio.Queue()

    class P:
        @pgbus.hookimpl
        async def pgbus_on_decode_error(self, message, error):
            await seen.put((message.payload, error))

    bus = make_bus(plugins=[P()])
    bus.subscribe(Ping)(lambda e: None)
    async with bus:
        await bus.notify(channel, '{"n": []}')
        payload, error = await asyncio.wait_for(seen.get(), 5)
    assert payload == '{"n": []}'
    assert isinstance(error, pgbus.DecodeError)
    assert error.payload == payload


async def test_hook_pgbus_on_handler_error(make_bus, channel):
    """A handler's exception reaches the handler-error observers with its delivery."""
    Ping = event_on(channel)
    seen: asyncio.Queue[tuple[str, int, BaseException]] = asyncio.Queue()

    class P:
        @pgbus.hookimpl
        def pgbus_on_handler_error(self, subscription, delivery, error):
            seen.put_nowait((subscription.name, delivery.event.n, error))

    bus = make_bus(plugins=[P()])

    @bus.subscribe(Ping, name="bad")
    async def bad(event: pgbus.Event) -> None:
        raise KeyError(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.publish(Ping(n=9))
        name, n, error = await asyncio.wait_for(seen.get(), 5)
    assert (name, n) == ("bad", 9)
    assert isinstance(error, KeyError)


async def test_hook_pgbus_on_connect(make_bus, channel):
    """pgbus_on_connect runs once LISTEN is in place, with every channel."""
    seen: list[tuple[str, ...]] = []

    class P:
        @pgbus.hookimpl
        async def pgbus_on_connect(self, bus, channels):
            seen.append(tuple(channels))

    bus = make_bus(plugins=[P()])
    bus.subscribe(channel)(lambda m: None)
    bus.subscribe(channel + "2")(lambda m: None)
    await bus.start()
    assert seen == [(channel, channel + "2")]
    await bus.stop()


async def test_hook_pgbus_on_disconnect(make_bus, channel, pg_conn):
    """pgbus_on_disconnect runs when the LISTEN connection is lost, not on stop()."""
    seen: asyncio.Queue[BaseException | None] = asyncio.Queue()

    class P:
        @pgbus.hookimpl
        def pgbus_on_disconnect(self, bus, error):
            seen.put_nowait(error)

    bus = make_bus(plugins=[P()])
    bus.subscribe(channel)(lambda m: None)
    async with bus:
        await pg_conn.execute("SELECT pg_terminate_backend($1)", bus.listener_pid)
        assert isinstance(await asyncio.wait_for(seen.get(), 5), BaseException)
    assert seen.empty()


async def test_hook_pgbus_on_resync(make_bus, channel, pg_conn):
    """After a reconnect, resync observers get the channels and the gap, LISTEN already on."""
    seen: asyncio.Queue[tuple[tuple[str, ...], float, float, bool]] = asyncio.Queue()

    class P:
        @pgbus.hookimpl
        async def pgbus_on_resync(self, bus, channels, disconnected_at, reconnected_at):
            listening = await pg_conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", bus.listener_pid
            )
            seen.put_nowait((tuple(channels), disconnected_at, reconnected_at, listening == 1))

    bus = make_bus(plugins=[P()])
    bus.subscribe(channel)(lambda m: None)
    async with bus:
        await pg_conn.execute("SELECT pg_terminate_backend($1)", bus.listener_pid)
        channels, lost, back, live = await asyncio.wait_for(seen.get(), 10)
    assert channels == (channel,)
    assert lost <= back
    assert live


async def test_hook_pgbus_reconnect_backoff(make_bus, channel, pg_conn):
    """The backoff hook is asked for the delay with the attempt number and the error."""
    asked: asyncio.Queue[tuple[int, BaseException | None]] = asyncio.Queue()

    class Fixed:
        @pgbus.hookimpl
        def pgbus_reconnect_backoff(self, attempt, error):
            asked.put_nowait((attempt, error))
            return 0.01

    bus = make_bus(plugins=[Fixed()])
    bus.subscribe(channel)(lambda m: None)
    async with bus:
        await pg_conn.execute("SELECT pg_terminate_backend($1)", bus.listener_pid)
        attempt, error = await asyncio.wait_for(asked.get(), 5)
    assert attempt == 1
    assert error is not None


async def test_hook_pgbus_resolve_reference(make_bus, channel):
    """A reference notification is handed to the resolver; the event it returns is delivered."""
    Ping = event_on(channel)
    stored = f'{{"v":1,"id":"{"e" * 32}","type":"Ping","ts":1.0,"data":{{"n":7}}}}'
    asked: list[dict[str, object]] = []

    class Store:
        @pgbus.hookimpl
        def pgbus_resolve_reference(self, bus, message, reference):
            asked.append(dict(reference))

            async def fetch() -> pgbus.Message:
                return pgbus.Message(channel, stored, 0, message.received_at, 1.0, "e" * 32)

            return fetch()

    bus = make_bus(plugins=[Store()])
    got: asyncio.Queue[object] = asyncio.Queue()
    bus.subscribe(Ping)(got.put_nowait)
    async with bus:
        ref = {"v": 1, "id": "e" * 32, "type": "pgbus.ref", "ts": 1.0, "data": {"key": 1}}
        await bus.notify(channel, json.dumps(ref))
        event = await asyncio.wait_for(got.get(), 5)
    assert event == Ping(n=7)
    assert asked == [ref]


class _BrokenStore:
    @pgbus.hookimpl
    def pgbus_resolve_reference(self, bus, message, reference):
        raise RuntimeError("the store is gone")


@pytest.mark.parametrize(
    ("resolvers", "why"),
    [([], "durable plugin"), ([_BrokenStore()], "the store is gone")],
    ids=["no resolver", "a resolver that raises"],
)
async def test_a_reference_nobody_resolves_is_a_dead_letter(make_bus, channel, resolvers, why):
    """Without the durable plugin, or with a resolver that raises, a reference is a dead
    letter saying why, and no handler gets it (not even an untyped subscription)."""
    letters = Letters()
    bus = make_bus(plugins=[letters, *resolvers])
    raw: asyncio.Queue[pgbus.Message] = asyncio.Queue()
    bus.subscribe(channel)(raw.put_nowait)
    async with bus:
        ref = {"v": 1, "id": "e" * 32, "type": "pgbus.ref", "ts": 1.0, "data": {"journal_id": 1}}
        await bus.notify(channel, json.dumps(ref))
        dead = await letters.next()
        await bus.notify(channel, "after")
        first = await asyncio.wait_for(raw.get(), 5)
    assert why in str(dead.error)
    if not resolvers:
        assert isinstance(dead.error, pgbus.DecodeError)
    assert first.payload == "after"  # the untyped subscription never saw the reference


async def test_a_bad_payload_amid_good_ones_is_reported_and_the_rest_handled_in_order(
    make_bus, pg_conn, channel
):
    """A round decodes its notifications first, then routes them: order and errors hold."""
    Ping = event_on(channel)
    letters = Letters()
    bus = make_bus(plugins=[letters])
    got: asyncio.Queue[int] = asyncio.Queue()
    bus.subscribe(Ping)(lambda e: got.put_nowait(e.n))
    payloads = [json.dumps({"n": n}) for n in range(10)]
    payloads[4] = '{"n": "four"}'
    async with bus:
        # one statement: the notifications arrive together, in one dispatcher round
        await pg_conn.execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i",
            channel,
            payloads,
        )
        handled = [await asyncio.wait_for(got.get(), 5) for _ in range(9)]
        dead = await letters.next()
    assert handled == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert dead.payload == '{"n": "four"}'
    assert isinstance(dead.error, pgbus.DecodeError)


async def test_hook_pgbus_schedule(pg_dsn, channel):
    """A plugin's pgbus_schedule gets the encoded events of publish(delay=) and their due time."""
    Ping = event_on(channel)
    seen: list[tuple[list[str], float]] = []

    class Later:
        @pgbus.hookimpl
        def pgbus_schedule(self, bus, outgoing, due, connection):
            async def keep() -> None:
                seen.append(([o.id for o in outgoing], due))

            return keep()

    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[Later()])
    before = time.time()
    event_id = await bus.publish(Ping(n=1), delay=30)
    [(ids, due)] = seen
    assert ids == [event_id]
    assert before + 30 <= due <= time.time() + 30
    await bus.stop()


async def test_hook_pgbus_cancel(pg_dsn):
    """bus.cancel() returns what a plugin's pgbus_cancel answers."""

    class Canceller:
        @pgbus.hookimpl
        def pgbus_cancel(self, bus, event_id):
            async def answer() -> bool:
                return event_id == "mine"

            return answer()

    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[Canceller()])
    assert await bus.cancel("mine") is True
    assert await bus.cancel("other") is False
    await bus.stop()
