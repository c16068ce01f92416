"""pgbus-signing with the durable plugin: large events by reference, redelivered dead letters."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import pytest
from pgbus_signing import SIGNATURE_HEADER, SignatureError, SigningPlugin
from test_signing import KEYS, TIMEOUT, Observed, conn  # noqa: F401 - conn is a fixture

import pgbus
from pgbus.durable import DurablePlugin, list_dead_letters, migrate, redeliver

BIG = "x" * 9000  # over NOTIFY's limit: the notification is a reference


class Blob(pgbus.Event):
    blob: str = ""
    n: int = 0


def model(channel: str) -> type[Blob]:
    class Ticket(Blob, channel=channel):
        pass

    return Ticket


class Clock:
    """A signing clock that the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Received:
    """Queues every notification the bus receives (before decoding)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pgbus.Message] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_received(self, messages) -> None:
        for message in messages:
            self.queue.put_nowait(message)


@pytest.fixture
async def schema(pg_dsn):
    name = f"pgbus_s_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(pg_dsn)
    await migrate(connection, name)
    yield name
    await connection.execute(f'DROP SCHEMA "{name}" CASCADE')
    await connection.close()


def signed_durable_bus(pg_dsn: str, schema: str, *plugins: object, **signing: object) -> pgbus.Bus:
    return pgbus.Bus(
        pg_dsn,
        plugins=[
            DurablePlugin(schema, poll_interval=60.0, prune_interval=None),
            SigningPlugin(KEYS, **signing),  # type: ignore[arg-type]
            *plugins,
        ],
        load_entrypoints=False,
        stop_timeout=5.0,
    )


async def test_a_large_signed_durable_event_leaves_no_false_dead_letter(pg_dsn, schema, channel):
    """With only durable subscriptions, the reference NOTIFY is a wake-up: no decode failure."""
    ticket = model(channel)
    observed, received = Observed(), Received()
    bus = signed_durable_bus(pg_dsn, schema, observed, received)
    got: asyncio.Queue[Blob] = asyncio.Queue()
    bus.subscribe(ticket, durable="big")(got.put_nowait)
    async with bus:
        await bus.publish(ticket(blob=BIG))
        assert (await asyncio.wait_for(got.get(), TIMEOUT)).blob == BIG
        await bus.publish(ticket(n=2))
        assert (await asyncio.wait_for(got.get(), TIMEOUT)).n == 2
        for _ in range(2):  # both notifications are in: stop() dispatches what is received
            await asyncio.wait_for(received.queue.get(), TIMEOUT)
    assert bus.dead_letters == []
    assert observed.decode_errors == []


async def test_a_plain_subscription_gets_the_large_event_verified(pg_dsn, schema, channel):
    """A plain subscription on a signed durable bus gets the journal's event, verified."""
    ticket = model(channel)
    observed = Observed()
    bus = signed_durable_bus(pg_dsn, schema, observed)
    bus.subscribe(ticket)(lambda _e: None)
    async with bus:
        await bus.publish(ticket(blob=BIG))
        delivery = await asyncio.wait_for(observed.handled.get(), TIMEOUT)
    assert delivery.event is not None
    assert delivery.event.blob == BIG  # type: ignore[attr-defined]
    assert delivery.headers[SIGNATURE_HEADER] == "k2"
    assert delivery.message.stored_id == delivery.id
    assert bus.dead_letters == []


async def test_a_reference_to_an_unsigned_journal_row_is_rejected(
    pg_dsn,
    schema,
    channel,
    conn,  # noqa: F811 - the fixture
):
    """A forged journal row reached through a reference fails verification; nobody handles it."""
    ticket = model(channel)
    observed = Observed()
    bus = signed_durable_bus(pg_dsn, schema, observed)
    bus.subscribe(ticket)(lambda _e: None)
    forged = json.dumps({"v": 1, "id": "f" * 32, "type": "Ticket", "ts": 1.0, "data": {"n": 9}})
    async with bus:
        journal_id = await conn.fetchval(
            f'INSERT INTO "{schema}".journal (channel, event_id, type, payload)'  # noqa: S608 - test schema
            " VALUES ($1, $2, 'Ticket', $3) RETURNING id",
            channel,
            "f" * 32,
            forged,
        )
        ref = {"v": 1, "id": "f" * 32, "type": "pgbus.ref", "ts": 1.0}
        await conn.execute(
            "SELECT pg_notify($1, $2)",
            channel,
            json.dumps({**ref, "data": {"journal_id": journal_id}}),
        )
        await bus.publish(ticket(n=1))
        delivery = await asyncio.wait_for(observed.handled.get(), TIMEOUT)
    assert delivery.event == ticket(n=1)
    assert observed.handled.empty()
    [error] = observed.decode_errors
    assert isinstance(error, SignatureError)
    assert "no signature" in str(error)


@pytest.mark.parametrize("later", [0.0, 1000.0])
async def test_a_redelivered_signed_dead_letter_is_accepted(pg_dsn, schema, channel, conn, later):  # noqa: F811 - the fixture
    """`redeliver` puts a signed durable event back, and it passes verification, even later."""
    ticket = model(channel)
    clock = Clock()
    observed = Observed()
    bus = signed_durable_bus(pg_dsn, schema, observed, clock=clock)
    failing = True
    got: asyncio.Queue[Blob] = asyncio.Queue()

    async def flaky(event: Blob) -> None:
        if failing and event.n == 1:
            msg = "down"
            raise RuntimeError(msg)
        got.put_nowait(event)

    bus.subscribe(ticket, durable="flaky", retry=pgbus.Retry(attempts=1))(flaky)
    async with bus:
        await bus.publish_many([ticket(n=1), ticket(n=2)])
        # handled in order: once 2 is handled, 1 is dead-lettered and stored
        assert (await asyncio.wait_for(got.get(), TIMEOUT)).n == 2
        [dead] = await list_dead_letters(conn, schema)
        failing = False
        clock.offset = later  # past max_age: judged by when the row was stored
        assert await redeliver(conn, [dead.id], schema) == {dead.id: "inbox"}
        bus.plugins.get("durable").consumers["flaky"].wake()
        assert (await asyncio.wait_for(got.get(), TIMEOUT)).n == 1
    assert observed.decode_errors == []


async def test_a_copied_signature_under_another_event_id_is_rejected(
    pg_dsn,
    schema,
    channel,
    conn,  # noqa: F811 - the fixture
):
    """A journal row reusing a signed payload under a new event id is refused for it."""
    ticket = model(channel)
    observed = Observed()
    bus = signed_durable_bus(pg_dsn, schema, observed)
    got: asyncio.Queue[Blob] = asyncio.Queue()
    bus.subscribe(ticket, durable="copy")(got.put_nowait)
    async with bus:
        await bus.publish(ticket(n=1))
        await asyncio.wait_for(got.get(), TIMEOUT)
        await conn.execute(
            f'INSERT INTO "{schema}".journal (channel, event_id, type, payload)'  # noqa: S608 - test schema
            f' SELECT channel, $1, type, payload FROM "{schema}".journal',
            "c" * 32,
        )
        await bus.publish(ticket(n=2))
        assert (await asyncio.wait_for(got.get(), TIMEOUT)).n == 2
    assert got.empty()
    [error] = observed.decode_errors
    assert "is not the journal row's" in str(error)
