"""The core bus against a real PostgreSQL: typed and raw delivery, publishing, lifecycle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import re
import time
from decimal import Decimal
from typing import TYPE_CHECKING

import asyncpg
import pytest
from _helpers import event_on

import pgbus
import pgbus._dispatch
from pgbus._util import new_event_id
from pgbus.testing import RecordingPlugin

if TYPE_CHECKING:
    from collections.abc import Callable


def order_on(channel: str) -> type[pgbus.Event]:
    """A fresh OrderPlaced-like event type bound to ``channel``."""
    return type(
        "Order",
        (pgbus.Event,),
        {"__annotations__": {"order_id": int, "total": Decimal}},
        channel=channel,
    )


async def test_typed_event_round_trip(make_bus, recorder, channel):
    """A published typed event reaches the typed handler validated and equal."""
    Order = order_on(channel)
    bus = make_bus()
    bus.subscribe(Order)(recorder)
    async with bus:
        await bus.publish(Order(order_id=1, total=Decimal("9.90")))
        got = await recorder.next()
    assert got == Order(order_id=1, total=Decimal("9.90"))
    assert isinstance(got, Order)


async def test_untyped_channel_gets_messages(make_bus, recorder, channel, pg_conn):
    """An untyped subscription receives the raw payload with channel, pid and time."""
    bus = make_bus()
    bus.subscribe(channel)(recorder)
    async with bus:
        before = time.time()
        await pg_conn.execute("SELECT pg_notify($1, 'raw text')", channel)
        msg = await recorder.next()
    assert isinstance(msg, pgbus.Message)
    assert (msg.channel, msg.payload) == (channel, "raw text")
    assert msg.pid == pg_conn.get_server_pid()
    assert before <= msg.received_at <= time.time()


async def test_subscribe_by_annotation(make_bus, channel):
    """Bare @bus.subscribe takes the event type from the handler's annotation."""
    Ping = event_on(channel)
    got: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    bus = make_bus()

    async def on_ping(event: Ping) -> None:  # type: ignore[valid-type]
        await got.put(event)

    on_ping.__annotations__["event"] = Ping
    assert bus.subscribe(on_ping) is on_ping
    async with bus:
        await bus.publish(Ping(n=7))
        assert await asyncio.wait_for(got.get(), 5) == Ping(n=7)


async def test_publish_many_keeps_order_and_duplicates(make_bus, recorder, channel):
    """publish_many delivers every event in order, equal events included (ids differ)."""
    Ping = event_on(channel)
    bus = make_bus()
    bus.subscribe(Ping)(recorder)
    async with bus:
        ids = await bus.publish_many([Ping(n=i % 3) for i in range(30)])
        got = await recorder.take(30)
    assert [e.n for e in got] == [i % 3 for i in range(30)]
    assert len(set(ids)) == 30


async def test_publish_many_across_channels_keeps_each_channels_order(make_bus, recorder, channel):
    """One publish_many may mix channels (another statement than a one-channel batch)."""
    Ping, Pong = event_on(channel), event_on(f"{channel}_b", "Pong")
    bus = make_bus()
    bus.subscribe(Ping)(recorder)
    bus.subscribe(Pong)(recorder)
    async with bus:
        await bus.publish_many([Ping(n=i) if i % 2 else Pong(n=i) for i in range(40)])
        got = await recorder.take(40)
    assert [e.n for e in got if isinstance(e, Ping)] == list(range(1, 40, 2))
    assert [e.n for e in got if isinstance(e, Pong)] == list(range(0, 40, 2))


