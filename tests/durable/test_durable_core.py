"""Durable mode against a real PostgreSQL: schema, journal publish, replay, ordering."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from _helpers import Collector, Letters, Watch, ticket_type

import pgbus
import pgbus._publish
from pgbus.durable import SCHEMA_VERSION, DurablePlugin, SchemaError, migrate, schema_version

# -- schema ---------------------------------------------------------------------------


async def test_migrate_creates_then_does_nothing(sql: asyncpg.Connection, schema_name: str):
    """migrate creates the schema at the current version once; running it again is a no-op."""
    try:
        assert await schema_version(sql, schema_name) is None
        assert await migrate(sql, schema_name) == (0, SCHEMA_VERSION)
        assert await migrate(sql, schema_name) == (SCHEMA_VERSION, SCHEMA_VERSION)
        assert await schema_version(sql, schema_name) == SCHEMA_VERSION
        rows = await sql.fetchval(f'SELECT count(*) FROM "{schema_name}".schema_version')
        assert rows == SCHEMA_VERSION
    finally:
        await sql.execute(f'DROP SCHEMA IF EXISTS "{schema_name}" CASCADE')


async def test_concurrent_migrations_apply_once(pg_dsn: str, schema_name: str):
    """Several processes migrating at once all succeed, and each migration is applied once."""
    conns = [await asyncpg.connect(pg_dsn) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate(c, schema_name) for c in conns))
        assert min(results) == (0, SCHEMA_VERSION)
        assert results.count((SCHEMA_VERSION, SCHEMA_VERSION)) == 4
    finally:
        await conns[0].execute(f'DROP SCHEMA IF EXISTS "{schema_name}" CASCADE')
        for c in conns:
            await c.close()


async def test_bus_migrate_then_start(pg_dsn: str, schema_name: str, sql: asyncpg.Connection):
    """bus.migrate() creates the schema the durable bus then starts on."""
    bus = pgbus.Bus(
        pg_dsn, load_entrypoints=False, plugins=[DurablePlugin(schema_name, prune_interval=None)]
    )
    try:
        await bus.migrate()
        async with bus:
            assert bus.state is pgbus.BusState.RUNNING
    finally:
        await sql.execute(f'DROP SCHEMA IF EXISTS "{schema_name}" CASCADE')


async def test_missing_schema_fails_start_naming_the_command(pg_dsn: str, schema_name: str):
    """Starting without the schema fails naming `pgbus migrate`, and creates nothing."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[DurablePlugin(schema_name)])
    with pytest.raises(SchemaError, match="pgbus migrate"):
        await bus.start()
    assert bus.state is pgbus.BusState.STOPPED
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await schema_version(conn, schema_name) is None
    finally:
        await conn.close()


async def test_publish_without_schema_names_the_command(pg_dsn: str, schema_name: str, channel):
    """A durable publish into a database without the schema fails with a clear error."""
    ticket = ticket_type(channel)
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[DurablePlugin(schema_name)])
    try:
        with pytest.raises(SchemaError, match="pgbus migrate"):
            await bus.publish(ticket(n=1))
    finally:
        await bus.stop()


def test_durable_subscription_needs_the_plugin(pg_dsn: str, channel: str):
    """subscribe(durable=...) on a bus without the durable plugin is a ConfigError."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)
    with pytest.raises(pgbus.ConfigError, match="durable=True"):
        bus.subscribe(ticket_type(channel), durable="x")(Collector())


def test_bus_durable_true_registers_the_plugin(pg_dsn: str):
    """Bus(durable=True) registers the plugin under the name "durable"."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, durable=True)
    assert isinstance(bus.plugins.get("durable"), DurablePlugin)


# -- publishing -----------------------------------------------------------------------


async def test_publish_journals_and_notifies(durable_bus, sql, schema: str, channel: str):
    """publish, publish_many, publish(connection=) journal and NOTIFY; a rollback does neither."""
    ticket = ticket_type(channel)
    seen = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket)(seen)
    async with bus:
        await bus.publish(ticket(n=1))
        await bus.publish_many([ticket(n=2), ticket(n=3)])
        async with sql.transaction():
            await bus.publish(ticket(n=4), connection=sql)
        tx = sql.transaction()
        await tx.start()
        await bus.publish(ticket(n=99), connection=sql)
        await tx.rollback()
        await bus.publish(ticket(n=5))
        await seen.wait_for(5)
    assert [e.n for e in seen.items] == [1, 2, 3, 4, 5]
    rows = await sql.fetch(f'SELECT payload FROM "{schema}".journal ORDER BY id')
    assert [json.loads(r["payload"])["data"]["n"] for r in rows] == [1, 2, 3, 4, 5]


