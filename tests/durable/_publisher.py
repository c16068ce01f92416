"""A publisher process that dies right after its transaction commits, before any wake-up.

Usage: python _publisher.py DSN SCHEMA CHANNEL N. Publishes event N with
``connection=`` in a transaction, commits, prints "committed" and kills itself with
SIGKILL: its wake-up is never sent (the first look at the transaction is 60 s away).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import asyncpg

import pgbus
from pgbus.durable import DurablePlugin


async def main(dsn: str, schema: str, channel: str, n: str) -> None:
    class Ticket(pgbus.Event, channel=channel):
        n: int
        blob: str = ""

    plugin = DurablePlugin(schema, prune_interval=None)
    plugin.wakeups.min_delay = plugin.wakeups.max_delay = 60.0
    bus = pgbus.Bus(dsn, load_entrypoints=False, plugins=[plugin])
    conn = await asyncpg.connect(dsn)
    async with conn.transaction():
        await bus.publish(Ticket(n=int(n)), connection=conn)
    sys.stdout.write("committed\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
