"""faststream-pgbus against a real PostgreSQL, in memory, in `faststream run`, and in AsyncAPI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import jsonschema
import pydantic
import pytest
from faststream import Context, Depends
from faststream.specification import AsyncAPI
from faststream_pgbus import PgbusBroker, PgbusRouter, TestPgbusBroker

import pgbus
from pgbus.durable import DurablePlugin

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable


TIMEOUT = 10.0
#: The pgbus handler attempt of a FastStream message (its raw message carries the context).
ATTEMPT = "message.raw_message.context.attempt"


class Order(pydantic.BaseModel):
    """A plain model: FastStream decodes the body into it by the handler's annotation."""

    order_id: int


def event_on(channel: str) -> type[pgbus.Event]:
    class OrderPlaced(pgbus.Event, channel=channel):
        order_id: int

    return OrderPlaced


async def test_plain_pgbus_event_reaches_a_faststream_subscriber(
    pgbus_dsn: str, pgbus_channel: str
) -> None:
    """An event a plain Bus publishes reaches a FastStream handler, decoded, with its id."""
    OrderPlaced = event_on(  # noqa: N806 - a class
        pgbus_channel
    )
    broker = PgbusBroker(pgbus_dsn)
    got: asyncio.Queue[tuple[Order, str, str]] = asyncio.Queue()

    @broker.subscriber(pgbus_channel)
    async def on_order(
        order: Order,
        message_id: Annotated[str, Context("message.message_id")],
        source: Annotated[str, Depends(lambda: "di")],
    ) -> None:
        await got.put((order, message_id, source))

    async with broker, pgbus.Bus(pgbus_dsn) as bus:
        await broker.start()
        event_id = await bus.publish(OrderPlaced(order_id=7))
        order, message_id, source = await asyncio.wait_for(got.get(), TIMEOUT)
    assert (order, message_id, source) == (Order(order_id=7), event_id, "di")


async def test_broker_publish_reaches_a_plain_pgbus_subscriber(
    pgbus_dsn: str, pgbus_channel: str
) -> None:
    """A dict published on a channel and a pgbus.Event (no channel) reach a typed pgbus handler."""
    OrderPlaced = event_on(  # noqa: N806 - a class
        pgbus_channel
    )
    broker = PgbusBroker(pgbus_dsn)
    bus = pgbus.Bus(pgbus_dsn)
    got: asyncio.Queue[Any] = asyncio.Queue()

    @bus.subscribe(OrderPlaced)
    async def on_order(event: Any, context: pgbus.Context) -> None:
        await got.put((event.order_id, context.headers.get("who")))

    async with bus, broker:
        await broker.start()
        await broker.publish({"order_id": 1}, channel=pgbus_channel)
        assert await asyncio.wait_for(got.get(), TIMEOUT) == (1, None)
        event_id = await broker.publish(OrderPlaced(order_id=2), headers={"who": "fs"})
        assert await asyncio.wait_for(got.get(), TIMEOUT) == (2, "fs")
    assert isinstance(event_id, str)


async def test_publisher_decorator_publishes_the_handlers_result(
    pgbus_dsn: str, pgbus_channel: str
) -> None:
    """@broker.publisher sends what the handler returns to its channel, on PostgreSQL."""
    broker = PgbusBroker(pgbus_dsn)
    got: asyncio.Queue[Order] = asyncio.Queue()

    @broker.subscriber(pgbus_channel)
    @broker.publisher(f"{pgbus_channel}_out")
    async def double(order: Order) -> Order:
        return Order(order_id=order.order_id * 2)

    @broker.subscriber(f"{pgbus_channel}_out")
    async def sink(order: Order) -> None:
        await got.put(order)

    async with broker:
        await broker.start()
        await broker.publish(Order(order_id=21), channel=pgbus_channel)
        assert await asyncio.wait_for(got.get(), TIMEOUT) == Order(order_id=42)