async def test_one_megabyte_round_trip(durable_bus, sql, schema: str, channel: str):
    """A 1 MB event reaches a durable subscription whole; NOTIFY carries only a reference."""
    ticket = ticket_type(channel)
    got = Collector()
    raw: list[pgbus.Message] = []
    raw_seen = asyncio.Event()
    big = "x" * 1_000_000
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="big")(got)

    async def on_raw(message: pgbus.Message) -> None:
        raw.append(message)
        raw_seen.set()

    bus.subscribe(channel)(on_raw)
    async with bus:
        event_id = await bus.publish(ticket(n=1, blob=big))
        [event] = await got.wait_for(1)
        assert event.blob == big
        await asyncio.wait_for(raw_seen.wait(), 10)
    # the untyped plain subscription gets the event itself, read from the journal
    [message] = raw
    assert json.loads(message.payload)["data"]["blob"] == big
    assert message.stored_id == event_id
    assert message.stored_at is not None
    assert message.stored_at <= message.received_at
    assert await sql.fetchval(f'SELECT octet_length(payload) FROM "{schema}".journal') > 1_000_000
    assert bus.dead_letters == []


async def test_a_large_event_notifies_a_reference(durable_bus, channel: str):
    """NOTIFY carries a small reference to a large event's journal row, never the event."""
    ticket = ticket_type(channel)
    conn = await asyncpg.connect(durable_bus().dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(channel, lambda *args: got.put_nowait(args[3]))
    bus: pgbus.Bus = durable_bus()
    try:
        event_id = await bus.publish(ticket(n=1, blob="x" * 9000))
        ref = json.loads(await asyncio.wait_for(got.get(), 10))
    finally:
        await conn.close()
    assert ref["type"] == "pgbus.ref"
    assert ref["id"] == event_id
    assert set(ref["data"]) == {"journal_id", "type", "bytes"}


@pytest.mark.both_buses
async def test_a_plain_typed_subscription_gets_a_large_event_from_the_journal(
    durable_bus, channel: str
):
    """On a durable bus a plain typed subscription is handed the event a reference points to."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket)(got)
    async with bus:
        await bus.publish_many([ticket(n=1, blob="x" * 9000), ticket(n=2)])
        events = await got.wait_for(2)
    assert sorted(e.n for e in events) == [1, 2]
    assert bus.dead_letters == []


async def test_a_reference_to_another_event_is_a_decode_error(
    durable_bus, sql, schema: str, channel: str
):
    """A forged reference to a journal row of another event is rejected, not delivered."""
    ticket = ticket_type(channel)
    got = Collector()
    dead_letters = Letters()
    bus: pgbus.Bus = durable_bus()
    bus.plugins.register(dead_letters)
    bus.subscribe(ticket)(got)
    async with bus:
        await bus.publish(ticket(n=1))
        await got.wait_for(1)
        journal_id = await sql.fetchval(f'SELECT id FROM "{schema}".journal')
        forged = json.dumps(
            {
                "v": 1,
                "id": "f" * 32,
                "type": "pgbus.ref",
                "ts": 0,
                "data": {"journal_id": journal_id},
            }
        )
        await bus.notify(channel, forged)
        await bus.publish(ticket(n=2))
        assert [e.n for e in await got.wait_for(2)] == [1, 2]
        dead = await dead_letters.next()
    assert isinstance(dead.error, pgbus.DecodeError)
    assert "holds another event" in str(dead.error)


async def test_same_event_id_is_journaled_once(durable_bus, sql, schema: str, channel: str):
    """Publishing the same event id twice (a publisher retry) journals and delivers it once."""
    ticket = ticket_type(channel)
    bus: pgbus.Bus = durable_bus()
    plugin = bus.plugins.get("durable")
    out = pgbus.Outgoing(channel, ticket(n=1), "fixed-id", 0.0, {})
    out.payload = json.dumps(
        {"v": 1, "id": "fixed-id", "type": "Ticket", "ts": 0.0, "data": {"n": 1}}
    )
    await plugin._publish([out], None)
    await plugin._publish([out], None)
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".journal') == 1
    await bus.stop()


async def test_a_forged_row_with_the_next_id_makes_the_publish_fail(
    durable_bus, sql, schema: str, channel: str, monkeypatch: pytest.MonkeyPatch
):
    """A journal row written first with a publish's id fails that publish, never silently."""
    ticket = ticket_type(channel)
    ids = iter(["a" * 32, "b" * 32, "b" * 32])
    monkeypatch.setattr(pgbus._publish, "new_event_id", lambda: next(ids))  # the "predicted" ids
    await sql.execute(
        f'INSERT INTO "{schema}".journal (channel, event_id, type, payload)'
        " VALUES ($1, $2, 'Ticket', '{\"forged\": true}')",
        channel,
        "b" * 32,
    )
    bus: pgbus.Bus = durable_bus()
    with pytest.raises(pgbus.DuplicateEventId) as info:
        await bus.publish_many([ticket(n=1), ticket(n=2)])
    assert info.value.event_ids == ("b" * 32,)
    assert isinstance(info.value, pgbus.PublishError)
    conn = await asyncpg.connect(bus.dsn)
    try:
        with pytest.raises(pgbus.DuplicateEventId) as in_transaction:  # the caller's too
            async with conn.transaction():
                await bus.publish(ticket(n=3), connection=conn)
        assert in_transaction.value.event_ids == ("b" * 32,)
    finally:
        await conn.close()
    rows = await sql.fetch(f'SELECT event_id, payload FROM "{schema}".journal')
    assert [(r["event_id"], r["payload"]) for r in rows] == [("b" * 32, '{"forged": true}')]
    await bus.stop()


async def test_a_retry_of_a_committed_publish_returns_normally(
    durable_bus, sql, schema: str, channel: str
):
    """The same event under the same id again is an idempotent retry; another event is refused."""
    ticket = ticket_type(channel)
    bus: pgbus.Bus = durable_bus()
    out = pgbus.Outgoing(channel, ticket(n=1), "c" * 32, 0.0, {})
    out.payload = json.dumps(
        {"v": 1, "id": "c" * 32, "type": "Ticket", "ts": 0.0, "data": {"n": 1}}
    )
    conn = await asyncpg.connect(bus.dsn)
    try:  # through the pool, and on a connection outside a transaction
        for connection in (None, None, conn):
            taken = bus.plugins.publish(bus, [out], connection)
            assert taken is not None
            await taken
    finally:
        await conn.close()
    other = pgbus.Outgoing(channel, ticket(n=2), "c" * 32, 0.0, {})
    other.payload = out.payload.replace('"n": 1', '"n": 2')
    taken = bus.plugins.publish(bus, [other], None)
    assert taken is not None
    with pytest.raises(pgbus.DuplicateEventId, match="c" * 32):
        await taken
    assert await sql.fetchval(f'SELECT payload FROM "{schema}".journal') == out.payload
    await bus.stop()


# -- durable subscriptions --------------------------------------------------------------


@pytest.mark.both_buses
async def test_restart_catches_up_in_order(durable_bus, channel: str):
    """A durable subscription restarted in a new process replays what it missed, in order."""
    ticket = ticket_type(channel)
    first = Collector()
    bus1: pgbus.Bus = durable_bus()
    bus1.subscribe(ticket, durable="billing")(first)
    async with bus1:
        await bus1.publish_many([ticket(n=i) for i in range(10)])
        await first.wait_for(10)
    publisher: pgbus.Bus = durable_bus()
    await publisher.publish_many([ticket(n=i) for i in range(10, 20)])
    await publisher.publish(ticket(n=20))
    second = Collector()
    bus2: pgbus.Bus = durable_bus()
    bus2.subscribe(ticket, durable="billing")(second)
    async with bus2:
        await second.wait_for(11)
        await bus2.publish(ticket(n=21))
        await second.wait_for(12)
    assert [e.n for e in first.items] == list(range(10))
    assert [e.n for e in second.items] == list(range(10, 22))


async def test_out_of_order_commit_is_not_skipped(durable_bus, pg_dsn: str, tcp_proxy, channel):
    """A transaction with the lower journal id, committed last while LISTEN is down, arrives."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus(tcp_proxy.dsn_for(pg_dsn))
    bus.subscribe(ticket, durable="ledger")(got)
    early = await asyncpg.connect(pg_dsn)
    late = await asyncpg.connect(pg_dsn)
    try:
        async with bus:
            tx1 = early.transaction()
            await tx1.start()
            await bus.publish(ticket(n=1), connection=early)  # takes the lower journal id
            async with late.transaction():
                await bus.publish(ticket(n=2), connection=late)
            await got.wait_for(1)  # the later id is handled past the open one
            tcp_proxy.refuse = True
            tcp_proxy.cut()
            await tx1.commit()  # its NOTIFY goes to nobody: the listener is down
            tcp_proxy.refuse = False
            await got.wait_for(2)
    finally:
        await early.close()
        await late.close()
    assert [e.n for e in got.items] == [2, 1]


class _Received(Collector):
    """The notifications the listener takes in, for a bounded wait."""

    @pgbus.hookimpl
    def pgbus_on_received(self, messages: list[pgbus.Message]) -> None:
        self.items.extend(messages)
        self._changed.set()


async def test_what_commits_while_a_batch_is_pumped_is_not_left_to_the_poll(
    durable_bus, channel: str
):
    """A pump that finishes a batch begun earlier, and finds nothing more in that batch's
    snapshot, pumps again: events committed after the batch began arrive at once."""
    ticket = ticket_type(channel)
    got = Collector()
    first = asyncio.Event()
    release = asyncio.Event()

    async def handler(event: Any) -> None:
        first.set()
        await release.wait()
        await got(event)

    bus: pgbus.Bus = durable_bus(plugin={"pump_size": 10, "poll_interval": 600.0})
    bus.subscribe(ticket, durable="batches")(handler)
    received = _Received()
    bus.plugins.register(received)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(10)])  # exactly one pump's worth
        await asyncio.wait_for(first.wait(), 10)  # pumped in batch mode, handling begun
        await bus.publish_many([ticket(n=i) for i in range(10, 15)])  # after that snapshot
        await received.wait_for(15, timeout=10)  # every NOTIFY has woken the consumer
        release.set()
        await got.wait_for(15, timeout=10)
    assert [e.n for e in got.items] == list(range(15))


async def test_killing_the_listener_loses_nothing(durable_bus, sql, channel: str):
    """Killing the LISTEN backend during 10,000 events: each is handled once, in order."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus(plugin={"poll_interval": 600.0})  # no safety net
    bus.subscribe(ticket, durable="stream")(got)
    watch = Watch()
    bus.plugins.register(watch)
    kills = 0
    async with bus:
        await watch.connects(1)
        for start in range(0, 10_000, 100):
            await bus.publish_many([ticket(n=i) for i in range(start, start + 100)])
            if start % 2000 == 1000:
                await sql.execute("SELECT pg_terminate_backend($1)", bus.listener_pid)
                kills += 1
                await watch.connects(kills + 1)
        await got.wait_for(10_000, timeout=120)
    assert kills == 5
    assert bus.reconnects == 5
    assert [e.n for e in got.items] == list(range(10_000))


async def test_handler_failure_is_dead_lettered_and_passed(durable_bus, sql, schema, channel):
    """A handler that fails for good dead-letters the event into the table and moves on."""
    ticket = ticket_type(channel)
    got = Collector()

    async def handler(event: Any) -> None:
        if event.n == 1:
            msg = "no"
            raise ValueError(msg)
        await got(event)

    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="dl", retry=pgbus.Retry(attempts=2, backoff=0.0))(handler)
    async with bus:
        await bus.publish_many([ticket(n=0), ticket(n=1), ticket(n=2)])
        await got.wait_for(2)
    assert [e.n for e in got.items] == [0, 2]
    row = await sql.fetchrow(f'SELECT * FROM "{schema}".dead_letters')
    assert row["subscription"] == "dl"
    assert row["attempts"] == 2
    assert "ValueError: no" in row["error"]
    assert json.loads(row["payload"])["data"]["n"] == 1
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".batches') == 0


