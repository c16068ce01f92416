"""Intended usage of the public API, type-checked by ``mypy --strict`` in CI (never run)."""

from __future__ import annotations

import contextlib
import datetime as dt
from decimal import Decimal
from typing import TYPE_CHECKING

import pgbus
import pgbus.sync

if TYPE_CHECKING:
    import asyncpg
    import psycopg
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session


class OrderPlaced(pgbus.Event, channel="orders"):
    order_id: int
    total: Decimal


bus = pgbus.Bus("postgresql://localhost/app", plugins=[], load_entrypoints=False)


@bus.subscribe(OrderPlaced)
async def on_order(event: OrderPlaced) -> None:
    total: Decimal = event.total
    del total


@bus.subscribe("audit")
async def on_audit(msg: pgbus.Message) -> None:
    text: str = msg.payload
    del text


@bus.subscribe
async def on_order_by_annotation(event: OrderPlaced) -> None: ...


@bus.subscribe(OrderPlaced, concurrency=8, key=lambda e: e.order_id)
async def on_order_with_context(event: OrderPlaced, context: pgbus.Context) -> None:
    published: dt.datetime = context.published_at
    if context.attempt < 3:
        raise pgbus.Nack(delay=dt.timedelta(seconds=1))
    raise pgbus.Reject(f"gave up on {context.id} published {published}")


@bus.subscribe(OrderPlaced, batch=100, batch_wait=0.05)
async def on_orders(events: list[OrderPlaced]) -> None: ...


async def main(pool: asyncpg.Pool) -> None:
    async with bus:
        event_id: str = await bus.publish(OrderPlaced(order_id=1, total=Decimal("9.90")))
        ids: list[str] = await bus.publish_many([OrderPlaced(order_id=2, total=Decimal(1))])
        async with pool.acquire() as conn, conn.transaction():
            await bus.publish(OrderPlaced(order_id=3, total=Decimal(1)), connection=conn)
        await bus.notify("audit", "raw text")
        sub: pgbus.Subscription = await bus.listen(OrderPlaced, on_order)
        await bus.unlisten(sub)
        await bus.unlisten("audit")
        snapshot: pgbus.MetricsSnapshot = bus.metrics.snapshot()
        del event_id, ids, snapshot
    pgbus.configure("postgresql://localhost/app")
    await pgbus.publish(OrderPlaced(order_id=4, total=Decimal(1)))
    await pgbus.close()


async def other_drivers(session: AsyncSession, aconn: psycopg.AsyncConnection[object]) -> None:
    async with session.begin():
        await bus.publish(OrderPlaced(order_id=5, total=Decimal(1)), connection=session)
    async with aconn.transaction():
        await bus.publish_many([OrderPlaced(order_id=6, total=Decimal(1))], connection=aconn)


def sync_publishers(conn: psycopg.Connection[object], orm: Session) -> None:
    with conn.transaction():
        event_id: str = pgbus.sync.publish(
            OrderPlaced(order_id=7, total=Decimal(1)), connection=conn
        )
    with orm.begin():
        ids: list[str] = pgbus.sync.publish_many(
            [OrderPlaced(order_id=8, total=Decimal(1))], connection=orm, durable=True
        )
    del event_id, ids


async def serve() -> None:
    lazy = pgbus.Bus()  # the DSN is resolved at start(): argument, PGBUS_DSN, libpq's env
    lazy.dsn = pgbus.resolve_dsn("host=db dbname=app")
    where: str = lazy.dsn
    with contextlib.suppress(pgbus.AlreadyStarted):
        await lazy.run_forever()  # SIGTERM/SIGINT: drain, then return
    state: pgbus.ListenerState = lazy.status.state
    del where, state