def test_event_ids_are_32_hex_digits_unique_and_new_after_fork() -> None:
    """Ids are 32 lowercase hex digits, unique, and a forked child never repeats the parent's."""
    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids, and leave without running pytest's exit code
        os.write(write, "".join(new_event_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 32 * 300)
    while len(child) < 32 * 300:
        child += os.read(read, 32 * 300 - len(child))
    os.close(read)
    os.waitpid(pid, 0)
    parent = {new_event_id() for _ in range(300)}
    text = child.decode()
    assert not parent & {text[i : i + 32] for i in range(0, len(text), 32)}


def test_event_ids_cannot_be_predicted_from_earlier_ones() -> None:
    """Consecutive ids share no structure: no common prefix, no counter to continue."""
    ids = [new_event_id() for _ in range(600)]  # more than one block of random bytes
    prefixes = {i[:8] for i in ids}
    suffixes = {i[-8:] for i in ids}
    assert len(prefixes) > 590  # a per-process prefix would make this 1
    assert len(suffixes) > 590
    steps = {int(b, 16) - int(a, 16) for a, b in itertools.pairwise(ids)}
    assert len(steps) > 590  # a counter would make this 1


def test_event_ids_are_unique_across_threads() -> None:
    """Threads drawing ids at once never get the same one."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: [new_event_id() for _ in range(5000)], range(8)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 40_000


async def test_events_on_one_subscription_are_handled_in_publish_order(make_bus, channel):
    """With the default concurrency, a subscription handles events in publish order."""
    Ping = event_on(channel)
    seen: list[int] = []
    done = asyncio.Event()
    bus = make_bus()

    @bus.subscribe(Ping)
    async def slowish(event: pgbus.Event) -> None:
        await asyncio.sleep(0)  # yield, so a reordering bug would show
        seen.append(event.n)  # type: ignore[attr-defined]
        if len(seen) == 200:
            done.set()

    async with bus:
        for i in range(100):
            await bus.publish(Ping(n=i))
        await bus.publish_many([Ping(n=i) for i in range(100, 200)])
        await asyncio.wait_for(done.wait(), 10)
    assert seen == list(range(200))


async def test_slow_handler_does_not_delay_other_subscriptions(make_bus, channel):
    """A handler stuck on one subscription never holds up another subscription."""
    Ping = event_on(channel)
    release = asyncio.Event()
    fast: asyncio.Queue[int] = asyncio.Queue()
    bus = make_bus(stop_timeout=5)

    @bus.subscribe(Ping, name="slow")
    async def slow(event: pgbus.Event) -> None:
        await release.wait()

    @bus.subscribe(Ping, name="fast")
    async def quick(event: pgbus.Event) -> None:
        await fast.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        for i in range(5):
            await bus.publish(Ping(n=i))
        got = [await asyncio.wait_for(fast.get(), 5) for _ in range(5)]
        assert not release.is_set()  # the slow handler is still blocked on event 0
        release.set()
    assert got == list(range(5))


async def test_transactional_publish_follows_commit(make_bus, recorder, channel, pg_dsn):
    """publish(connection=conn) is delivered on COMMIT and never after ROLLBACK."""
    Ping = event_on(channel)
    bus = make_bus()
    bus.subscribe(Ping)(recorder)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        async with bus:
            async with pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                await bus.publish(Ping(n=1), connection=conn)
                await tx.rollback()
                async with conn.transaction():
                    await bus.publish(Ping(n=2), connection=conn)
                    assert await recorder.nothing_more(0.2)  # not before COMMIT
            assert await recorder.next() == Ping(n=2)
            await bus.publish(Ping(n=3))
            assert await recorder.next() == Ping(n=3)  # n=1 never came before it
    finally:
        await pool.close()


async def test_plain_notify_for_any_listen_client(make_bus, channel, pg_conn):
    """bus.notify sends the payload unchanged, as a NOTIFY any client can LISTEN to."""
    got: asyncio.Queue[str] = asyncio.Queue()
    await pg_conn.add_listener(channel, lambda *args: got.put_nowait(args[3]))
    bus = make_bus()
    await bus.notify(channel, "plain 'text' é")
    assert await asyncio.wait_for(got.get(), 5) == "plain 'text' é"
    await bus.stop()


async def test_listen_and_unlisten_while_running(make_bus, recorder, channel):
    """listen() LISTENs before returning; unlisten() stops delivery on that channel."""
    Ping = event_on(channel)
    marker_channel = channel + "_m"
    markers: asyncio.Queue[pgbus.Message] = asyncio.Queue()
    bus = make_bus()
    bus.subscribe(marker_channel)(markers.put)
    async with bus:
        sub = await bus.listen(Ping, recorder)
        assert channel in bus.channels
        assert sub in bus.subscriptions
        await bus.publish(Ping(n=1))
        assert await recorder.next() == Ping(n=1)
        await bus.unlisten(channel)
        assert channel not in bus.channels
        await bus.publish(Ping(n=2))
        await bus.notify(marker_channel, "after")
        await asyncio.wait_for(markers.get(), 5)
        assert await recorder.nothing_more()


async def test_several_event_types_share_a_channel(make_bus, channel):
    """The envelope's type picks the model when several event types share a channel."""
    A = type("A", (pgbus.Event,), {"__annotations__": {"x": int}}, channel=channel)
    B = type("B", (pgbus.Event,), {"__annotations__": {"x": str}}, channel=channel)
    got_a: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    got_b: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    bus = make_bus()
    bus.subscribe(A)(got_a.put)
    bus.subscribe(B)(got_b.put)
    async with bus:
        await bus.publish_many([A(x=1), B(x="1"), A(x=2)])
        assert [await asyncio.wait_for(got_a.get(), 5) for _ in range(2)] == [A(x=1), A(x=2)]
        assert await asyncio.wait_for(got_b.get(), 5) == B(x="1")


async def test_bare_json_decodes_against_the_channels_model(make_bus, recorder, channel, pg_conn):
    """A bare JSON object (psql NOTIFY, row_to_json) decodes against the only model."""
    Order = order_on(channel)
    bus = make_bus()
    bus.subscribe(Order)(recorder)
    async with bus:
        quoted = '"' + channel.replace('"', '""') + '"'
        await pg_conn.execute(f"""NOTIFY {quoted}, '{{"order_id": 3, "total": "2.5"}}'""")
        assert await recorder.next() == Order(order_id=3, total=Decimal("2.5"))


async def test_garbage_is_reported_and_the_listener_carries_on(make_bus, recorder, channel):
    """A malformed and a schema-violating notification are reported; later ones arrive."""
    Ping = event_on(channel)
    errors: list[tuple[str, BaseException]] = []

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_decode_error(self, message: pgbus.Message, error: BaseException) -> None:
            errors.append((message.payload, error))

    bus = make_bus(plugins=[Watch()])
    bus.subscribe(Ping)(recorder)
    async with bus:
        await bus.notify(channel, "not json {")
        await bus.notify(channel, '{"n": "not a number"}')
        await bus.publish(Ping(n=5))
        assert await recorder.next() == Ping(n=5)
        snap = bus.metrics.snapshot()
    assert [p for p, _ in errors] == ["not json {", '{"n": "not a number"}']
    assert all(isinstance(e, pgbus.DecodeError) for _, e in errors)
    assert snap.channels[channel].decode_failures == 2
    assert snap.channels[channel].received == 3


async def test_unknown_event_type_on_a_shared_channel_is_not_an_error(make_bus, recorder, channel):
    """An envelope of a type this process does not subscribe to is skipped, not a failure."""
    Ping = event_on(channel)
    Other = event_on(channel, "Other")
    publisher = make_bus()
    bus = make_bus()
    bus.subscribe(Ping)(recorder)
    async with bus:
        await publisher.publish(Other(n=1))
        await publisher.publish(Ping(n=2))
        assert await recorder.next() == Ping(n=2)
        assert bus.metrics.snapshot().decode_failures == 0


@pytest.mark.parametrize(
    "name",
    ['12+"34', "with space", "MixedCase", "ünïcödé-канал", "semi;colon--", "x" * 63],
)
async def test_odd_channel_names_work_exactly(make_bus, recorder, name):
    """Quotes, spaces, unicode, case and 63-byte names are LISTENed and NOTIFYed exactly."""
    bus = make_bus()
    bus.subscribe(name)(recorder)
    async with bus:
        await bus.notify(name, "hello")
        msg = await recorder.next()
    assert (msg.channel, msg.payload) == (name, "hello")


UNREACHABLE = "postgresql://postgres@127.0.0.1:1/postgres"


@pytest.mark.parametrize("bad", ["", "x" * 64, "é" * 32, "nul\x00byte", 42, None, "\udcff"])
async def test_invalid_channels_are_rejected_before_sql(bad):
    """Bad channel names raise InvalidChannel without touching the (unreachable) server."""
    bus = pgbus.Bus(UNREACHABLE, load_entrypoints=False)
    with pytest.raises(pgbus.InvalidChannel):
        await bus.notify(bad, "x")
    with pytest.raises(pgbus.InvalidChannel):
        bus.subscribe(bad)(lambda m: None)
    with pytest.raises(pgbus.InvalidChannel):
        await bus.unlisten(bad)
    if bad is not None:  # channel=None means "not bound", which is allowed
        with pytest.raises(pgbus.InvalidChannel):
            type("Bad", (pgbus.Event,), {}, channel=bad)
    assert issubclass(pgbus.InvalidChannel, pgbus.PgbusError)
    await bus.stop()


async def test_payload_too_large_is_rejected_before_sql(make_bus, recorder, channel):
    """Payloads of 8000 bytes or more raise PayloadTooLarge with the size; 7999 bytes work."""
    bus = pgbus.Bus(UNREACHABLE, load_entrypoints=False)
    with pytest.raises(pgbus.PayloadTooLarge) as info:
        await bus.notify(channel, "é" * 4000)
    assert (info.value.size, info.value.limit) == (8000, 7999)
    Blob = type("Blob", (pgbus.Event,), {"__annotations__": {"s": str}}, channel=channel)
    with pytest.raises(pgbus.PayloadTooLarge):
        await bus.publish(Blob(s="x" * 8000))
    with pytest.raises(pgbus.PayloadTooLarge):
        await bus.publish_many([Blob(s="ok"), Blob(s="x" * 8000)])
    await bus.stop()
    live = make_bus()
    live.subscribe(channel)(recorder)
    async with live:
        await live.notify(channel, "y" * 7999)
        assert len((await recorder.next()).payload) == 7999


async def test_publish_errors_are_publish_errors():
    """Publishing to an unreachable server raises PublishError, chained to the cause."""
    bus = pgbus.Bus(UNREACHABLE, load_entrypoints=False, connect_timeout=2)
    with pytest.raises(pgbus.PublishError) as info:
        await bus.notify("anything", "x")
    assert info.value.__cause__ is not None
    await bus.stop()


async def test_lifecycle_errors_are_clear(make_bus, channel):
    """Starting twice, subscribing while running and using a stopped bus raise BusClosed."""
    bus = make_bus()
    bus.subscribe(channel)(lambda m: None)
    await bus.start()
    assert bus.state is pgbus.BusState.RUNNING
    with pytest.raises(pgbus.BusClosed):
        await bus.start()
    with pytest.raises(pgbus.BusClosed, match="listen"):
        bus.subscribe(channel + "2")(lambda m: None)
    await bus.stop()
    await bus.stop()  # harmless
    assert bus.state is pgbus.BusState.STOPPED
    with pytest.raises(pgbus.BusClosed):
        await bus.notify(channel, "x")
    with pytest.raises(pgbus.BusClosed):
        await bus.listen(channel, lambda m: None)
    with pytest.raises(pgbus.BusClosed):
        await bus.start()


async def test_stop_waits_for_in_flight_handlers(make_bus, channel):
    """stop() lets a running handler finish, within the timeout."""
    Ping = event_on(channel)
    started = asyncio.Event()
    finished: list[int] = []
    bus = make_bus()

    @bus.subscribe(Ping)
    async def handler(event: pgbus.Event) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(event.n)  # type: ignore[attr-defined]

    await bus.start()
    await bus.publish_many([Ping(n=1), Ping(n=2)])
    await asyncio.wait_for(started.wait(), 5)
    await bus.stop(timeout=5)
    assert finished == [1, 2]


async def test_sync_handlers_run_in_a_thread(make_bus, channel):
    """A plain def handler runs in a worker thread and does not block the loop."""
    import threading

    Ping = event_on(channel)
    threads: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    bus = make_bus()

    @bus.subscribe(Ping)
    def handler(event: pgbus.Event) -> None:
        loop.call_soon_threadsafe(threads.put_nowait, threading.get_ident())

    async with bus:
        await bus.publish(Ping(n=1))
        assert await asyncio.wait_for(threads.get(), 5) != threading.get_ident()


async def test_handler_errors_are_reported_and_later_events_flow(make_bus, channel):
    """A raising handler goes to the handler-error hook; the next event is handled."""
    Ping = event_on(channel)
    errors: list[BaseException] = []
    handled: asyncio.Queue[int] = asyncio.Queue()

    class Watch:
        @pgbus.hookimpl
        async def pgbus_on_handler_error(self, subscription, delivery, error) -> None:
            errors.append(error)

    bus = make_bus(plugins=[Watch()])

    @bus.subscribe(Ping)
    async def handler(event: pgbus.Event) -> None:
        if event.n == 1:  # type: ignore[attr-defined]
            raise ValueError("boom")
        await handled.put(event.n)  # type: ignore[attr-defined]

    async with bus:
        await bus.publish_many([Ping(n=1), Ping(n=2)])
        assert await asyncio.wait_for(handled.get(), 5) == 2
    assert [str(e) for e in errors] == ["boom"]


async def test_reconnect_after_backend_is_terminated(make_bus, recorder, channel, pg_conn):
    """After pg_terminate_backend the bus reconnects, re-LISTENs and resyncs; events flow."""
    Ping = event_on(channel)
    resyncs: asyncio.Queue[tuple[tuple[str, ...], float, float]] = asyncio.Queue()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_resync(self, bus, channels, disconnected_at, reconnected_at) -> None:
            resyncs.put_nowait((tuple(channels), disconnected_at, reconnected_at))

    bus = make_bus(plugins=[Watch()])
    bus.subscribe(Ping)(recorder)
    async with bus:
        old_pid = bus.listener_pid
        assert await pg_conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)
        channels, lost_at, back_at = await asyncio.wait_for(resyncs.get(), 10)
        assert channels == (channel,)
        assert lost_at <= back_at
        assert bus.listener_pid not in (None, old_pid)
        assert bus.reconnects == 1
        await bus.publish(Ping(n=1))
        assert await recorder.next() == Ping(n=1)
        snap = bus.metrics.snapshot()
    assert (snap.connects, snap.disconnects) == (2, 1)


