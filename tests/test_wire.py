"""The wire format against a real PostgreSQL: what foreign publishers send and pgbus reads."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from _helpers import event_on

import pgbus


class Watch:
    """Records what the decode-failure path reports: the hook's calls and the dead letters."""

    def __init__(self) -> None:
        self.errors: asyncio.Queue[tuple[pgbus.Message, BaseException]] = asyncio.Queue()
        self.dead: asyncio.Queue[pgbus.DeadLetter] = asyncio.Queue()
        self.connects: asyncio.Queue[None] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_decode_error(self, message: pgbus.Message, error: BaseException) -> None:
        self.errors.put_nowait((message, error))

    @pgbus.hookimpl
    def pgbus_on_dead_letter(self, dead_letter: pgbus.DeadLetter) -> None:
        self.dead.put_nowait(dead_letter)

    @pgbus.hookimpl
    def pgbus_on_connect(self) -> None:
        self.connects.put_nowait(None)


def record(channel: str) -> type[pgbus.Event]:
    """A model whose fields are those of a table (id, type, data) that row_to_json sends."""
    return type(
        "Row",
        (pgbus.Event,),
        {"__annotations__": {"id": str, "type": str, "data": dict[str, int]}},
        channel=channel,
    )


async def test_a_bare_object_with_id_type_and_data_keys_decodes_against_the_model(
    make_bus, recorder, channel, pg_conn
):
    """row_to_json of a table with columns id, type and data is a bare object, not an envelope."""
    Row = record(channel)
    bus = make_bus()
    bus.subscribe(Row)(recorder)
    async with bus:
        await pg_conn.execute(
            "CREATE TEMP TABLE t (id text, type text, data jsonb);"
            """INSERT INTO t VALUES ('a7', 'deposit', '{"amount": 3}')"""
        )
        await pg_conn.execute("SELECT pg_notify($1, row_to_json(t)::text) FROM t", channel)
        got = await recorder.next()
        assert bus.metrics.snapshot().decode_failures == 0
    assert got == Row(id="a7", type="deposit", data={"amount": 3})


def defaults_on(channel: str) -> type[pgbus.Event]:
    """A model whose every field has a default: an envelope misread as it would still validate."""
    return type(
        "Ping",
        (pgbus.Event,),
        {"__annotations__": {"n": int}, "n": -1},
        channel=channel,
    )


def envelope(**changes: object) -> str:
    """A valid Ping envelope with ``changes`` (a value of ``...`` leaves the key out)."""
    env: dict[str, object] = {
        "v": 1,
        "id": "e1",
        "type": "Ping",
        "ts": 1732530000.25,
        "data": {"n": 4},
    }
    env.update(changes)
    return json.dumps({k: v for k, v in env.items() if v is not ...})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (envelope(ts="2024-11-25T10:20:00Z"), "ts: must be a JSON number of seconds"),
        (envelope(ts=...), "ts: Field required"),
        (envelope(ts=1732530000250), "looks like milliseconds"),
        (envelope(v=2), "v: envelope version 2 is not supported (this reader knows version 1)"),
        (envelope(v="1"), 'v: envelope version "1" is not supported'),
        (envelope(v=True), "v: envelope version true is not supported"),
        (envelope(data={"n": "four"}), "data.n: Input should be a valid integer"),
        (envelope(data=...), "data: Field required"),
        (envelope(data=None), "data: Input should be an object"),
        (envelope(id=""), "id: String should have at least 1 character"),
        (envelope(type="Other", ts="yesterday"), "ts: must be a JSON number"),
        (envelope(type="Other", data=None), "data: Input should be an object"),
    ],
)
async def test_an_invalid_envelope_is_a_decode_failure_never_a_default_event(
    make_bus, recorder, channel, pg_conn, payload, reason
):
    """An object shaped as an envelope that fails to validate is reported, hooked, dead-lettered."""
    Ping = defaults_on(channel)
    watch = Watch()
    bus = make_bus(plugins=[watch])
    bus.subscribe(Ping)(recorder)
    async with bus:
        await pg_conn.execute("SELECT pg_notify($1, $2)", channel, payload)
        await bus.publish(Ping(n=5))
        message, error = await asyncio.wait_for(watch.errors.get(), 5)
        dead = await asyncio.wait_for(watch.dead.get(), 5)
        assert await recorder.next() == Ping(n=5)  # and nothing before it
        assert bus.metrics.snapshot().channels[channel].decode_failures == 1
    assert message.payload == payload
    assert isinstance(error, pgbus.DecodeError)
    assert reason in error.reason
    assert (dead.payload, dead.error, dead.attempts) == (payload, error, 0)