@pytest.mark.both_buses
async def test_plain_and_durable_on_one_channel_each_get_every_event_once(durable_bus, channel):
    """A plain and a durable subscription on one channel each handle every event once."""
    ticket = ticket_type(channel)
    plain = Collector()
    durable = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, name="plain")(plain)
    bus.subscribe(ticket, durable="d", name="durable")(durable)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(20)])
        await plain.wait_for(20)
        await durable.wait_for(20)
        await bus.publish(ticket(n=20))  # a marker: everything before it was delivered
        await plain.wait_for(21)
        await durable.wait_for(21)
    assert [e.n for e in plain.items] == list(range(21))
    assert [e.n for e in durable.items] == list(range(21))


@pytest.mark.both_buses
async def test_durable_listen_on_a_running_bus_is_refused(durable_bus, channel):
    """A durable subscription cannot be added once the bus runs (its group must be known)."""
    bus: pgbus.Bus = durable_bus()
    async with bus:
        with pytest.raises(pgbus.BusClosed, match="before the bus starts"):
            await bus.listen(ticket_type(channel), Collector(), durable="late")


async def test_poison_event_is_dead_lettered_unhandled(durable_bus, sql, schema, channel):
    """An event claimed max_deliveries times without an outcome is dead-lettered, not handled."""
    ticket = ticket_type(channel)
    got = Collector()
    journal_id = await sql.fetchval(
        f'INSERT INTO "{schema}".journal (channel, event_id, type, payload)'
        " VALUES ($1, 'poison', 'Ticket', $2) RETURNING id",
        channel,
        json.dumps({"v": 1, "id": "poison", "type": "Ticket", "ts": 0, "data": {"n": 0}}),
    )
    first: pgbus.Bus = durable_bus()
    first.subscribe(ticket, durable="p")(Collector())
    async with first:  # registers "p" after the row: only the batch below holds it
        pass
    await sql.execute(  # as if 3 processes had died handling it
        f'INSERT INTO "{schema}".batches (subscription, journal_ids, deliveries)'
        " VALUES ($1, ARRAY[$2::bigint], 3)",
        "p",
        journal_id,
    )
    bus: pgbus.Bus = durable_bus(plugin={"max_deliveries": 3})
    bus.subscribe(ticket, durable="p")(got)
    async with bus:
        await bus.publish(ticket(n=1))
        await got.wait_for(1)
    assert [e.n for e in got.items] == [1]
    row = await sql.fetchrow(f'SELECT * FROM "{schema}".dead_letters')
    assert row["event_id"] == "poison"
    assert "delivered 3 times" in row["error"]