async def test_failing_handler_is_dead_lettered_by_pgbus(
    pgbus_dsn: str, pgbus_channel: str
) -> None:
    """A handler that raises leaves the delivery to pgbus, which dead-letters it."""
    dead: asyncio.Queue[pgbus.DeadLetter] = asyncio.Queue()

    class DeadLetters:
        @pgbus.hookimpl
        def pgbus_on_dead_letter(self, dead_letter: pgbus.DeadLetter) -> None:
            dead.put_nowait(dead_letter)

    broker = PgbusBroker(pgbus_dsn, retry=pgbus.Retry(attempts=1), plugins=[DeadLetters()])

    @broker.subscriber(pgbus_channel)
    async def boom(order: Order) -> None:
        raise RuntimeError(f"boom {order.order_id}")

    async with broker:
        await broker.start()
        await broker.publish({"order_id": 1}, channel=pgbus_channel)
        letter = await asyncio.wait_for(dead.get(), TIMEOUT)
    assert "boom 1" in repr(letter)


async def test_test_broker_runs_handlers_in_memory() -> None:
    """TestPgbusBroker runs subscribers, routers (with prefixes) and publishers with no server."""
    broker = PgbusBroker("postgresql://nowhere.invalid/none")
    router = PgbusRouter(prefix="shop_")
    got: asyncio.Queue[Order] = asyncio.Queue()

    @router.subscriber("orders")
    @router.publisher("shipped")
    async def ship(order: Order) -> Order:
        return order

    @broker.subscriber("shop_shipped")
    async def shipped(order: Order) -> None:
        await got.put(order)

    broker.include_router(router)
    async with TestPgbusBroker(broker) as br:
        await br.publish({"order_id": 5}, channel="shop_orders")
        assert await asyncio.wait_for(got.get(), TIMEOUT) == Order(order_id=5)
    assert broker.dsn == "postgresql://nowhere.invalid/none"


def test_asyncapi_document_describes_channels() -> None:
    """The AsyncAPI 3 document lists each channel with its payload, and the server sans password."""
    broker = PgbusBroker("postgresql://app:s3cret@db.example:6543/shop")

    @broker.subscriber("orders")
    @broker.publisher("shipped")
    async def ship(order: Order) -> Order:
        return order

    doc = json.loads(
        AsyncAPI(broker, title="shop", schema_version="3.0.0").to_specification().to_json()
    )
    assert_valid_asyncapi(doc)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"] == {"title": "shop", "version": "0.1.0"}
    assert doc["servers"]["development"] == {
        "host": "db.example:6543",
        "pathname": "/shop",
        "protocol": "postgresql",
    }
    assert "s3cret" not in json.dumps(doc)
    assert {c["address"] for c in doc["channels"].values()} == {"orders", "shipped"}
    assert {o["action"] for o in doc["operations"].values()} == {"receive", "send"}
    assert doc["components"]["schemas"]["Order"]["required"] == ["order_id"]
    refs = list(_refs(doc))
    assert len(refs) >= 8
    for ref in refs:  # every reference resolves inside the document
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict)


SCHEMAS = Path(__file__).parent / "asyncapi"


