"""A consumer-group member process for the durable tests (killed with SIGKILL by some).

Usage: python _member.py DSN SCHEMA CHANNEL GROUP [BATCH]. Prints "ready" once listening,
then "<n>" for each event its handler finished, flushed at once. With BATCH, the handler
is a batch handler (``batch=BATCH``) that prints its events once the whole batch is done.
"""

from __future__ import annotations

import asyncio
import sys

import pgbus
from pgbus.durable import DurablePlugin


async def main(dsn: str, schema: str, channel: str, group: str, batch: str = "") -> None:
    class Ticket(pgbus.Event, channel=channel):
        n: int
        blob: str = ""

    plugin = DurablePlugin(schema, lease=1.0, poll_interval=0.3, batch_size=20, prune_interval=None)
    bus = pgbus.Bus(dsn, load_entrypoints=False, plugins=[plugin])

    if batch:

        @bus.subscribe(Ticket, durable=group, batch=int(batch), batch_wait=0.01)
        async def handle_batch(events: list[Ticket]) -> None:
            await asyncio.sleep(0.005)
            sys.stdout.write("".join(f"{e.n}\n" for e in events))
            sys.stdout.flush()

    else:

        @bus.subscribe(Ticket, durable=group)
        async def handle(event: Ticket) -> None:
            await asyncio.sleep(0.001)
            sys.stdout.write(f"{event.n}\n")
            sys.stdout.flush()

    async with bus:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
