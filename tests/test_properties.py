"""Property-based tests (hypothesis) against the real database: names, payloads, identifiers.

Each example talks to PostgreSQL, so the example counts are modest and the runs are
deterministic (``derandomize=True``, no example database): CI tests the same inputs every
time. Raise ``PGBUS_HYPOTHESIS_EXAMPLES`` (a multiplier) for a longer local search.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import uuid
from decimal import Decimal  # noqa: TC003 - pydantic reads annotations at run time
from typing import TYPE_CHECKING, Any

import asyncpg
import pydantic
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pgbus
from pgbus import changes

if TYPE_CHECKING:
    from collections.abc import Iterator

SCALE = max(1, int(os.environ.get("PGBUS_HYPOTHESIS_EXAMPLES", "1")))
TIMEOUT = 10.0


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def _utf8_len(text: str) -> int:
    return len(text.encode())


# Characters PostgreSQL text can hold: anything but NUL and lone surrogates.
PG_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
# Names a user might really write, and the ones that break careless quoting.
NASTY_NAMES = [
    "Orders",
    "order items",
    'x"; DROP TABLE victim; --',
    "'; DROP TABLE victim; --",
    "Robert'); DROP TABLE victim;--",
    '"',
    '""',
    "$$",
    "$pgbus$",
    "$pgbus$; DROP TABLE victim; $pgbus$",
    "\\",
    "\\'",
    "a.b",
    "%I%L%s",
    "{schema}",
    "ünïcödé 名前 🐘",
    "UPPER lower",
    "x" * 63,
    "é" * 31,
]
NAMES = st.one_of(
    st.sampled_from(NASTY_NAMES),
    st.text(PG_CHARS, min_size=1, max_size=63).filter(lambda s: _utf8_len(s) <= 63),
)


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for every example of a test (each example is run on it)."""
    with asyncio.Runner() as loop:
        yield loop


