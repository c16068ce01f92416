"""Table change events: triggers that publish committed row changes (pgbus.changes)."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pydantic
import pytest
from click.testing import CliRunner

import pgbus
from pgbus import changes
from pgbus.cli.triggers import triggers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import asyncpg
    from conftest import Recorder


class Order(pydantic.BaseModel):
    id: int
    status: str
    total: Decimal | None = None


class Item(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(populate_by_name=True)

    order_id: int = pydantic.Field(alias="Order Id")
    line: int = pydantic.Field(alias="Line")
    sku: str = pydantic.Field(alias='S"K"U')


@pytest.fixture
async def schema(pg_conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A schema of its own for the test's tables, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await pg_conn.execute(f"CREATE SCHEMA {name}")
    yield name
    await pg_conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
async def orders(pg_conn: asyncpg.Connection, schema: str) -> str:
    """``<schema>.orders (id int primary key, status text, total numeric)``, qualified."""
    await pg_conn.execute(
        f"CREATE TABLE {schema}.orders (id int PRIMARY KEY, status text NOT NULL, total numeric)"
    )
    return f"{schema}.orders"


async def _running(
    make_bus: Callable[..., pgbus.Bus], model: type[pgbus.Event] | str, handler: Any
) -> pgbus.Bus:
    bus = make_bus()
    await bus.listen(model, handler)
    await bus.start()
    return bus


async def test_insert_update_delete_arrive_as_typed_events(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """Each committed INSERT, UPDATE and DELETE arrives as RowChanged[Order]: op, key, new, old."""
    order_changed = pgbus.RowChanged[Order].on(channel)
    bus = await _running(make_bus, order_changed, recorder)
    trigger = await bus.install_change_trigger("orders", schema=schema, model=order_changed)
    assert (trigger.channel, trigger.key, trigger.event_type) == (
        channel,
        ("id",),
        "pgbus.RowChanged",
    )
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, 'new', 9.50)")
    await pg_conn.execute(f"UPDATE {orders} SET status = 'paid' WHERE id = 1")
    await pg_conn.execute(f"DELETE FROM {orders} WHERE id = 1")
    inserted, updated, deleted = await recorder.take(3)
    assert isinstance(inserted, order_changed)
    assert inserted.op == "INSERT"
    assert (inserted.schema_name, inserted.table, inserted.key) == (schema, "orders", {"id": 1})
    assert inserted.new == Order(id=1, status="new", total=Decimal("9.50"))
    assert inserted.old is None
    assert inserted.old_key is None
    assert updated.op == "UPDATE"
    assert updated.old == Order(id=1, status="new", total=Decimal("9.50"))
    assert updated.new == Order(id=1, status="paid", total=Decimal("9.50"))
    assert updated.old_key == {"id": 1}
    assert deleted.op == "DELETE"
    assert (deleted.new, deleted.old.status, deleted.key) == (None, "paid", {"id": 1})
    assert not any(e.row_omitted for e in (inserted, updated, deleted))


async def test_class_keyword_binding_and_custom_event_type(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """A subclass bound with channel= and event_type= gets that wire type from the trigger."""

    class OrderChanged(pgbus.RowChanged[Order], channel=channel, event_type="orders.changed"):
        pass

    assert OrderChanged.pgbus_type == "orders.changed"
    assert OrderChanged.row_type() is Order
    assert pgbus.RowChanged[Order].on("x").pgbus_type == changes.ROW_CHANGED_TYPE
    raw = make_bus()
    await raw.listen(channel, recorder)
    await raw.start()
    bus = await _running(make_bus, OrderChanged, recorder)
    await bus.install_change_trigger("orders", schema=schema, model=OrderChanged)
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (7, 'new', NULL)")
    first, second = await recorder.take(2)
    message = first if isinstance(first, pgbus.Message) else second
    event = second if message is first else first
    assert json.loads(message.payload)["type"] == "orders.changed"
    assert isinstance(event, OrderChanged)
    assert event.new == Order(id=7, status="new")


async def test_row_changed_can_be_published_from_python(make_bus, recorder: Recorder, channel):
    """A RowChanged built in Python (e.g. in a test) round-trips, "schema" and all."""
    model = pgbus.RowChanged[Order].on(channel)
    bus = await _running(make_bus, model, recorder)
    change = model(
        op="INSERT", schema="s", table="orders", key={"id": 1}, new=Order(id=1, status="a")
    )
    assert change == model(
        op="INSERT", schema_name="s", table="orders", key={"id": 1}, new=Order(id=1, status="a")
    )
    assert '"schema":"s"' in change.model_dump_json()
    await bus.publish(change)
    assert await recorder.next() == change


async def test_only_committed_changes_are_delivered_at_commit(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """Rolled-back changes (savepoints too) send nothing; committed ones arrive after COMMIT."""
    model = pgbus.RowChanged[Order].on(channel)
    bus = await _running(make_bus, model, recorder)
    await bus.install_change_trigger("orders", schema=schema, channel=channel)
    tx = pg_conn.transaction()
    await tx.start()
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, 'rolled back', NULL)")
    await tx.rollback()
    async with pg_conn.transaction():
        savepoint = pg_conn.transaction()
        await savepoint.start()
        await pg_conn.execute(f"INSERT INTO {orders} VALUES (3, 'rolled back savepoint', NULL)")
        await savepoint.rollback()
        await pg_conn.execute(f"INSERT INTO {orders} VALUES (2, 'committed', NULL)")
        assert await recorder.nothing_more(0.2)
    event = await recorder.next()
    assert event.new.status == "committed"
    assert await recorder.nothing_more(0.1)


async def test_changes_of_one_transaction_arrive_in_order(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """Changes made in one transaction arrive in the order the rows changed."""
    model = pgbus.RowChanged[Order].on(channel)
    bus = await _running(make_bus, model, recorder)
    await bus.install_change_trigger("orders", schema=schema, model=model)
    async with pg_conn.transaction():
        for i in range(5):
            await pg_conn.execute(f"INSERT INTO {orders} VALUES ($1, 'new', NULL)", i)
        await pg_conn.execute(f"UPDATE {orders} SET status = 'x' WHERE id = 3")
        await pg_conn.execute(f"DELETE FROM {orders} WHERE id = 0")
    got = await recorder.take(7)
    assert [(e.op, e.key["id"]) for e in got] == [
        *(("INSERT", i) for i in range(5)),
        ("UPDATE", 3),
        ("DELETE", 0),
    ]


async def test_quoted_names_composite_key_and_other_schema(
    make_bus, recorder: Recorder, pg_conn, channel
):
    """A table whose schema, table and column names need quoting, with a composite key, works."""
    schema, table = 'Sales "Dept".x', "Order Items; DROP TABLE x --"
    qs, qt = changes.quote_ident(schema), changes.quote_ident(table)
    await pg_conn.execute(f"CREATE SCHEMA {qs}")
    try:
        await pg_conn.execute(
            f'CREATE TABLE {qs}.{qt} ("Order Id" int, "Line" int, "S""K""U" text,'
            ' PRIMARY KEY ("Line", "Order Id"))'
        )
        model = pgbus.RowChanged[Item].on(channel)
        bus = await _running(make_bus, model, recorder)
        trigger = await bus.install_change_trigger(table, schema=schema, model=model)
        assert trigger.key == ("Line", "Order Id")
        await pg_conn.execute(f"INSERT INTO {qs}.{qt} VALUES (10, 1, 'ab')")
        await pg_conn.execute(f'UPDATE {qs}.{qt} SET "Line" = 2 WHERE "Line" = 1')
        inserted, updated = await recorder.take(2)
        assert (inserted.schema_name, inserted.table) == (schema, table)
        assert inserted.key == {"Line": 1, "Order Id": 10}
        assert inserted.new == Item(order_id=10, line=1, sku="ab")
        assert (updated.old_key, updated.key) == (
            {"Line": 1, "Order Id": 10},
            {"Line": 2, "Order Id": 10},
        )
        assert await updated.fetch(bus) == Item(order_id=10, line=2, sku="ab")
        assert [t.table for t in await bus.list_change_triggers(schema=schema)] == [table]
        assert await bus.remove_change_trigger(table, schema=schema)
    finally:
        await pg_conn.execute(f"DROP SCHEMA {qs} CASCADE")


async def test_partitioned_table_reports_the_partitioned_table(
    make_bus, recorder: Recorder, pg_conn, schema, channel
):
    """A trigger on a partitioned table covers every partition, even later ones, under its name."""
    await pg_conn.execute(
        f"CREATE TABLE {schema}.m (id int, region text, PRIMARY KEY (id, region))"
        " PARTITION BY LIST (region);"
        f" CREATE TABLE {schema}.m_eu PARTITION OF {schema}.m FOR VALUES IN ('eu')"
    )
    model = pgbus.RowChanged[dict[str, Any]].on(channel)
    bus = await _running(make_bus, model, recorder)
    await bus.install_change_trigger("m", schema=schema, model=model)
    await pg_conn.execute(
        f"CREATE TABLE {schema}.m_us PARTITION OF {schema}.m FOR VALUES IN ('us')"
    )
    await pg_conn.execute(f"INSERT INTO {schema}.m VALUES (1, 'eu'), (2, 'us')")
    got = await recorder.take(2)
    assert [(e.table, e.key) for e in got] == [
        ("m", {"id": 1, "region": "eu"}),
        ("m", {"id": 2, "region": "us"}),
    ]
    assert await got[1].fetch(bus) == {"id": 2, "region": "us"}
    assert [t.table for t in await bus.list_change_triggers(schema=schema)] == ["m"]
    assert await bus.remove_change_trigger("m", schema=schema)
    count = (
        "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1"
    )
    assert await pg_conn.fetchval(count, schema) == 0


async def test_columns_limit_the_row_data_and_skip_unrelated_updates(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """With columns=, only those columns are sent; an UPDATE changing none of them sends nothing."""
    bus = await _running(make_bus, channel, recorder)
    await bus.install_change_trigger("orders", schema=schema, channel=channel, columns=["status"])
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, 'new', 1)")
    await pg_conn.execute(f"UPDATE {orders} SET total = 2")
    await pg_conn.execute(f"UPDATE {orders} SET status = 'paid'")
    inserted, updated = [json.loads(m.payload)["data"] for m in await recorder.take(2)]
    assert inserted["new"] == {"status": "new"}
    assert (updated["old"], updated["new"]) == ({"status": "new"}, {"status": "paid"})
    assert updated["key"] == {"id": 1}
    assert await recorder.nothing_more(0.1)


async def test_operations_choose_what_is_reported(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """A trigger installed for INSERT and DELETE reports no UPDATE."""
    model = pgbus.RowChanged[Order].on(channel)
    bus = await _running(make_bus, model, recorder)
    trigger = await bus.install_change_trigger(
        "orders", schema=schema, model=model, operations=["delete", "INSERT"]
    )
    assert trigger.operations == ("INSERT", "DELETE")
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, 'new', NULL)")
    await pg_conn.execute(f"UPDATE {orders} SET status = 'paid'")
    await pg_conn.execute(f"DELETE FROM {orders}")
    assert [e.op for e in await recorder.take(2)] == ["INSERT", "DELETE"]


async def test_large_row_sends_the_key_and_fetch_reads_the_row(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """A row too large for NOTIFY commits fine and arrives as its key only; fetch() reads it."""
    model = pgbus.RowChanged[Order].on(channel)
    bus = await _running(make_bus, model, recorder)
    await bus.install_change_trigger("orders", schema=schema, model=model)
    big = "é" * 5000  # 10000 bytes
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, $1, 1.25)", big)
    event = await recorder.next()
    assert (event.op, event.key, event.row_omitted, event.new) == ("INSERT", {"id": 1}, True, None)
    assert await event.fetch(bus) == Order(id=1, status=big, total=Decimal("1.25"))
    async with pg_conn.transaction():
        assert await event.fetch(pg_conn) == Order(id=1, status=big, total=Decimal("1.25"))
    await pg_conn.execute(f"DELETE FROM {orders}")
    deleted = await recorder.next()
    assert deleted.row_omitted
    assert await deleted.fetch(bus) is None


async def test_key_too_large_still_commits_and_says_the_table_changed(
    make_bus, recorder: Recorder, pg_conn, schema, channel
):
    """A change whose key alone exceeds the limit still commits and sends an empty key."""
    await pg_conn.execute(f"CREATE TABLE {schema}.docs (path text PRIMARY KEY)")
    model = pgbus.RowChanged[dict[str, Any]].on(channel)
    bus = await _running(make_bus, model, recorder)
    await bus.install_change_trigger("docs", schema=schema, model=model)
    await pg_conn.execute(f"INSERT INTO {schema}.docs VALUES ($1)", "p" * 9000)
    event = await recorder.next()
    assert (event.op, event.key, event.row_omitted) == ("INSERT", {}, True)
    with pytest.raises(pgbus.ConfigError, match="carries no key"):
        await event.fetch(bus)


async def test_numeric_columns_keep_their_exact_digits(
    make_bus, recorder: Recorder, pg_conn, schema, channel
):
    """numeric values (key and data) arrive with every digit, trailing zeros included."""
    await pg_conn.execute(
        f"CREATE DOMAIN {schema}.money_d AS numeric(40, 20);"
        f" CREATE TABLE {schema}.prices (k numeric PRIMARY KEY, p {schema}.money_d, f float8)"
    )
    model = pgbus.RowChanged[dict[str, Any]].on(channel)
    bus = await _running(make_bus, model, recorder)
    await bus.install_change_trigger("prices", schema=schema, model=model)
    key, price = Decimal("12345678901234567890.10"), Decimal("0.12345678901234567891")
    await pg_conn.execute(f"INSERT INTO {schema}.prices VALUES ($1, $2, 0.1)", key, price)
    event = await recorder.next()
    assert event.key == {"k": "12345678901234567890.10"}
    assert event.new == {"k": str(key), "p": str(price), "f": 0.1}
    assert await event.fetch(bus) == event.new


async def test_install_is_idempotent_and_replaces_settings(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """Installing twice leaves one trigger; installing with another channel moves the events."""
    other = channel + "_b"
    bus = make_bus()
    await bus.listen(channel, recorder)
    await bus.listen(other, recorder)
    await bus.start()
    for _ in range(2):
        await bus.install_change_trigger("orders", schema=schema, channel=channel)
    assert len(await bus.list_change_triggers(schema=schema)) == 1
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, 'a', NULL)")
    assert (await recorder.next()).channel == channel
    await bus.install_change_trigger("orders", schema=schema, channel=other)
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (2, 'b', NULL)")
    assert (await recorder.next()).channel == other
    assert await recorder.nothing_more(0.1)


async def test_remove_stops_events_and_drops_the_unused_function(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """remove_change_trigger stops the events and drops the function once no trigger uses it."""
    await pg_conn.execute(f"CREATE TABLE {schema}.other (id int PRIMARY KEY)")
    bus = await _running(make_bus, channel, recorder)
    await bus.install_change_trigger("orders", schema=schema, channel=channel)
    await bus.install_change_trigger("other", schema=schema, channel=channel)
    function = (
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = $1 AND p.proname = 'pgbus_notify_change'"
    )
    assert await bus.remove_change_trigger("orders", schema=schema) is True
    assert await pg_conn.fetchval(function, schema) == 1
    assert await bus.remove_change_trigger("orders", schema=schema) is False
    await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, 'a', NULL)")
    await pg_conn.execute(f"INSERT INTO {schema}.other VALUES (5)")
    assert json.loads((await recorder.next()).payload)["data"]["table"] == "other"
    assert await bus.remove_change_trigger("other", schema=schema) is True
    assert await pg_conn.fetchval(function, schema) == 0
    assert await bus.list_change_triggers(schema=schema) == []


async def test_list_reads_every_setting_back(make_bus, pg_conn, schema, orders, channel):
    """list_change_triggers returns what was installed, read from the catalog, filtered by table."""
    await pg_conn.execute(f"CREATE TABLE {schema}.other (a int, b text)")
    bus = make_bus()
    installed = await bus.install_change_trigger(
        "orders", schema=schema, channel=channel, columns=["status", "id"], operations=["UPDATE"]
    )
    second = await bus.install_change_trigger(
        "other", schema=schema, channel=channel, key=["a"], event_type="x.y", name="audit"
    )
    assert await bus.list_change_triggers(schema=schema) == [installed, second]
    assert await bus.list_change_triggers(table="other", schema=schema) == [second]
    assert installed == changes.ChangeTrigger(
        schema, "orders", "pgbus_changes", channel, "pgbus.RowChanged", ("UPDATE",), ("id",),
        ("status", "id"),
    )  # fmt: skip
    await pg_conn.execute(f'ALTER TABLE {schema}.other DISABLE TRIGGER "audit"')
    (listed,) = await bus.list_change_triggers(table="other", schema=schema)
    assert not listed.enabled


async def test_install_in_the_callers_transaction_follows_it(
    make_bus, pg_conn, schema, orders, channel
):
    """With connection=, the install happens in the caller's transaction and rolls back with it."""
    bus = make_bus()
    tx = pg_conn.transaction()
    await tx.start()
    await bus.install_change_trigger("orders", schema=schema, channel=channel, connection=pg_conn)
    assert len(await bus.list_change_triggers(schema=schema, connection=pg_conn)) == 1
    await tx.rollback()
    assert await bus.list_change_triggers(schema=schema) == []