@pytest.mark.both_buses
async def test_durable_where_and_concurrency(durable_bus, channel):
    """where= filters a durable subscription (the rest is acked); concurrency= runs in parallel."""
    ticket = ticket_type(channel)
    got = Collector()
    running = 0
    peak = 0

    async def handler(event: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        await got(event)

    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="even", concurrency=4, where=lambda e: e.n % 2 == 0)(handler)
    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(40)])
        await got.wait_for(20)
        await bus.publish(ticket(n=100))
        await got.wait_for(21)
    assert sorted(e.n for e in got.items) == [*range(0, 40, 2), 100]
    assert peak > 1
    [sub] = await bus.durable_subscriptions()  # nothing left in its batches
    assert (sub.backlog, sub.retries) == (0, 0)


@pytest.mark.both_buses
async def test_unlisten_a_durable_subscription(durable_bus, channel):
    """A durable subscription removed while running gets nothing more; the bus stops cleanly."""
    ticket = ticket_type(channel)
    got = Collector()
    bus: pgbus.Bus = durable_bus()
    bus.subscribe(ticket, durable="gone", name="gone")(got)
    async with bus:
        await bus.publish(ticket(n=1))
        await got.wait_for(1)
        [sub] = [s for s in bus.subscriptions if s.name == "gone"]
        await bus.unlisten(sub)
        await bus.publish(ticket(n=2))
    assert [e.n for e in got.items] == [1]


@pytest.mark.both_buses
async def test_stop_out_of_time_acks_what_was_handled(durable_bus, channel: str):
    """A stop whose deadline cuts a batch short acks the handled events; only the rest return."""
    ticket = ticket_type(channel)
    handled = Collector()
    never = asyncio.Event()

    async def slow_on_two(event: Any) -> None:
        if event.n == 2:
            await never.wait()
        await handled(event)

    bus1: pgbus.Bus = durable_bus(stop_timeout=0.5)
    bus1.subscribe(ticket, durable="billing")(slow_on_two)
    async with bus1:
        await bus1.publish_many([ticket(n=i) for i in range(3)])
        await handled.wait_for(2)
    again = Collector()
    bus2: pgbus.Bus = durable_bus()
    bus2.subscribe(ticket, durable="billing")(again)
    async with bus2:
        await again.wait_for(1)
        await bus2.publish(ticket(n=3))
        await again.wait_for(2)
    assert [e.n for e in handled.items] == [0, 1]
    assert [e.n for e in again.items] == [2, 3]
