"""Durable delivery: a subscriber that was away gets every event it missed, in order.

Plain NOTIFY forgets what is published while a listener is down. With `durable=True` the
bus journals each event in the publishing transaction, and a durable subscription
(`durable="billing"`) keeps its position in the database: after a restart it replays
what it missed, then goes on live. Events over NOTIFY's 8000 bytes work too.

Run it with no setup: without PGBUS_DSN and with nothing on 127.0.0.1:5432, it starts a
throwaway PostgreSQL (from the machine's binaries or the `embedded` extra) and removes it.
"""

import asyncio
import uuid

import asyncpg

import pgbus
from pgbus.durable import DurablePlugin
from pgbus.server import local_server


class OrderPlaced(pgbus.Event, channel="orders_durable"):
    order_id: int
    note: str = ""


def billing_bus(dsn: str, schema: str, seen: asyncio.Queue[OrderPlaced]) -> pgbus.Bus:
    """One run of the billing service (a new process, as far as the database knows)."""
    bus = pgbus.Bus(dsn, plugins=[DurablePlugin(schema)])

    @bus.subscribe(OrderPlaced, durable="billing")
    async def bill(event: OrderPlaced) -> None:
        print(f"billing order {event.order_id} ({len(event.note)} bytes of notes)")
        await seen.put(event)

    return bus


async def main(dsn: str) -> None:
    schema = f"example_{uuid.uuid4().hex[:8]}"  # pgbus's tables, dropped at the end
    shop = pgbus.Bus(dsn, plugins=[DurablePlugin(schema)])
    await shop.migrate()  # once per database; `pgbus migrate --schema ...` does the same
    seen: asyncio.Queue[OrderPlaced] = asyncio.Queue()
    try:
        async with billing_bus(dsn, schema, seen):  # first run: registers "billing"
            await shop.publish(OrderPlaced(order_id=1))
            await asyncio.wait_for(seen.get(), timeout=10)
        print("billing is down; the shop keeps selling")
        await shop.publish_many([OrderPlaced(order_id=2), OrderPlaced(order_id=3)])
        await shop.publish(OrderPlaced(order_id=4, note="x" * 100_000))  # > 8000 bytes
        async with billing_bus(dsn, schema, seen):  # second run: catches up, in order
            for _ in range(3):
                await asyncio.wait_for(seen.get(), timeout=10)
            await shop.publish(OrderPlaced(order_id=5))  # and then live again
            await asyncio.wait_for(seen.get(), timeout=10)
    finally:
        await shop.stop()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


if __name__ == "__main__":
    with local_server() as dsn:
        asyncio.run(main(dsn))