async def test_foreign_trigger_of_the_same_name_is_left_alone(
    make_bus, pg_conn, schema, orders, channel
):
    """A user's own trigger with the chosen name is neither replaced nor removed."""
    await pg_conn.execute(
        f"CREATE FUNCTION {schema}.mine() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN RETURN NULL; END$$;"
        f" CREATE TRIGGER pgbus_changes AFTER INSERT ON {orders}"
        f" FOR EACH ROW EXECUTE FUNCTION {schema}.mine()"
    )
    bus = make_bus()
    with pytest.raises(pgbus.ConfigError, match="already has a trigger"):
        await bus.install_change_trigger("orders", schema=schema, channel=channel)
    with pytest.raises(pgbus.ConfigError, match="not a pgbus change trigger"):
        await bus.remove_change_trigger("orders", schema=schema)
    assert (
        await pg_conn.fetchval(
            f"SELECT count(*) FROM pg_trigger WHERE tgrelid = '{orders}'::regclass"
        )
        == 1
    )


async def test_table_without_primary_key_needs_key_columns(make_bus, pg_conn, schema, channel):
    """A table without a primary key is refused unless key= names the identifying columns."""
    await pg_conn.execute(f"CREATE TABLE {schema}.log (a int, b text)")
    bus = make_bus()
    with pytest.raises(pgbus.ConfigError, match="no primary key"):
        await bus.install_change_trigger("log", schema=schema, channel=channel)
    trigger = await bus.install_change_trigger("log", schema=schema, channel=channel, key="a")
    assert trigger.key == ("a",)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"table": "missing"}, "no table 'missing'"),
        ({"table": "public.orders"}, "pass the schema as schema="),
        ({"table": "orders", "columns": ["nope"]}, "no column 'nope'"),
        ({"table": "orders", "key": ["nope"]}, "no column 'nope'"),
        ({"table": "orders", "columns": []}, "at least one"),
        ({"table": "orders", "operations": ["TRUNCATE"]}, "operation must be one of"),
        ({"table": "orders", "operations": []}, "at least one"),
        ({"table": "orders", "channel": None}, "pass channel="),
        ({"table": "orders", "event_type": ""}, "event_type"),
        ({"table": "orders_view"}, "is not a table"),
    ],
)
async def test_bad_arguments_are_config_errors(
    make_bus, pg_conn, schema, orders, channel, kwargs, match
):
    """Unknown tables and columns, views and bad options raise ConfigError and change nothing."""
    await pg_conn.execute(f"CREATE VIEW {schema}.orders_view AS SELECT * FROM {orders}")
    options: dict[str, Any] = {"schema": schema, "channel": channel, **kwargs}
    if kwargs.get("table") == "public.orders":
        options.pop("schema")
    with pytest.raises(pgbus.ConfigError, match=match):
        await make_bus().install_change_trigger(**options)
    assert await make_bus().list_change_triggers(schema=schema) == []


