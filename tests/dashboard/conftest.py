"""A live world for the dashboard's tests: a durable bus publishing its metrics, a
consumer group holding a lease, a scheduled event, seeded dead letters (one of them a
script), and the dashboard served by a real uvicorn on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

pytest.importorskip("starlette", reason="the dashboard extra is not installed")

import uvicorn
from _secrets import TOKEN, XSS

import pgbus
from pgbus.dashboard import create_app
from pgbus.durable import DurablePlugin, migrate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from starlette.applications import Starlette


@dataclasses.dataclass
class World:
    """What the fixture set up, for the tests to compare the pages against."""

    dsn: str
    schema: str
    channel: str
    durable_channel: str
    bus: pgbus.Bus
    ping: type[pgbus.Event]
    published: int
    backlog_events: int
    dead_ids: list[int]
    xss_id: int
    release: asyncio.Event


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


async def _seed(conn: asyncpg.Connection, schema: str, channel: str) -> list[int]:
    """Three plain dead letters: a decode failure, a handler error, and a script."""
    rows = [
        (None, channel, None, "not json at all", "decode error: Expecting value", 1),
        ("billing", channel, str(uuid.uuid4()), '{"n": 2}', "ValueError: card declined", 3),
        ("audit", channel, str(uuid.uuid4()), XSS, f"RuntimeError: {XSS}", 5),
    ]
    insert = f"""INSERT INTO "{schema}".dead_letters
        (subscription, channel, event_id, payload, error, attempts)
        VALUES ($1, $2, $3, $4, $5, $6) RETURNING id"""
    return [await conn.fetchval(insert, *row) for row in rows]


@pytest.fixture
async def world(pg_dsn: str) -> AsyncIterator[World]:
    """A running durable bus with metrics, a held lease, a backlog and dead letters."""
    schema = f"pgbus_dash_{uuid.uuid4().hex[:8]}"
    channel = f"dash_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, schema)
        async with _world(pg_dsn, conn, schema, channel) as world:
            yield world
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@contextlib.asynccontextmanager
async def _world(
    pg_dsn: str, conn: asyncpg.Connection, schema: str, channel: str
) -> AsyncIterator[World]:
    durable_channel = f"{channel}_d"

    class Ping(pgbus.Event, channel=channel):
        n: int

    class Invoice(pgbus.Event, channel=durable_channel):
        n: int

    release, holding = asyncio.Event(), asyncio.Event()
    got: asyncio.Queue[int] = asyncio.Queue()
    bus = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        stop_timeout=5.0,
        plugins=[
            pgbus.MetricsPublisher(interval=0.25, channel=f"{channel}_metrics"),
            DurablePlugin(schema, poll_interval=0.5, prune_interval=None),
        ],
    )

    @bus.subscribe(Ping, name="on_ping")
    async def on_ping(event: Any) -> None:
        got.put_nowait(event.n)

    @bus.subscribe(Invoice, durable="billing", name="bill")
    async def bill(event: Any) -> None:
        holding.set()
        await release.wait()  # holds its lease: a member, a backlog

    async with bus:
        published = 7
        for n in range(published):
            await bus.notify(channel, Ping(n=n).model_dump_json())
        async with asyncio.timeout(10):
            for _ in range(published):
                await got.get()
        backlog = 4
        await bus.publish_many([Invoice(n=n) for n in range(backlog)])
        await bus.publish(Invoice(n=99), delay=3600)
        await asyncio.wait_for(holding.wait(), 15)  # the group took the events in, holds them
        ids = await _seed(conn, schema, channel)
        world = World(
            dsn=pg_dsn,
            schema=schema,
            channel=channel,
            durable_channel=durable_channel,
            bus=bus,
            ping=Ping,
            published=published,
            backlog_events=backlog,
            dead_ids=ids,
            xss_id=ids[-1],
            release=release,
        )
        try:
            yield world
        finally:
            release.set()


@pytest.fixture
def dashboard(world: World) -> Callable[..., contextlib.AbstractAsyncContextManager[str]]:
    """``async with dashboard(**create_app_options) as url``: the dashboard of the world."""

    def serve(**options: Any) -> contextlib.AbstractAsyncContextManager[str]:
        options.setdefault("token", TOKEN)
        options.setdefault("refresh", 0.5)
        options.setdefault("metrics_channel", f"{world.channel}_metrics")  # this world's only
        return serving(create_app(world.dsn, schema=world.schema, **options))

    return serve