async def test_start_fails_clearly_on_a_wrong_database(pg_dsn):
    """A DSN naming a database that does not exist fails start() at once, password hidden."""
    base, _, _ = pg_dsn.rpartition("/")
    dsn = base.replace("postgres@", "postgres:secret@") + "/no_such_db_pgbus"
    bus = pgbus.Bus(dsn, load_entrypoints=False, start_timeout=10)
    with pytest.raises(pgbus.ListenerError) as info:
        await bus.start()
    assert "no_such_db_pgbus" in str(info.value)
    assert "secret" not in str(info.value)
    assert bus.state is pgbus.BusState.STOPPED


async def test_start_times_out_when_nothing_listens():
    """start() retries an unreachable server with backoff, then fails after start_timeout."""
    bus = pgbus.Bus(UNREACHABLE, load_entrypoints=False, start_timeout=0.5, connect_timeout=0.2)
    with pytest.raises(pgbus.ListenerError, match="within"):
        await bus.start()


async def test_module_level_helpers_use_the_default_bus(pg_dsn, recorder, channel, monkeypatch):
    """pgbus.configure()/PGBUS_DSN give a default bus for pgbus.publish() and friends."""
    Ping = event_on(channel)
    listener = pgbus.Bus(pg_dsn, load_entrypoints=False)
    listener.subscribe(Ping)(recorder)
    async with listener:
        monkeypatch.setenv("PGBUS_DSN", pg_dsn)
        monkeypatch.setattr(pgbus._api, "_default", None)
        await pgbus.publish(Ping(n=1))
        assert pgbus.get_bus().dsn == pg_dsn
        await pgbus.close()
        pgbus.configure(pg_dsn, load_entrypoints=False)
        await pgbus.publish_many([Ping(n=2)])
        await pgbus.notify(channel, '{"n": 3}')
        await pgbus.close()
        assert [e.n for e in await recorder.take(3)] == [1, 2, 3]
    monkeypatch.delenv("PGBUS_DSN")
    with pytest.raises(pgbus.ConfigError, match="PGBUS_DSN"):
        pgbus.get_bus()