def assert_valid_asyncapi(doc: dict[str, Any]) -> None:
    """Validate ``doc`` against the official AsyncAPI schema of its version (tests/asyncapi)."""
    schema = json.loads((SCHEMAS / f"{doc['asyncapi']}.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    assert not errors, "\n".join(errors)


def _refs(node: Any) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


async def _line(stream: asyncio.StreamReader, text: str, seen: list[str]) -> None:
    while True:
        line = (await stream.readline()).decode()
        seen.append(line)
        if text in line:
            return
        assert line, f"{text!r} never came; got:\n{''.join(seen)}"


@contextlib.asynccontextmanager
async def faststream_run(
    tmp_path: Path, source: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Callable[[str], Awaitable[None]]]]:
    """Run ``faststream run app:app`` on ``source``; yield it and a wait for an output line."""
    (tmp_path / "app.py").write_text(textwrap.dedent(source))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faststream", "run", "app:app",
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    stdout, seen = proc.stdout, []

    async def line(text: str) -> None:
        await asyncio.wait_for(_line(stdout, text, seen), 30)

    try:
        await line("started successfully")
        yield proc, line
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_faststream_run_serves_and_stops_on_signals(
    pgbus_dsn: str, pgbus_channel: str, tmp_path: Path
) -> None:
    """`faststream run app:app` consumes from PostgreSQL and exits cleanly on SIGINT/SIGTERM."""
    OrderPlaced = event_on(  # noqa: N806 - a class
        pgbus_channel
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        async with faststream_run(tmp_path, f"""
            from faststream import FastStream
            from faststream_pgbus import PgbusBroker

            broker = PgbusBroker({pgbus_dsn!r})
            app = FastStream(broker)

            @broker.subscriber({pgbus_channel!r})
            async def echo(body: dict) -> None:
                print("got", body["order_id"], flush=True)
        """) as (proc, line):  # fmt: skip
            async with pgbus.Bus(pgbus_dsn) as bus:
                await bus.publish(OrderPlaced(order_id=signum))
            await line(f"got {int(signum)}")  # the handler's body is the event's data
            proc.send_signal(signum)
            assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0


async def test_faststream_run_catches_up_on_a_durable_subscription(
    pgbus_dsn: str, pgbus_channel: str, tmp_path: Path
) -> None:
    """A durable subscriber under `faststream run` gets what was published while it was down."""
    OrderPlaced = event_on(  # noqa: N806 - a class
        pgbus_channel
    )
    group = f"billing_{uuid.uuid4().hex[:8]}"
    app = f"""
        from faststream import FastStream
        from faststream_pgbus import PgbusBroker

        broker = PgbusBroker({pgbus_dsn!r}, durable=True)
        app = FastStream(broker)

        @broker.subscriber({pgbus_channel!r}, durable={group!r})
        async def bill(body: dict) -> None:
            print("billed", body["order_id"], flush=True)
    """
    bus = pgbus.Bus(pgbus_dsn, durable=True)
    await bus.migrate()
    async with bus:
        async with faststream_run(tmp_path, app) as (proc, line):  # registers the group
            await bus.publish(OrderPlaced(order_id=1))
            await line("billed 1")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
        await bus.publish_many([OrderPlaced(order_id=2), OrderPlaced(order_id=3)])  # while down
        async with faststream_run(tmp_path, app) as (proc, line):
            await line("billed 2")
            await line("billed 3")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0


async def test_durable_subscribers_replay_and_share_the_work(
    pgbus_dsn: str, pgbus_channel: str
) -> None:
    """Two brokers with one durable name split the events; a new one replays what it missed."""
    OrderPlaced = event_on(  # noqa: N806 - a class
        pgbus_channel
    )
    group = f"billing_{uuid.uuid4().hex[:8]}"
    got: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    b_billed = asyncio.Event()

    def member(name: str) -> PgbusBroker:
        # batches of 5: the 57 events published together are 12 batches to share
        broker = PgbusBroker(pgbus_dsn, plugins=[DurablePlugin(batch_size=5)])

        @broker.subscriber(pgbus_channel, durable=group, start="earliest")
        async def bill(order: Order) -> None:
            if name == "b":
                b_billed.set()
            elif name == "a" and order.order_id >= 3:  # a holds its batch until b has one:
                await asyncio.wait_for(b_billed.wait(), TIMEOUT)  # the group must share
            await got.put((name, order.order_id))

        return broker

    async def take(n: int) -> list[tuple[str, int]]:
        return [await asyncio.wait_for(got.get(), TIMEOUT) for _ in range(n)]

    bus = pgbus.Bus(pgbus_dsn, durable=True)
    await bus.migrate()
    async with bus:
        await bus.publish_many([OrderPlaced(order_id=i) for i in range(3)])  # before any member
        async with member("a") as a, member("b") as b:
            await a.start()
            await b.start()
            first = await take(3)
            await bus.publish_many([OrderPlaced(order_id=i) for i in range(3, 60)])
            second = await take(57)
        await bus.publish(OrderPlaced(order_id=60))  # while no member runs
        async with member("c") as c:
            await c.start()
            third = await take(1)
    handled = [n for _, n in first + second + third]
    assert sorted(handled) == list(range(61))  # each once
    assert {who for who, _ in first + second} == {"a", "b"}
    assert third == [("c", 60)]


async def test_durable_subscriber_on_the_test_broker() -> None:
    """TestPgbusBroker runs a durable subscriber on the in-memory durable bus, with no server."""
    OrderPlaced = event_on("orders")  # noqa: N806 - a class
    broker = PgbusBroker(durable=True)
    got: asyncio.Queue[tuple[Order, int]] = asyncio.Queue()

    @broker.subscriber("orders", durable="billing")
    async def bill(order: Order, attempt: Annotated[int, Context(ATTEMPT)]) -> None:
        if attempt == 1:
            raise pgbus.Nack(delay=0.01)  # a durable retry, in memory
        await got.put((order, attempt))

    async with TestPgbusBroker(broker) as br:
        await br.publish(OrderPlaced(order_id=1))
        assert await asyncio.wait_for(got.get(), TIMEOUT) == (Order(order_id=1), 2)
        [sub] = await br._connection.durable_subscriptions()  # type: ignore[union-attr]
    assert sub.name == "billing"


async def test_a_bare_body_on_a_durable_broker_is_a_warned_plain_notify(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dict on a durable broker reaches plain subscribers; the log says durable ones miss it."""
    broker = PgbusBroker(durable=True)
    got: asyncio.Queue[Order] = asyncio.Queue()

    @broker.subscriber("orders")
    async def plain(order: Order) -> None:
        await got.put(order)

    async with TestPgbusBroker(broker) as br:
        await br.publish({"order_id": 3}, channel="orders")
        await br.publish({"order_id": 4}, channel="orders")
        assert await asyncio.wait_for(got.get(), TIMEOUT) == Order(order_id=3)
    warnings = [r.getMessage() for r in caplog.records if r.name == "faststream_pgbus"]
    assert len(warnings) == 1  # once per channel
    assert "durable subscribers do not get" in warnings[0]


def test_faststream_docs_gen_output_is_valid_asyncapi(tmp_path: Path) -> None:
    """`faststream docs gen app:app` writes a document the official AsyncAPI schema accepts."""
    (tmp_path / "app.py").write_text(
        textwrap.dedent("""
            import pydantic
            from faststream import FastStream
            from faststream_pgbus import PgbusBroker, PgbusRouter

            class Order(pydantic.BaseModel):
                order_id: int

            broker = PgbusBroker("postgresql://app:s3cret@db.example/shop", durable=True)
            router = PgbusRouter(prefix="shop_")
            app = FastStream(broker)

            @router.subscriber("orders", durable="billing")
            @router.publisher("billed")
            async def bill(order: Order) -> Order:
                return order

            @broker.subscriber("audit", title="audit trail")
            async def audit(body: dict) -> None: ...

            broker.include_router(router)
        """)
    )
    out = tmp_path / "asyncapi.json"
    done = subprocess.run(
        [sys.executable, "-m", "faststream", "docs", "gen", "app:app", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    assert_valid_asyncapi(doc)
    assert {c["address"] for c in doc["channels"].values()} == {
        "shop_orders",
        "shop_billed",
        "audit",
    }
    assert "s3cret" not in out.read_text()


@pytest.mark.parametrize("version", ["2.6.0", "3.0.0"])
def test_asyncapi_documents_of_each_version_are_valid(version: str) -> None:
    """Both AsyncAPI versions FastStream writes validate; a broken document does not."""
    broker = PgbusBroker("postgresql://db.example/shop")

    @broker.subscriber("orders")
    @broker.publisher("shipped")
    async def ship(order: Order) -> Order:
        return order

    doc = json.loads(AsyncAPI(broker, schema_version=version).to_specification().to_json())
    assert doc["asyncapi"] == version
    assert_valid_asyncapi(doc)
    del doc["info"]  # the validation can fail: a document without info is not AsyncAPI
    with pytest.raises(AssertionError, match="'info' is a required property"):
        assert_valid_asyncapi(doc)


async def test_subscription_options_pass_through_to_pgbus() -> None:
    """pgbus subscription options given to @broker.subscriber (here where=) shape its routing."""
    broker = PgbusBroker()
    got: asyncio.Queue[Order] = asyncio.Queue()

    @broker.subscriber("orders", where=lambda message: '"order_id":2' in message.payload)
    async def only_two(order: Order) -> None:
        await got.put(order)

    async with TestPgbusBroker(broker) as br:
        await br.publish({"order_id": 1}, channel="orders")
        await br.publish({"order_id": 2}, channel="orders")
        assert await asyncio.wait_for(got.get(), TIMEOUT) == Order(order_id=2)
