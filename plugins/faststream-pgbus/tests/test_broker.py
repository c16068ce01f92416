"""faststream-pgbus against a real PostgreSQL, in memory, in `faststream run`, and in AsyncAPI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
from faststream import Context, Depends
from faststream.specification import AsyncAPI
from faststream_pgbus import PgbusBroker, PgbusRouter, TestPgbusBroker

import pgbus

if TYPE_CHECKING:
    from pathlib import Path

TIMEOUT = 10.0


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


async def test_faststream_run_serves_and_stops_on_signals(
    pgbus_dsn: str, pgbus_channel: str, tmp_path: Path
) -> None:
    """`faststream run app:app` consumes from PostgreSQL and exits cleanly on SIGINT/SIGTERM."""
    (tmp_path / "app.py").write_text(
        textwrap.dedent(f"""
            import sys
            from faststream import FastStream
            from faststream_pgbus import PgbusBroker

            broker = PgbusBroker({pgbus_dsn!r})
            app = FastStream(broker)

            @broker.subscriber({pgbus_channel!r})
            async def echo(body: dict) -> None:
                print("got", body["order_id"], flush=True)
        """)
    )
    OrderPlaced = event_on(  # noqa: N806 - a class
        pgbus_channel
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "faststream", "run", "app:app",
            cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdout is not None
        seen: list[str] = []
        try:
            await asyncio.wait_for(_line(proc.stdout, "started successfully", seen), 30)
            async with pgbus.Bus(pgbus_dsn) as bus:
                await bus.publish(OrderPlaced(order_id=signum))
            # the handler's body is the event's data
            await asyncio.wait_for(_line(proc.stdout, f"got {int(signum)}", seen), TIMEOUT)
            proc.send_signal(signum)
            assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0, "".join(seen)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


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