def test_bad_configuration_is_a_config_error():
    """Missing DSNs, odd targets and bad options raise ConfigError (a ValueError)."""
    with pytest.raises(pgbus.ConfigError):
        pgbus.Bus("", load_entrypoints=False)
    bus = pgbus.Bus(UNREACHABLE, load_entrypoints=False)
    with pytest.raises(pgbus.ConfigError):
        bus.subscribe(int)(lambda e: None)  # type: ignore[arg-type]
    Unbound = type("Unbound", (pgbus.Event,), {})
    with pytest.raises(pgbus.ConfigError, match="no channel"):
        bus.subscribe(Unbound)(lambda e: None)
    with pytest.raises(pgbus.ConfigError):
        bus.subscribe(lambda e: None)  # no annotation to go by
    with pytest.raises(ValueError, match="concurrency"):
        bus.subscribe("c", concurrency=0)(lambda e: None)
    with pytest.raises(pgbus.ConfigError, match="positive"):
        pgbus.Bus(UNREACHABLE, connect_timeout=0)


async def test_an_unparsable_dsn_is_a_clear_pgbus_error():
    """A DSN asyncpg cannot parse fails publish and start with pgbus errors, not ValueError."""
    dsn = "postgresql://postgres@127.0.0.1:notaport/postgres"
    bus = pgbus.Bus(dsn, load_entrypoints=False)
    with pytest.raises(pgbus.PublishError, match="notaport"):
        await bus.notify("c", "x")
    await bus.stop()
    bus = pgbus.Bus(dsn, load_entrypoints=False, start_timeout=10)
    bus.subscribe("c")(lambda m: None)
    with pytest.raises(pgbus.ListenerError, match="notaport"):
        await bus.start()


