"""Publish inside your transaction: the event is delivered only if the transaction commits.

export PGBUS_DSN=postgresql://postgres@127.0.0.1:5432/postgres
python examples/transactional_publish.py
"""

import asyncio
import contextlib
import os

import asyncpg

import pgbus


class OrderPlaced(pgbus.Event, channel="orders_tx"):
    order_id: int


class PaymentError(Exception):
    pass


async def place_order(bus: pgbus.Bus, conn: asyncpg.Connection, order_id: int) -> None:
    """Insert the order and publish its event in one transaction."""
    async with conn.transaction():
        await conn.execute("INSERT INTO orders VALUES ($1)", order_id)
        await bus.publish(OrderPlaced(order_id=order_id), connection=conn)
        if order_id % 2 == 0:
            raise PaymentError(order_id)  # rolls back the row and the event


async def main() -> None:
    bus = pgbus.Bus()  # the database comes from $PGBUS_DSN
    received: asyncio.Queue[int] = asyncio.Queue()

    @bus.subscribe
    async def on_order(event: OrderPlaced) -> None:
        await received.put(event.order_id)

    async with bus:
        conn = await asyncpg.connect(os.environ["PGBUS_DSN"])
        try:
            await conn.execute("CREATE TEMP TABLE orders (id int PRIMARY KEY)")
            for order_id in (1, 2, 3):
                with contextlib.suppress(PaymentError):
                    await place_order(bus, conn, order_id)
        finally:
            await conn.close()
        first = await asyncio.wait_for(received.get(), 5)
        second = await asyncio.wait_for(received.get(), 5)
        print(f"received orders {first} and {second}; order 2 was rolled back, unseen")


if __name__ == "__main__":
    asyncio.run(main())