def test_model_and_channel_must_agree():
    """A model must be a RowChanged bound to a channel, and agree with channel= and event_type=."""
    bound = pgbus.RowChanged[Order].on("orders_changes")
    with pytest.raises(pgbus.ConfigError, match="has no channel"):
        changes._channel_and_type(None, pgbus.RowChanged[Order], None)
    with pytest.raises(pgbus.ConfigError, match="differs"):
        changes._channel_and_type("other", bound, None)
    with pytest.raises(pgbus.ConfigError, match="differs"):
        changes._channel_and_type(None, bound, "other.type")
    with pytest.raises(pgbus.ConfigError, match="RowChanged subclass"):
        changes._channel_and_type(None, Order, None)  # type: ignore[arg-type]
    assert changes._channel_and_type("orders_changes", bound, None) == (
        "orders_changes",
        "pgbus.RowChanged",
    )


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 64, "é" * 32, 5, None])
async def test_invalid_identifiers_are_refused_before_any_sql(bad):
    """Bad table, schema, column and trigger names raise InvalidIdentifier without connecting."""
    bus = pgbus.Bus("postgresql://nobody@127.0.0.1:1/none", load_entrypoints=False)
    calls = [
        lambda: bus.install_change_trigger(bad, channel="c"),
        lambda: bus.install_change_trigger("t", channel="c", columns=[bad]),
        lambda: bus.install_change_trigger("t", channel="c", key=[bad]),
        lambda: bus.install_change_trigger("t", channel="c", name=bad),
        lambda: bus.remove_change_trigger(bad),
        lambda: bus.remove_change_trigger("t", name=bad),
    ]
    if bad is not None:  # None means "the default" for these
        calls += [
            lambda: bus.install_change_trigger("t", schema=bad, channel="c"),
            lambda: bus.list_change_triggers(table=bad),
            lambda: bus.list_change_triggers(schema=bad),
        ]
    for call in calls:
        with pytest.raises(pgbus.InvalidIdentifier):
            await call()
    await bus.stop()