async def test_an_event_sent_twice_is_handled_once(make_bus, recorder, channel, pg_conn):
    """An envelope arriving again with the same id (a retried publish) is dropped."""
    Ping = event_on(channel)
    sent = RecordingPlugin()  # .published: what went out, payloads included
    bus = make_bus(plugins=[sent])
    bus.subscribe(Ping)(recorder)
    async with bus:
        await bus.publish(Ping(n=1))
        await pg_conn.execute(  # the same again
            "SELECT pg_notify($1, $2)", channel, sent.published[0].payload
        )
        await bus.publish(Ping(n=2))
        assert [await recorder.next(), await recorder.next()] == [Ping(n=1), Ping(n=2)]
        assert bus.duplicates == 1


async def test_the_last_recent_ids_are_remembered(
    make_bus, recorder, channel, pg_conn, monkeypatch
):
    """At least the last RECENT_IDS ids are remembered; older ones are forgotten."""
    monkeypatch.setattr(pgbus._dispatch, "RECENT_IDS", 4)
    Ping = event_on(channel)
    sent = RecordingPlugin()  # .published: what went out, payloads included
    bus = make_bus(plugins=[sent])
    bus.subscribe(Ping)(recorder)

    async def again(n: int) -> None:
        await pg_conn.execute("SELECT pg_notify($1, $2)", channel, sent.published[n - 1].payload)

    async with bus:
        await bus.publish_many([Ping(n=n) for n in range(1, 7)])
        await again(3)  # 4 ids later: remembered
        await bus.publish_many([Ping(n=7), Ping(n=8)])
        await again(1)  # 7 ids later: forgotten, handled again
        await bus.publish(Ping(n=9))
        got = [e.n for e in await recorder.take(10)]
        assert got == [1, 2, 3, 4, 5, 6, 7, 8, 1, 9]
        assert bus.duplicates == 1