class _Inbox:
    """Queues what a handler receives, so an example can wait for it with a timeout."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def __call__(self, item: Any) -> None:
        await self.queue.put(item)

    async def get(self) -> Any:
        return await asyncio.wait_for(self.queue.get(), TIMEOUT)


@contextlib.contextmanager
def _running_bus(runner: asyncio.Runner, dsn: str) -> Iterator[pgbus.Bus]:
    bus = pgbus.Bus(dsn, load_entrypoints=False)
    runner.run(bus.start())
    try:
        yield bus
    finally:
        runner.run(bus.stop())


@contextlib.contextmanager
def _connection(runner: asyncio.Runner, dsn: str) -> Iterator[asyncpg.Connection]:
    conn: asyncpg.Connection = runner.run(asyncpg.connect(dsn))
    try:
        yield conn
    finally:
        runner.run(conn.close())


# -- channel names -------------------------------------------------------------------------


def test_any_valid_channel_name_round_trips(pg_dsn, runner):
    """Any channel name of 1-63 UTF-8 bytes without NUL carries a published event to listeners."""
    inbox, raw = _Inbox(), _Inbox()

    async def roundtrip(bus: pgbus.Bus, name: str, n: int) -> None:
        model: Any = pydantic.create_model(
            "Ping", __base__=pgbus.Event, __cls_kwargs__={"channel": name}, n=(int, ...)
        )
        typed = await bus.listen(model, inbox)
        untyped = await bus.listen(name, raw)
        try:
            await bus.publish(model(n=n))
            event, message = await inbox.get(), await raw.get()
        finally:
            await bus.unlisten(typed)
            await bus.unlisten(untyped)
        assert type(event) is model
        assert event.n == n
        assert message.channel == name
        assert json.loads(message.payload)["data"] == {"n": n}

    with _running_bus(runner, pg_dsn) as bus:

        @given(name=NAMES, n=st.integers())
        @_settings(60)
        def check(name: str, n: int) -> None:
            runner.run(roundtrip(bus, name, n))

        check()


INVALID_CHANNELS = st.one_of(
    st.just(""),
    st.text(PG_CHARS, max_size=20).map(lambda s: s + "\x00" + s),
    st.text(PG_CHARS, min_size=16, max_size=80).filter(lambda s: _utf8_len(s) > 63),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
    st.integers() | st.binary(min_size=1, max_size=10) | st.floats(),  # None: no channel
)


@given(name=INVALID_CHANNELS)
@_settings(150)
def test_any_invalid_channel_is_rejected_before_sql(name: Any) -> None:
    """Empty, NUL-holding, too long, non-UTF-8 and non-str names raise InvalidChannel before SQL."""
    with pytest.raises(pgbus.InvalidChannel):
        pydantic.create_model("Bad", __base__=pgbus.Event, __cls_kwargs__={"channel": name})

    async def attempts() -> None:
        # Nothing listens on port 1: reaching SQL would raise PublishError, not InvalidChannel.
        bus = pgbus.Bus("postgresql://nobody@127.0.0.1:1/none", load_entrypoints=False)
        try:
            with pytest.raises(pgbus.InvalidChannel):
                await bus.notify(name, "x")
            with pytest.raises(pgbus.InvalidChannel):
                await bus.listen(name, _Inbox())
            if isinstance(name, str):  # any other target is taken for an event type
                with pytest.raises(pgbus.InvalidChannel):
                    await bus.unlisten(name)
            with pytest.raises(pgbus.InvalidChannel):
                await bus.install_change_trigger("t", channel=name)
        finally:
            await bus.stop()

    asyncio.run(attempts())


# -- payloads ------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # NUL included
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


class Inner(pydantic.BaseModel):
    label: str
    values: list[int]


class Payload(pgbus.Event):
    text: str
    big: int
    amount: Decimal
    ratio: float
    flag: bool | None
    when: dt.datetime
    inner: Inner
    tags: dict[str, list[str]]
    extra: Any


PAYLOADS = st.builds(
    Payload,
    text=TEXT,
    big=st.integers(min_value=-(10**60), max_value=10**60),
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    flag=st.none() | st.booleans(),
    when=st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    inner=st.builds(Inner, label=TEXT, values=st.lists(st.integers(), max_size=5)),
    tags=st.dictionaries(TEXT, st.lists(TEXT, max_size=3), max_size=3),
    extra=JSON_VALUES,
)


def test_any_json_payload_model_round_trips_exactly(pg_dsn, runner, channel):
    """Any model of JSON-serialisable fields arrives equal, and re-encodes to the same JSON."""
    model: Any = pydantic.create_model(
        "Payload", __base__=Payload, __cls_kwargs__={"channel": channel}
    )
    inbox = _Inbox()

    async def roundtrip(bus: pgbus.Bus, sent: Any) -> None:
        await bus.publish(sent)  # the strategies keep payloads well under 8000 bytes
        received = await inbox.get()
        assert received == sent
        assert received.model_dump_json() == sent.model_dump_json()

    with _running_bus(runner, pg_dsn) as bus:
        runner.run(bus.listen(model, inbox))

        @given(payload=PAYLOADS)
        @_settings(80)
        def check(payload: Payload) -> None:
            runner.run(roundtrip(bus, model.model_validate(payload.model_dump())))

        check()


# -- identifiers ---------------------------------------------------------------------------


async def _snapshot(conn: asyncpg.Connection, schema: str) -> tuple[Any, ...]:
    """What an injection would change: the schema's relations, functions, triggers and rows."""
    relations = await conn.fetch(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY 1, 2",
        schema,
    )
    functions = await conn.fetch(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = $1 ORDER BY 1",
        schema,
    )
    triggers = await conn.fetchval(
        "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
        schema,
    )
    victims = await conn.fetchval(f'SELECT count(*) FROM "{schema}".victim')
    schemas = await conn.fetchval(
        "SELECT count(*) FROM pg_namespace WHERE nspname = ANY($1::text[])",
        ["public", schema],
    )
    return (
        [tuple(r) for r in relations],
        [r[0] for r in functions],
        triggers,
        victims,
        schemas,
    )


async def _ddl(conn: asyncpg.Connection, template: str, *names: str) -> None:
    """Run DDL whose identifiers PostgreSQL's own format('%I') quotes: an independent oracle."""
    sql = await conn.fetchval(
        f"SELECT format({changes.quote_literal(template)}, $1::text, $2::text, $3::text, $4::text)",
        *names,
        *([""] * (4 - len(names))),
    )
    await conn.execute(sql)


