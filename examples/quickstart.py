"""pgbus in one file: typed events, an untyped channel, batch and raw publishing.

Run it with no setup: without PGBUS_DSN and with nothing on 127.0.0.1:5432, it starts a
throwaway PostgreSQL (from the machine's binaries or the `embedded` extra) and removes it.
"""

import asyncio
from decimal import Decimal

import pgbus
from pgbus.server import local_server


class OrderPlaced(pgbus.Event, channel="orders"):
    order_id: int
    total: Decimal


async def main(dsn: str) -> None:
    bus = pgbus.Bus(dsn)
    seen: asyncio.Queue[str] = asyncio.Queue()

    @bus.subscribe(OrderPlaced)
    async def on_order(event: OrderPlaced) -> None:
        await seen.put(f"order {event.order_id}: {event.total}")

    @bus.subscribe("audit")
    async def on_audit(msg: pgbus.Message) -> None:
        await seen.put(f"audit: {msg.payload}")

    async with bus:
        await bus.publish(OrderPlaced(order_id=1, total=Decimal("9.90")))
        await bus.publish_many([OrderPlaced(order_id=i, total=Decimal(i)) for i in (2, 3)])
        await bus.notify("audit", "raw text")
        for _ in range(4):
            print(await asyncio.wait_for(seen.get(), timeout=5))
        snap = bus.metrics.snapshot()
        print(f"published {snap.published}, received {snap.received}, handled {snap.handled}")


if __name__ == "__main__":
    with local_server() as dsn:
        asyncio.run(main(dsn))