def test_quoting_helpers():
    """quote_ident always quotes and doubles quotes; quote_literal escapes quotes, backslashes."""
    assert changes.quote_ident("a") == '"a"'
    assert changes.quote_ident('x"; DROP TABLE t; --') == '"x""; DROP TABLE t; --"'
    assert changes.quote_literal("it's") == "'it''s'"
    assert changes.quote_literal("a\\'b") == "E'a\\\\''b'"
    with pytest.raises(pgbus.ConfigError):
        changes.quote_literal("a\x00")


def test_cli_install_list_remove(pg_dsn, schema, orders, channel):
    """`pgbus triggers install/list/remove` manage a change trigger; errors are one line."""
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(
            triggers, ["--dsn", pg_dsn, *args], catch_exceptions=False, env={"COLUMNS": "300"}
        )

    result = invoke(
        "install",
        "orders",
        "--schema",
        schema,
        "--channel",
        channel,
        "--op",
        "insert",
        "-c",
        "status",
    )
    assert result.exit_code == 0, result.output
    assert f"on {schema}.orders: INSERT -> channel {channel}" in result.output
    listed = invoke("list", "--schema", schema, "--json")
    assert json.loads(listed.output) == [
        {
            "schema": schema, "table": "orders", "name": "pgbus_changes", "channel": channel,
            "event_type": "pgbus.RowChanged", "operations": ["INSERT"], "key": ["id"],
            "columns": ["status"], "enabled": True, "journal": None,
        }
    ]  # fmt: skip
    table = invoke("list", "--schema", schema)
    assert channel in table.output
    assert "pgbus_changes" in table.output
    failed = invoke("install", "nope", "--schema", schema, "--channel", channel)
    assert failed.exit_code == 1
    assert "no table 'nope'" in failed.output
    assert invoke("remove", "orders", "--schema", schema).output.startswith("removed trigger")
    assert invoke("remove", "orders", "--schema", schema).output.startswith("no trigger")
    assert invoke("list", "--schema", schema).output.strip() == "no change triggers"