def test_identifiers_are_never_an_injection_vector(pg_dsn, runner):
    """Any table, column, channel and trigger name works as given and changes nothing else."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    inbox = _Inbox()
    names = NAMES.map(lambda s: s.replace("{schema}", schema))
    aimed = st.sampled_from(  # injections aimed at this test's victim table
        [n.replace("victim", f'"{schema}".victim') for n in NASTY_NAMES if "victim" in n]
    )
    any_name = st.one_of(names, aimed).filter(lambda s: _utf8_len(s) <= 63)

    async def example(
        bus: pgbus.Bus,
        conn: asyncpg.Connection,
        names: tuple[str, str, str, str, str],
        value: str,
    ) -> None:
        table, key, column, channel, trigger = names
        template = "CREATE TABLE %I.%I (%I int PRIMARY KEY, %I text)"
        await _ddl(conn, template, schema, table, key, column)
        sub = await bus.listen(channel, inbox)
        try:
            installed = await bus.install_change_trigger(
                table, schema=schema, channel=channel, columns=[column], name=trigger
            )
            assert (installed.table, installed.key, installed.columns, installed.name) == (
                table,
                (key,),
                (column,),
                trigger,
            )
            assert await bus.list_change_triggers(table=table, schema=schema) == [installed]
            insert = await conn.fetchval(
                "SELECT format('INSERT INTO %I.%I (%I, %I) VALUES (1, $1)',"
                " $1::text, $2::text, $3::text, $4::text)",
                schema,
                table,
                key,
                column,
            )
            await conn.execute(insert, value)
            message = await inbox.get()
            data = json.loads(message.payload)["data"]
            assert message.channel == channel
            assert (data["schema"], data["table"], data["key"], data["new"]) == (
                schema,
                table,
                {key: 1},
                {column: value},
            )
            assert await bus.remove_change_trigger(table, schema=schema, name=trigger)
        finally:
            await bus.unlisten(sub)
            await _ddl(conn, "DROP TABLE %I.%I", schema, table)

    with _connection(runner, pg_dsn) as conn, _running_bus(runner, pg_dsn) as bus:
        runner.run(
            conn.execute(
                f'CREATE SCHEMA "{schema}";'
                f' CREATE TABLE "{schema}".victim (id int PRIMARY KEY);'
                f' INSERT INTO "{schema}".victim VALUES (1), (2)'
            )
        )
        before = runner.run(_snapshot(conn, schema))

        @given(
            table=any_name,
            key=any_name,
            column=any_name,
            channel=any_name,
            trigger=any_name,
            value=st.text(PG_CHARS, max_size=20),
        )
        @_settings(40)
        def check(
            table: str, key: str, column: str, channel: str, trigger: str, value: str
        ) -> None:
            assume(table != "victim" and key != column)
            runner.run(example(bus, conn, (table, key, column, channel, trigger), value))
            assert runner.run(_snapshot(conn, schema)) == before

        try:
            check()
        finally:
            runner.run(conn.execute(f'DROP SCHEMA "{schema}" CASCADE'))


def test_quoting_matches_postgresql(pg_dsn, runner):
    """quote_ident names a column exactly; quote_literal reads back exactly in both string modes."""

    async def example(conn: asyncpg.Connection, name: str, text: str, conforming: bool) -> None:
        await conn.execute(f"SET standard_conforming_strings = {'on' if conforming else 'off'}")
        row = await conn.fetchrow(
            f"SELECT {changes.quote_literal(text)}::text AS {changes.quote_ident(name)}"
        )
        assert row is not None
        assert list(row.keys()) == [name]
        assert row[0] == text

    with _connection(runner, pg_dsn) as conn:

        @given(name=NAMES, text=st.text(PG_CHARS, max_size=30), conforming=st.booleans())
        @_settings(80)
        def check(name: str, text: str, conforming: bool) -> None:
            runner.run(example(conn, name, text, conforming))

        check()


# -- row data through a change trigger -----------------------------------------------------

JSONB_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.text(PG_CHARS, max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(PG_CHARS, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
DECIMALS = st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**30), max_value=10**30)


class Row(pydantic.BaseModel):
    id: int
    label: str
    amount: Decimal | None
    doc: Any


def test_any_row_arrives_exactly_through_a_change_trigger(pg_dsn, runner, channel):
    """Text, bigint, numeric and jsonb values written by any client arrive in RowChanged exactly."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    model = pgbus.RowChanged[Row].on(channel)
    inbox = _Inbox()

    async def example(conn: asyncpg.Connection, row: Row) -> None:
        await conn.execute(
            f'INSERT INTO "{schema}".rows VALUES ($1, $2, $3, $4::jsonb)',
            row.id,
            row.label,
            row.amount,
            json.dumps(row.doc),
        )
        await conn.execute(f'DELETE FROM "{schema}".rows WHERE id = $1', row.id)
        inserted, deleted = await inbox.get(), await inbox.get()
        assert (inserted.op, inserted.key, inserted.new) == ("INSERT", {"id": row.id}, row)
        assert (deleted.op, deleted.old) == ("DELETE", row)

    with _connection(runner, pg_dsn) as conn, _running_bus(runner, pg_dsn) as bus:
        runner.run(
            conn.execute(
                f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".rows'
                " (id bigint PRIMARY KEY, label text, amount numeric, doc jsonb)"
            )
        )
        runner.run(bus.listen(model, inbox))
        runner.run(bus.install_change_trigger("rows", schema=schema, model=model))

        @given(
            row=st.builds(
                Row,
                id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
                label=st.text(PG_CHARS, max_size=40),
                amount=st.none() | DECIMALS,
                doc=JSONB_VALUES,
            )
        )
        @_settings(50)
        def check(row: Row) -> None:
            runner.run(example(conn, row))

        try:
            check()
        finally:
            runner.run(conn.execute(f'DROP SCHEMA "{schema}" CASCADE'))