async def test_a_round_with_a_repeated_id_drops_only_that_one(make_bus, recorder, channel, pg_conn):
    """One statement of notifications, one of them seen before: the others are handled."""
    Ping = event_on(channel)
    sent = RecordingPlugin()
    bus = make_bus(plugins=[sent])
    bus.subscribe(Ping)(recorder)

    def envelope(n: int) -> str:
        env = json.loads(sent.published[0].payload)
        return json.dumps({**env, "id": new_event_id(), "data": {"n": n}})

    async with bus:
        await bus.publish(Ping(n=1))
        assert [e.n for e in await recorder.take(1)] == [1]
        payloads = [envelope(2), sent.published[0].payload, envelope(3)]
        await pg_conn.execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i",
            channel,
            payloads,
        )
        assert [e.n for e in await recorder.take(2)] == [2, 3]
    assert bus.duplicates == 1


async def test_a_round_reaches_each_subscription_by_its_filter(make_bus, channel):
    """publish_many is one round: a filtered and an unfiltered subscription, each its share."""
    Ping = event_on(channel)
    bus = make_bus()
    even: list[int] = []
    every: list[int] = []
    all_in = asyncio.Event()

    def keep(into: list[int]) -> Callable[[pgbus.Event], None]:
        def handle(event: pgbus.Event) -> None:
            into.append(event.n)  # type: ignore[attr-defined]
            if len(even) == 4 and len(every) == 8:
                all_in.set()

        return handle

    bus.subscribe(Ping, name="even", where=lambda e: e.n % 2 == 0)(keep(even))
    bus.subscribe(Ping, name="every")(keep(every))
    async with bus:
        await bus.publish_many([Ping(n=n) for n in range(1, 9)])
        await asyncio.wait_for(all_in.wait(), 5)
    assert even == [2, 4, 6, 8]
    assert every == list(range(1, 9))