def test_cli_install_with_a_model(pg_dsn, schema, orders, channel, tmp_path, monkeypatch):
    """`--model module:Class` takes the channel and the event type from a RowChanged subclass."""
    (tmp_path / "cli_models.py").write_text(
        "import pydantic, pgbus\n"
        "class Row(pydantic.BaseModel):\n    id: int\n"
        f"class Changed(pgbus.RowChanged[Row], channel={channel!r}, event_type='row.changed'):\n"
        "    pass\n"
        "class NotAChange(pgbus.Event, channel='x'):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    base = ["--dsn", pg_dsn, "install", "orders", "--schema", schema, "--json", "--model"]
    result = runner.invoke(triggers, [*base, "cli_models:Changed"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["event_type"] == "row.changed"
    wrong = runner.invoke(triggers, [*base, "cli_models:NotAChange"])
    assert wrong.exit_code == 2
    assert "not a pgbus.RowChanged subclass" in wrong.output


async def test_durable_trigger_journals_changes_for_durable_subscriptions(
    make_bus, recorder: Recorder, pg_conn, schema, orders, channel
):
    """With durable=True, changes made while no process runs reach a durable subscription whole."""
    from pgbus.durable import DurablePlugin, migrate

    journal = f"{schema}_journal"
    await migrate(pg_conn, journal)
    model = pgbus.RowChanged[Order].on(channel)

    def durable_bus(handler: Any) -> pgbus.Bus:
        plugin = DurablePlugin(journal, poll_interval=60.0, prune_interval=None)
        bus = make_bus(plugins=[plugin])
        bus.subscribe(model, durable="orders-sync")(handler)
        return bus

    async def ignore(change: Any) -> None:
        pass

    second: pgbus.Bus | None = None
    try:
        first = durable_bus(ignore)
        await first.start()  # registers the durable subscription's position
        trigger = await first.install_change_trigger(
            "orders", schema=schema, model=model, durable=True
        )
        assert trigger.journal == journal
        assert await first.list_change_triggers(schema=schema) == [trigger]
        await first.stop()
        big = "x" * 9000
        await pg_conn.execute(f"INSERT INTO {orders} VALUES (1, 'new', 1)")
        await pg_conn.execute(f"INSERT INTO {orders} VALUES (2, $1, 2)", big)
        second = durable_bus(recorder)
        await second.start()
        small, large = await recorder.take(2)
        assert (small.op, small.new) == ("INSERT", Order(id=1, status="new", total=Decimal(1)))
        assert not large.row_omitted
        assert large.new == Order(id=2, status=big, total=Decimal(2))
    finally:
        if second is not None:  # its consumer must be gone before the journal is dropped
            await second.stop()
        await pg_conn.execute(f'DROP SCHEMA "{journal}" CASCADE')


async def test_durable_needs_the_plugin_and_a_journal(make_bus, schema, orders, channel):
    """durable=True without the durable plugin, or journal= naming no journal, is refused."""
    with pytest.raises(pgbus.ConfigError, match="need the durable plugin"):
        await make_bus().install_change_trigger(
            "orders", schema=schema, channel=channel, durable=True
        )
    with pytest.raises(pgbus.ConfigError, match="no durable journal"):
        await changes.install_change_trigger(
            make_bus(), "orders", schema=schema, channel=channel, journal="nope"
        )


def test_cli_dsn_comes_from_the_option_then_the_environment(pg_dsn, schema):
    """Without --dsn the group reads $PGBUS_DSN; with neither it is a one-line error."""
    runner = CliRunner()
    listed = runner.invoke(triggers, ["list", "--schema", schema], env={"PGBUS_DSN": pg_dsn})
    assert listed.exit_code == 0, listed.output
    assert listed.output.strip() == "no change triggers"
    missing = runner.invoke(triggers, ["list"], env={"PGBUS_DSN": None})
    assert missing.exit_code != 0
    assert "no database" in missing.output


def test_pgbus_command_has_the_triggers_group(pg_dsn, schema, orders, channel):
    """`pgbus --dsn … triggers install` uses the main command's DSN."""
    from pgbus.cli import cli

    runner = CliRunner()
    args = ["--dsn", pg_dsn, "triggers", "install", "orders", "--schema", schema]
    result = runner.invoke(cli, [*args, "--channel", channel], env={"PGBUS_DSN": None})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("installed trigger pgbus_changes")


def test_cli_list_keeps_names_whole_at_80_columns(pg_dsn, schema, orders, channel):
    """At 80 columns the trigger table wraps lists, never a table or channel name."""
    from pgbus.cli import cli

    runner = CliRunner()
    env = {"PGBUS_DSN": pg_dsn, "COLUMNS": "80"}
    installed = runner.invoke(
        cli, ["triggers", "install", "orders", "--schema", schema, "--channel", channel], env=env
    )
    assert installed.exit_code == 0, installed.output
    listed = runner.invoke(cli, ["triggers", "list", "--schema", schema], env=env)
    assert listed.exit_code == 0, listed.output
    assert max(len(line) for line in listed.output.splitlines()) <= 80
    assert f"{schema}.orders" in listed.output
    assert channel in listed.output


async def test_cli_errors_name_options_not_arguments(pg_dsn, schema, pg_conn, channel):
    """The triggers commands' errors name their options (--channel, --key), not keywords."""
    from pgbus.cli import cli

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli, ["triggers", *args], env={"PGBUS_DSN": pg_dsn})

    no_channel = await asyncio.to_thread(invoke, "install", "orders", "--schema", schema)
    assert no_channel.exit_code == 1
    assert "pass --channel (or a --model with one)" in no_channel.output
    await pg_conn.execute(f"CREATE TABLE {schema}.logs (line text)")
    no_key = await asyncio.to_thread(
        invoke, "install", "logs", "--schema", schema, "--channel", channel
    )
    assert no_key.exit_code == 1
    assert "pass --key COLUMN (repeatable)" in no_key.output
    assert "key=" not in no_key.output
