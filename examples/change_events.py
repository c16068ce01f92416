"""Table change events: every committed row change of `orders` becomes a typed event.

A trigger publishes the changes, so they arrive whoever writes the row: here a plain
asyncpg connection stands in for another service, a migration or `psql`.

Run it with no setup: without PGBUS_DSN and with nothing on 127.0.0.1:5432, it starts a
throwaway PostgreSQL (from the machine's binaries or the `embedded` extra) and removes it.
"""

import asyncio
import uuid
from decimal import Decimal

import asyncpg
import pydantic

import pgbus
from pgbus.server import local_server


class Order(pydantic.BaseModel):
    id: int
    status: str
    total: Decimal
    note: str = ""


class OrderChanged(pgbus.RowChanged[Order], channel="orders_changes"):
    """What a handler receives: .op, .key, .new, .old (and .row_omitted for huge rows)."""


async def main(dsn: str) -> None:
    schema = f"example_{uuid.uuid4().hex[:8]}"  # a schema of its own, dropped at the end
    writer = await asyncpg.connect(dsn)
    await writer.execute(
        f"CREATE SCHEMA {schema}; SET search_path = {schema};"
        " CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL,"
        " total numeric(10, 2) NOT NULL, note text NOT NULL DEFAULT '')"
    )
    bus = pgbus.Bus(dsn)
    seen: asyncio.Queue[OrderChanged] = asyncio.Queue()

    @bus.subscribe
    async def on_change(change: OrderChanged) -> None:
        if change.row_omitted:  # too large for NOTIFY: only the key came; read the row
            row = await change.fetch(bus)  # None when the row is gone (deleted since)
            found = f"fetched {len(row.note)} chars" if row is not None else "it is gone now"
            print(f"{change.op} {change.key}: too large to send; {found}")
        elif change.op == "UPDATE" and change.old and change.new:
            print(f"UPDATE {change.key}: {change.old.status} -> {change.new.status}")
        else:
            print(f"{change.op} {change.key}: {change.new or change.old}")
        await seen.put(change)

    try:
        async with bus:
            await bus.install_change_trigger("orders", schema=schema, model=OrderChanged)
            async with writer.transaction():  # delivered at COMMIT, in this order
                await writer.execute("INSERT INTO orders VALUES (1, 'new', 9.90)")
                await writer.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
            tx = writer.transaction()  # rolled back: never delivered
            await tx.start()
            await writer.execute("INSERT INTO orders VALUES (2, 'ghost', 1)")
            await tx.rollback()
            await writer.execute("UPDATE orders SET note = $1 WHERE id = 1", "x" * 9000)
            for _ in range(3):
                await asyncio.wait_for(seen.get(), timeout=5)
            await writer.execute("DELETE FROM orders WHERE id = 1")
            await asyncio.wait_for(seen.get(), timeout=5)
            for trigger in await bus.list_change_triggers(schema=schema):
                print(f"trigger {trigger.name} on {trigger.table} -> {trigger.channel}")
            await bus.remove_change_trigger("orders", schema=schema)
    finally:
        await writer.execute(f"DROP SCHEMA {schema} CASCADE")
        await writer.close()


if __name__ == "__main__":
    with local_server() as dsn:
        asyncio.run(main(dsn))