async def test_a_round_wakes_every_idle_worker(make_bus, channel):
    """The events of one round are handed to as many workers as are idle, not to one."""
    Ping = event_on(channel)
    bus = make_bus()
    running, most, all_in = 0, 0, asyncio.Event()
    seen: list[int] = []

    @bus.subscribe(Ping, concurrency=4)
    async def handle(event: pgbus.Event) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        seen.append(event.n)  # type: ignore[attr-defined]
        if len(seen) == 8:
            all_in.set()
        await asyncio.sleep(0.05)  # long enough for the round's others to start
        running -= 1

    async with bus:
        await bus.publish_many([Ping(n=n) for n in range(1, 9)])
        await asyncio.wait_for(all_in.wait(), 5)
    assert sorted(seen) == list(range(1, 9))
    assert most == 4


async def test_a_publish_is_one_round_trip(make_bus, channel):
    """The publish pool skips asyncpg's reset query on release: no second round trip."""
    Ping = event_on(channel)
    bus = make_bus(pool_max_size=1)
    queries: list[str] = []
    pool = await bus.pool()
    async with pool.acquire() as conn:  # the pool's one connection
        conn.add_query_logger(lambda record: queries.append(record.query))
    await bus.publish(Ping(n=1))
    await bus.publish_many([Ping(n=2), Ping(n=3)])
    assert [q.split("(")[0] for q in queries] == ["SELECT pg_notify", "SELECT pg_notify"]