async def test_a_bare_object_failure_reports_the_models_error(make_bus, recorder, channel, pg_conn):
    """A bare object that fails to validate reports its model's error, not the envelope's."""
    Row = record(channel)
    watch = Watch()
    bus = make_bus(plugins=[watch])
    bus.subscribe(Row)(recorder)
    payload = '{"id": "a7", "type": "deposit", "data": {"amount": "three"}}'
    async with bus:
        await pg_conn.execute("SELECT pg_notify($1, $2)", channel, payload)
        _, error = await asyncio.wait_for(watch.errors.get(), 5)
    assert isinstance(error, pgbus.DecodeError)
    assert error.reason == (
        "data.amount: Input should be a valid integer, unable to parse string as an integer"
    )


async def test_a_bare_object_on_a_channel_of_several_types_says_to_send_an_envelope(
    make_bus, recorder, channel, pg_conn
):
    """With two models on the channel a bare object cannot pick one, and the error says so."""
    watch = Watch()
    bus = make_bus(plugins=[watch])
    bus.subscribe(event_on(channel), event_on(channel, "Pong"))(recorder)
    async with bus:
        await pg_conn.execute("SELECT pg_notify($1, $2)", channel, '{"n": 1}')
        _, error = await asyncio.wait_for(watch.errors.get(), 5)
    assert isinstance(error, pgbus.DecodeError)
    assert "publish an envelope" in error.reason


@pytest.mark.parametrize("enveloped", [False, True])
async def test_deeply_nested_json_is_a_decode_error(
    make_bus, recorder, channel, pg_conn, enveloped
):
    """JSON nested 3,000 deep is a DecodeError in the hook and dead letter, not RecursionError."""
    Ping = event_on(channel)
    watch = Watch()
    bus = make_bus(plugins=[watch])
    bus.subscribe(Ping)(recorder)
    deep = "[" * 3000 + "]" * 3000
    payload = envelope(data="DEEP").replace('"DEEP"', deep) if enveloped else deep
    async with bus:
        await pg_conn.execute("SELECT pg_notify($1, $2)", channel, payload)
        _, error = await asyncio.wait_for(watch.errors.get(), 5)
        dead = await asyncio.wait_for(watch.dead.get(), 5)
    assert isinstance(error, pgbus.DecodeError)
    assert "recursion limit" in error.reason
    assert dead.error is error
    assert dead.payload == payload


# -- a SQL_ASCII database ----------------------------------------------------------------


async def test_a_bus_refuses_to_start_on_a_sql_ascii_database(sql_ascii_dsn):
    """On a SQL_ASCII database start() fails, says why and how to fix it or allow it."""
    bus = pgbus.Bus(sql_ascii_dsn, load_entrypoints=False)
    with pytest.raises(pgbus.ListenerError) as info:
        await bus.start()
    assert "encoding is SQL_ASCII" in str(info.value)
    assert "ENCODING 'UTF8'" in str(info.value)
    assert "allow_sql_ascii=True" in str(info.value)


async def test_a_non_utf8_notify_on_sql_ascii_is_a_reported_decode_failure(
    make_bus, recorder, channel, sql_ascii_dsn
):
    """Bytes that are not UTF-8 end the session: a decode failure with the server's reason."""
    Ping = event_on(channel)
    watch = Watch()
    bus = make_bus(sql_ascii_dsn, plugins=[watch], allow_sql_ascii=True)
    bus.subscribe(Ping)(recorder)
    async with bus:
        await asyncio.wait_for(watch.connects.get(), 5)
        conn = await asyncpg.connect(sql_ascii_dsn)
        try:
            await conn.execute(
                "SELECT pg_notify($1, convert_from('\\xff41'::bytea, 'SQL_ASCII'))", channel
            )
        finally:
            await conn.close()
        message, error = await asyncio.wait_for(watch.errors.get(), 5)
        dead = await asyncio.wait_for(watch.dead.get(), 5)
        status = bus.status
        await asyncio.wait_for(watch.connects.get(), 10)  # reconnected
        await bus.publish(Ping(n=1))
        assert await recorder.next() == Ping(n=1)
        assert bus.metrics.snapshot().channels[channel].decode_failures == 1
    assert message.channel == channel
    assert isinstance(error, pgbus.DecodeError)
    assert 'invalid byte sequence for encoding "UTF8": 0xff' in error.reason
    assert "encoding is SQL_ASCII" in error.reason
    assert dead.error is error
    assert 'invalid byte sequence for encoding "UTF8"' in str(status.last_error)
